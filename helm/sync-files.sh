#!/usr/bin/env bash
# Refresh the chart's copies of the Grafana dashboards and the Prometheus rules.
# Helm cannot read files outside a chart, so helm/deltawatch/files/ keeps copies of
#   grafana/*.json               -> helm/deltawatch/files/grafana/
#   prometheus/deltawatch-rules.yml -> helm/deltawatch/files/prometheus/
# tests/test_deploy_chart.py fails when a copy differs from its original.
#   helm/sync-files.sh          copy (removing copies whose original is gone)
#   helm/sync-files.sh --check  only report differences (exit 1 when there are any)
set -euo pipefail
cd "$(dirname "$0")/.."
files=helm/deltawatch/files
check=0
[ "${1:-}" = "--check" ] && check=1
status=0

sync() {  # sync SRC DST
    if ! cmp -s "$1" "$2"; then
        if [ "$check" = 1 ]; then echo "differs: $2 (from $1)"; status=1; else cp "$1" "$2"; echo "copied $1"; fi
    fi
}

mkdir -p "$files/grafana" "$files/prometheus"
shopt -s nullglob
for src in grafana/*.json; do
    sync "$src" "$files/grafana/$(basename "$src")"
done
for dst in "$files"/grafana/*.json; do
    if [ ! -e "grafana/$(basename "$dst")" ]; then
        if [ "$check" = 1 ]; then echo "stale: $dst"; status=1; else rm "$dst"; echo "removed $dst"; fi
    fi
done
sync prometheus/deltawatch-rules.yml "$files/prometheus/deltawatch-rules.yml"
exit "$status"

#!/usr/bin/env bash
# One prepared benchmark run for a lent GPU machine (H100/H200): the sketch benchmark at Qwen3-8B
# matrix sizes (anchor in host memory, the default, then in device memory) and, when present, the
# sidecar ingest benchmark, on CUDA. Budget: under 6 minutes
# on an H100 (each python is wrapped in `timeout`; a failure or timeout is logged and the script
# goes on). Nothing is installed: the checkout is put on the path as the `deltawatch` package
# through symlinks in a temporary directory.
#
#   OUT=/some/dir bash bench/gpu.sh            # on the GPU machine ($OUT is set there)
#   DEVICE=cpu SHAPES=64x96 SKETCH_ARGS="--checks 3 --report-at 3 --repeats 1" \
#     SIDECAR_ARGS="--layers 1 --checks 2" DEVICE_ANCHOR_ARGS="--shapes 64x96 --checks 3 \
#     --report-at 3 --repeats 1" OUT=/tmp/out bash bench/gpu.sh               # the CPU path
#
# Files written to $OUT (at most 7): gpu.log (this script's trace and the tables), nvidia-smi.txt,
# bench_sketch_<device>.json, bench_sketch_<device>.log, bench_sidecar_<device>.log,
# bench_sketch_<device>_device_anchor.json and .log (the anchor kept in device memory).
# Render a saved JSON again with: python bench/bench_sketch.py --table-from FILE.json
set -u
set -x

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$(mktemp -d)}
DEVICE=${DEVICE:-cuda}
# Qwen3-8B [out, in]: q/o 4096², k/v 1024×4096, gate/up 12288×4096, down 4096×12288
SHAPES=${SHAPES:-4096x4096,1024x4096,12288x4096,4096x12288}
SKETCH_ARGS=${SKETCH_ARGS:---repeats 3 --full-svd-at 10}
SIDECAR_ARGS=${SIDECAR_ARGS:---layers 8 --checks 3}
SKETCH_TIMEOUT=${SKETCH_TIMEOUT:-150}
SIDECAR_TIMEOUT=${SIDECAR_TIMEOUT:-90}
# 3. the same benchmark with the anchor in device memory (no host streaming, masks on the device)
DEVICE_ANCHOR_ARGS=${DEVICE_ANCHOR_ARGS:---shapes 4096x4096,4096x12288 --repeats 3 --full-svd-at 10}
DEVICE_ANCHOR_TIMEOUT=${DEVICE_ANCHOR_TIMEOUT:-60}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1

PY=${PYTHON:-$(command -v python3 || command -v python)}
date -u
nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"

# deltawatch without pip: deltawatch/{client,sidecar,v1} -> the checkout's folders
PKG=$(mktemp -d)
mkdir -p "$PKG/deltawatch"
ln -s "$ROOT/client" "$PKG/deltawatch/client"
ln -s "$ROOT/sidecar" "$PKG/deltawatch/sidecar"
ln -s "$ROOT/protos/deltawatch/v1" "$PKG/deltawatch/v1"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$ROOT" || exit 1

# bench_sidecar.py reads its resident memory through psutil; where psutil is missing, a stand-in
# with the one call it makes (Process(pid).memory_info().rss, from /proc/PID/statm)
if ! "$PY" -c "import psutil" 2>/dev/null; then
    cat > "$PKG/psutil.py" <<'EOF'
"""gpu.sh's stand-in for psutil: Process(pid).memory_info().rss from /proc/PID/statm."""
import os
from types import SimpleNamespace


class Process:
    def __init__(self, pid=None):
        self.pid = os.getpid() if pid is None else pid

    def memory_info(self):
        with open(f"/proc/{self.pid}/statm") as f:
            pages = int(f.read().split()[1])
        return SimpleNamespace(rss=pages * os.sysconf("SC_PAGE_SIZE"))
EOF
fi

timeout 60 "$PY" -c "
import torch, deltawatch.client.tracker, deltawatch.sidecar.geometry
print('deltawatch from', deltawatch.client.tracker.__file__)
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(0))
" || echo "gpu.sh: the import check failed (rc $?); going on"

# 1. the sketch benchmark (its JSON is rewritten after every shape, so a timeout keeps the rest)
# shellcheck disable=SC2086
timeout "$SKETCH_TIMEOUT" "$PY" bench/bench_sketch.py --device "$DEVICE" --shapes "$SHAPES" \
    $SKETCH_ARGS --json "$OUT/bench_sketch_$DEVICE.json" \
    > "$OUT/bench_sketch_$DEVICE.log" 2>&1
rc=$?
[ "$rc" -eq 0 ] || echo "gpu.sh: bench_sketch.py exited with $rc (124: timed out); going on"
cat "$OUT/bench_sketch_$DEVICE.log" | grep -v '^  ' || true
if [ "$rc" -ne 0 ] && [ -f "$OUT/bench_sketch_$DEVICE.json" ]; then
    timeout 60 "$PY" bench/bench_sketch.py --table-from "$OUT/bench_sketch_$DEVICE.json" || true
fi

# 2. the sidecar ingest benchmark, when it is in the checkout
if [ -f bench/bench_sidecar.py ]; then
    # shellcheck disable=SC2086
    timeout "$SIDECAR_TIMEOUT" "$PY" bench/bench_sidecar.py --device "$DEVICE" $SIDECAR_ARGS \
        > "$OUT/bench_sidecar_$DEVICE.log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || echo "gpu.sh: bench_sidecar.py exited with $rc (124: timed out); going on"
    cat "$OUT/bench_sidecar_$DEVICE.log"
else
    echo "gpu.sh: bench/bench_sidecar.py is not in this checkout; skipped"
fi

# 3. the anchor on the device: what the whole check costs without the host round trips
# shellcheck disable=SC2086
timeout "$DEVICE_ANCHOR_TIMEOUT" "$PY" bench/bench_sketch.py --device "$DEVICE" --anchor device \
    $DEVICE_ANCHOR_ARGS --json "$OUT/bench_sketch_${DEVICE}_device_anchor.json" \
    > "$OUT/bench_sketch_${DEVICE}_device_anchor.log" 2>&1
rc=$?
[ "$rc" -eq 0 ] || echo "gpu.sh: bench_sketch.py --anchor device exited with $rc; going on"
grep -v '^  ' "$OUT/bench_sketch_${DEVICE}_device_anchor.log" || true

# 4. where one power step's time goes on the device (printed into gpu.log only)
timeout 45 "$PY" bench/bench_sketch.py --device "$DEVICE" --profile-step \
    --shapes "${PROFILE_SHAPES:-4096x4096}" || echo "gpu.sh: the power-step profile failed; going on"

rm -rf "$PKG"
date -u
ls -l "$OUT"
exit 0

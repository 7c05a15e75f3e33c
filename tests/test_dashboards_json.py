"""The Grafana dashboards as files: generated from the code, schema-sane, every exported metric on
a panel (or listed as deliberately not shown), provisioning files valid."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "grafana"
DASHBOARDS = sorted(GRAFANA.glob("*.json"))
PANEL_TYPES = {"row", "timeseries", "stat", "heatmap", "table"}


def generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "deltawatch_grafana_generate", GRAFANA / "generate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def test_the_committed_json_is_what_the_generator_writes():
    assert generator().main(["--check"]) == 0, "run: python grafana/generate.py"
    assert [p.name for p in DASHBOARDS] == sorted(generator().DASHBOARDS)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_schema_sane(path):
    d = json.loads(path.read_text())
    assert d["schemaVersion"] >= 39
    assert re.fullmatch(r"[a-z0-9-]{1,40}", d["uid"])
    assert d["title"] and d["tags"]
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in panels(d):
        assert p["type"] in PANEL_TYPES, p["type"]
        g = p["gridPos"]
        assert g["w"] >= 1 and g["h"] >= 1 and g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["title"] and p["description"], "every panel says what it shows"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"]
            assert t["expr"].strip()
    types = {p["type"] for p in panels(d)}
    assert {"timeseries", "stat", "heatmap"} <= types
    for expr in exprs(d):
        for window in re.findall(r"\b(?:rate|increase|irate)\([^\[]*\[([^\]]+)\]", expr):
            assert window == "$__rate_interval", expr


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_template_variables(path):
    d = json.loads(path.read_text())
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert list(variables) == ["datasource", "run", "module", "layer"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("run", "module", "layer"):
        v = variables[name]
        assert v["type"] == "query"
        assert v["datasource"]["uid"] == "${datasource}"
        assert re.fullmatch(rf"label_values\(deltawatch_\w+(\{{.*\}})?, {name}\)", v["definition"])
        assert v["query"]["query"] == v["definition"]
    for name in ("module", "layer"):  # "All" must also match matrices without a layer
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    used = " ".join(exprs(d))
    for name in ("run", "module", "layer"):
        assert f"${name}" in used


def test_the_overview_shows_what_the_issue_asks_for():
    d = json.loads((GRAFANA / "deltawatch-overview.json").read_text())
    titles = " | ".join(p["title"].lower() for p in panels(d))
    for words in (
        "stable-rank band",
        "subspace and horizon alignment",
        "channel energy",
        "bf16-visible",
        "overlaps",
        "rotation",
        "lock status",
        "alerts firing",
        "ingest",
        "by layer",
    ):
        assert words in titles, words
    heat = [p for p in panels(d) if p["type"] == "heatmap"]
    assert heat


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_heatmaps_are_layer_by_time(path):
    """One row per layer, named by its number only, so Grafana sorts the rows numerically."""
    for p in panels(json.loads(path.read_text())):
        if p["type"] != "heatmap":
            continue
        (t,) = p["targets"]
        assert "by (layer)" in t["expr"] and 'layer!=""' in t["expr"]
        assert t["legendFormat"] == "{{layer}}" and t["format"] == "time_series"
        assert p["options"]["calculate"] is False


def test_every_exported_metric_is_on_a_panel_or_deliberately_not_shown():
    gen = generator()
    exported = gen.exported_metrics()
    used: set[str] = set()
    for path in DASHBOARDS:
        for expr in exprs(json.loads(path.read_text())):
            used |= set(re.findall(r"\bdeltawatch_[a-z0-9_]+", expr))
    assert not (used - exported), f"panels query metrics nobody exports: {used - exported}"
    missing = exported - used - set(gen.NOT_SHOWN)
    assert not missing, f"exported but on no panel and not listed in NOT_SHOWN: {missing}"
    assert all(reason for reason in gen.NOT_SHOWN.values())


def test_exported_metrics_cover_the_binding_table_and_the_service_metrics():
    from deltawatch.sidecar import keys

    exported = generator().exported_metrics()
    assert {b.metric for b in keys.BINDINGS} <= exported
    for name in (
        "deltawatch_ingest_messages_total",
        "deltawatch_ingest_bytes_total",
        "deltawatch_ingest_errors_total",
        "deltawatch_client_dropped_reports_total",
        "deltawatch_ingest_lag_seconds",
        "deltawatch_alerts_firing",
    ):
        assert name in exported  # DESIGN §4's list, spelled here only to check the code


def test_provisioning_files():
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/deltawatch.yml").read_text())
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")
    dash = yaml.safe_load((GRAFANA / "provisioning/dashboards/deltawatch.yml").read_text())
    (provider,) = dash["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]

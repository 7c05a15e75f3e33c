"""Every dashboard query returns data from a real Prometheus scraping a real `deltawatch serve`
process fed by a monitored run (a real Monitor on a torch model, plus MoE expert matrices of the
same run over a second real gRPC stream), after at least two scrapes,
with the template variables substituted as Grafana would (the first value of each variable's
label_values query, and "All"). The Prometheus rules file loads in the same Prometheus.
Run-level series read back through Prometheus equal the sidecar's JSON API exactly."""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from deltawatch.client import Monitor
from support import (
    AttentionMlpBlock,
    PrometheusServer,
    SidecarProcess,
    SyntheticRun,
    expert_manifest,
    get_json,
    stream_run,
)

ROOT = Path(__file__).resolve().parents[1]
M, N = 64, 128
LAYERS = 2
DEADLINE = 60.0  # a bound on waiting for a process or a scrape; never a timing assertion
RATE_INTERVAL = "4s"  # Grafana's $__rate_interval at a 1 s scrape interval: 4 x scrape interval


def pretrained_like(g: torch.Generator) -> torch.Tensor:
    U, _ = torch.linalg.qr(torch.randn(M, M, generator=g))
    V, _ = torch.linalg.qr(torch.randn(N, N, generator=g))
    sigma = torch.arange(1, M + 1, dtype=torch.float32) ** -0.7
    sigma[16:] *= 0.3  # a gap after σ16: the rotation panels' angles are then certified
    return (U * sigma) @ V[:, :M].T


def channel(g: torch.Generator, k: int = 16) -> torch.Tensor:
    U, _ = torch.linalg.qr(torch.randn(M, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(N, k, generator=g))
    return U @ torch.diag(torch.linspace(1.0, 0.5, k)) @ V.T


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Any:
    """A sidecar fed by a monitored OPD-like run (it locks), scraped twice by Prometheus."""
    tmp = tmp_path_factory.mktemp("live")
    sidecar = SidecarProcess(tmp / "data").start()
    prometheus = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(1)
        model = torch.nn.Module()
        model.model = torch.nn.Module()
        model.model.layers = torch.nn.ModuleList(AttentionMlpBlock(M, N) for _ in range(LAYERS))
        params = [p for _, p in sorted(model.named_parameters())]
        with torch.no_grad():
            for p in params:
                p.copy_(pretrained_like(g))
        directions = [channel(g) for _ in params]
        mon = Monitor(model, run="dash-opd", endpoint=sidecar.endpoint, every=2)
        with torch.no_grad():
            for step in range(1, 41):
                for p, d in zip(params, directions, strict=True):
                    p.add_(3e-3 * d + 3e-6 * torch.randn(M, N, generator=g))
                mon.step(step)
        assert mon.close(timeout=DEADLINE)
        # MoE experts in the same run (a second stream of its incarnation), for the experts row
        experts = expert_manifest(LAYERS, 2, {"gate_proj": (24, 40), "down_proj": (40, 24)}, {})
        config = mon.config.to_json_dict() | {"incarnation": mon.incarnation}
        moe = SyntheticRun(
            run="dash-opd", shapes={e["matrix"]: tuple(e["shape"]) for e in experts},
            channel_rank=16, oversample=16, lock_at_step=2,
        )  # fmt: skip
        stream_run(sidecar.endpoint, moe, experts, [2, 4], incarnation=mon.incarnation,
                   config=config)  # fmt: skip

        prometheus = PrometheusServer(
            tmp,
            [f"127.0.0.1:{sidecar.http_port}"],
            rule_files=[ROOT / "prometheus" / "deltawatch-rules.yml"],
        ).start(timeout=DEADLINE)
        # two scrapes, plus a margin
        prometheus.wait_for_scrapes(3, selector='deltawatch_run_last_step{run="dash-opd"}')
        yield {"api": prometheus.api, "sidecar": sidecar.http_url, "tmp": tmp}
    finally:
        torch.set_num_threads(threads)
        if prometheus is not None:
            prometheus.stop()
        sidecar.stop()


def dashboards() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((ROOT / "grafana").glob("*.json"))]


def label_values(api: str, definition: str, values: dict[str, str]) -> list[str]:
    """Grafana's label_values(selector, label) against the Prometheus series API."""
    m = re.fullmatch(r"label_values\((.*), (\w+)\)", definition)
    selector, label = substitute(m.group(1), values), m.group(2)
    q = urllib.parse.urlencode({"match[]": selector})
    return sorted(get_json(f"{api}/label/{label}/values?{q}")["data"])


def substitute(expr: str, values: dict[str, str]) -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(f"${name}", values[name])
    assert "$" not in expr, expr
    return expr


def variable_choices(api: str, dashboard: dict[str, Any]) -> list[dict[str, str]]:
    """The variables as Grafana fills them: each query variable's first value; and "All"."""
    first: dict[str, str] = {}
    for v in dashboard["templating"]["list"]:
        if v["type"] != "query":
            continue
        options = label_values(api, v["definition"], first)
        assert options, f"variable {v['name']} has no values: {v['definition']}"
        # a multi-value variable lands in a regex matcher: Grafana escapes it for the regex and
        # for the PromQL string ("mlp.up_proj" -> mlp\\.up_proj in the query text)
        first[v["name"]] = (
            re.escape(options[0]).replace("\\", "\\\\") if v.get("multi") else options[0]
        )
    everything = dict(first, module=".*", layer=".*")
    return [first, everything]


def test_every_panel_query_returns_data(live):
    api = live["api"]
    end = time.time()
    checked = 0
    for d in dashboards():
        for values in variable_choices(api, d):
            for panel in (p for p in d["panels"] if p["type"] != "row"):
                for t in panel["targets"]:
                    expr = substitute(t["expr"], values)
                    if t.get("instant"):
                        q = urllib.parse.urlencode({"query": expr, "time": end})
                        data = get_json(f"{api}/query?{q}")["data"]
                    else:
                        q = urllib.parse.urlencode(
                            {"query": expr, "start": end - 60, "end": end, "step": 1}
                        )
                        data = get_json(f"{api}/query_range?{q}")["data"]
                    assert data["result"], f"{d['uid']} / {panel['title']}: no data for {expr}"
                    for series in data["result"]:
                        points = series.get("values") or [series["value"]]
                        assert all(math.isfinite(float(v)) for _, v in points), expr
                    checked += 1
    assert checked > 60


def test_variables_list_the_run_its_modules_and_layers(live):
    api = live["api"]
    d = dashboards()[0]
    defs = {v["name"]: v["definition"] for v in d["templating"]["list"] if v["type"] == "query"}
    assert label_values(api, defs["run"], {}) == ["dash-opd"]
    assert label_values(api, defs["module"], {"run": "dash-opd"}) == [
        "mlp.up_proj",
        "self_attn.o_proj",
    ]
    assert label_values(api, defs["layer"], {"run": "dash-opd", "module": ".*"}) == ["0", "1"]


def test_run_level_series_equal_the_api_aggregate(live):
    """What the overview plots is the sidecar's own aggregate, bit for bit."""
    from deltawatch.sidecar.keys import BINDINGS
    from deltawatch.sidecar.metrics import run_metric

    detail = get_json(f"{live['sidecar']}/api/v1/runs/dash-opd")
    aggregate = detail["aggregate"]
    assert aggregate["locked_ratio"] == 1.0, "the OPD-like run locks every matrix"
    compared = 0
    for b in BINDINGS:
        if b.key in ("locked", "step") or aggregate.get(b.key) is None:
            continue
        q = urllib.parse.quote(f'{run_metric(b.metric)}{{run="dash-opd"}}')
        (series,) = get_json(f"{live['api']}/query?query={q}")["data"]["result"]
        assert float(series["value"][1]) == aggregate[b.key], b.key
        compared += 1
    assert compared >= 12


def test_the_rules_file_loads_in_prometheus(live):
    groups = get_json(f"{live['api']}/rules")["data"]["groups"]
    names = {r["name"] for g in groups for r in g["rules"]}
    assert {"DeltawatchSubspaceDrift", "DeltawatchRunStalled"} <= names
    assert all(r["health"] in ("ok", "unknown") for g in groups for r in g["rules"])

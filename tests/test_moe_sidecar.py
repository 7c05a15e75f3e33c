"""MoE expert matrices on the sidecar, on a real `deltawatch serve` fed over real gRPC.

A run of 2 blocks, each with an attention projection and 4 experts × (gate, up, down) named as
DESIGN's MoE contract spells them, reported by real trackers for 2 checks:

* the `expert` of every manifest entry comes back in `/api/v1/runs/{run}` beside `layer` and
  `module`, after a restart too (it is stored);
* `?layer=&module=&expert=` filter the matrices, and `?offset=&limit=` pages are complete, in
  manifest order, without repeats;
* `/api/v1/runs/{run}/modules` gives each (layer, module) the DESIGN §2 aggregate over its
  experts, equal to a float64 recomputation from the per-matrix keys and the reports' counts;
* the default `--metrics-detail matrix` exports per-matrix series for the non-expert matrices
  only and `deltawatch_experts_*{run, layer, module}` for the experts (checked through a real
  Prometheus scraping the sidecar); `--metrics-detail expert` adds every expert's own series;
* a data dir written before the `expert` column existed opens, gains the column (NULL) and
  serves its runs as before.
"""

from __future__ import annotations

import math
import sqlite3

import pytest
from deltawatch.sidecar.engine import MEAN_KEYS, POOLED_KEYS, Engine
from deltawatch.sidecar.keys import BINDINGS
from deltawatch.sidecar.metrics import EXPERTS_MATRICES_METRIC, experts_metric
from deltawatch.sidecar.store import DB_NAME, Store
from prometheus_client.parser import text_string_to_metric_families
from support import PrometheusServer, SidecarProcess, SyntheticRun, expert_manifest, stream_run

LAYERS, EXPERTS, STEPS = 2, 4, 2
RUN = "moe-toy"
EXPERT_SHAPES = {"gate_proj": (24, 40), "up_proj": (24, 40), "down_proj": (40, 24)}


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A sidecar that took the run over one gRPC stream; the run's last reports by matrix."""
    manifest = expert_manifest(LAYERS, EXPERTS, EXPERT_SHAPES, {"self_attn.q_proj": (48, 40)})
    run = SyntheticRun(
        run=RUN,
        shapes={m["matrix"]: tuple(m["shape"]) for m in manifest},
        channel_rank=4,
        oversample=4,
    )
    data = tmp_path_factory.mktemp("moe")
    side = SidecarProcess(data).start()
    checks = stream_run(side.endpoint, run, manifest, list(range(1, STEPS + 1)))
    state = {"side": side, "manifest": manifest, "checks": checks[STEPS], "data": data}
    yield state
    state["side"].kill()


def _pages(side: SidecarProcess, limit: int, **where: str) -> list[dict]:
    """Every matrix through `?offset=&limit=` pages, following next_offset."""
    out, offset = [], 0
    while True:
        body = side.get(f"/api/v1/runs/{RUN}", offset=str(offset), limit=str(limit), **where)
        out += body["matrices"]
        page = body.get("page")
        if page is None or page["next_offset"] is None:
            return out
        assert page["next_offset"] == offset + len(body["matrices"]) and page["limit"] == limit
        offset = page["next_offset"]


def test_expert_labels_round_trip_filters_and_complete_ordered_pages(moe):
    side, manifest = moe["side"], moe["manifest"]
    whole = side.get(f"/api/v1/runs/{RUN}")["matrices"]
    fields = ("matrix", "layer", "module", "expert")
    assert [{k: m[k] for k in fields} for m in whole] == [
        {k: m[k] for k in fields} for m in manifest
    ]
    assert all(m["step"] == STEPS and m["frobenius_norm"] is not None for m in whole)
    for limit in (1, 5, 7):
        assert _pages(side, limit) == whole
    ups = _pages(side, 3, layer="1", module="mlp.experts.up_proj")
    assert [m["matrix"] for m in ups] == [
        f"model.layers.1.mlp.experts.{e}.up_proj.weight" for e in range(EXPERTS)
    ]
    twos = side.get(f"/api/v1/runs/{RUN}", expert="2")
    assert [(m["layer"], m["module"]) for m in twos["matrices"]] == [
        (layer, f"mlp.experts.{p}") for layer in range(LAYERS) for p in EXPERT_SHAPES
    ]
    assert "page" not in twos  # the whole selection fits one page


def _recomputed(members: list[dict], checks: dict) -> dict:
    """DESIGN §2 aggregate in float64 from per-matrix API keys and the reports' exact counts."""
    out = {}
    for key in MEAN_KEYS:
        values = [m[key] for m in members if m[key] is not None]
        out[key] = math.fsum(values) / len(values) if values else None
    for key, (num, den) in POOLED_KEYS.items():
        n = sum(getattr(checks[m["matrix"]], num) for m in members)
        d = sum(getattr(checks[m["matrix"]], den) for m in members)
        out[key] = n / d if d else None
    out["locked_ratio"] = sum(1 for m in members if m["locked"]) / len(members)
    return out


def test_module_aggregates_over_experts_equal_a_float64_recomputation(moe):
    side, checks = moe["side"], moe["checks"]
    whole = side.get(f"/api/v1/runs/{RUN}")["matrices"]
    body = side.get(f"/api/v1/runs/{RUN}/modules")
    groups = {}
    for m in whole:
        groups.setdefault((m["layer"], m["module"]), []).append(m)
    assert [(g["layer"], g["module"]) for g in body["modules"]] == list(groups)
    for g in body["modules"]:
        members = groups[(g["layer"], g["module"])]
        expert = g["module"].startswith("mlp.experts.")
        assert (g["matrices"], g["reported"], g["step"]) == (len(members), len(members), STEPS)
        assert g["experts"] == (EXPERTS if expert else 0)
        want = _recomputed(members, checks)
        for key, value in want.items():
            got = g["aggregate"][key]
            if value is None:
                assert got is None, key
            else:
                assert got == pytest.approx(value, rel=1e-12, abs=1e-300), key
    one = side.get(f"/api/v1/runs/{RUN}/modules", layer="1")["modules"]
    assert [g["module"] for g in one] == [
        "self_attn.q_proj",
        *(f"mlp.experts.{p}" for p in EXPERT_SHAPES),
    ]
    assert all(g["layer"] == 1 for g in one)


def test_default_metrics_aggregate_experts_and_prometheus_scrapes_them(moe, tmp_path):
    side = moe["side"]
    modules = {
        (g["layer"], g["module"]): g for g in side.get(f"/api/v1/runs/{RUN}/modules")["modules"]
    }
    with PrometheusServer(tmp_path, [f"127.0.0.1:{side.http_port}"]) as prometheus:
        prometheus.wait_for_scrapes(2, up=True)
        per_matrix = prometheus.query(f'deltawatch_update_stable_rank{{run="{RUN}"}}')
        assert sorted(i["metric"]["matrix"] for i in per_matrix) == sorted(
            f"model.layers.{layer}.self_attn.q_proj.weight" for layer in range(LAYERS)
        )
        for b in BINDINGS:
            if b.key == "locked":
                continue
            got = {
                (int(i["metric"]["layer"]), i["metric"]["module"]): float(i["value"][1])
                for i in prometheus.query(f'{experts_metric(b.metric)}{{run="{RUN}"}}')
            }
            want = {
                k: float(g["step"] if b.key == "step" else g["aggregate"][b.key])
                for k, g in modules.items()
                if g["experts"] and (b.key == "step" or g["aggregate"][b.key] is not None)
            }
            assert got == pytest.approx(want, rel=1e-12), b.metric
        counted = prometheus.query(f'{EXPERTS_MATRICES_METRIC}{{run="{RUN}"}}')
        assert {float(i["value"][1]) for i in counted} == {float(EXPERTS)} and len(counted) == 6


def test_expert_detail_exports_every_expert_after_a_restart(moe, tmp_path):
    moe["side"].kill()
    side = moe["side"] = SidecarProcess(moe["data"], "--metrics-detail", "expert").start()
    whole = side.get(f"/api/v1/runs/{RUN}")["matrices"]
    assert [m["expert"] for m in whole] == [m["expert"] for m in moe["manifest"]]
    text = side.metrics_text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    samples = [
        s for s in fams["deltawatch_update_frobenius_norm"].samples if s.labels["run"] == RUN
    ]
    by_name = {m["matrix"]: m for m in whole}
    assert len(samples) == len(whole)
    for s in samples:
        m = by_name[s.labels["matrix"]]
        assert s.labels["expert"] == ("" if m["expert"] is None else str(m["expert"]))
        assert s.value == m["frobenius_norm"]


def test_a_data_dir_from_before_the_expert_column_migrates(tmp_path):
    run = SyntheticRun(run="old-run")
    engine = Engine(Store(tmp_path), channel_rank=run.channel_rank)
    run.start(engine)
    for check in run.checks(1):
        engine.ingest(run.run, 1, check)
    before = engine.run_detail(run.run)
    engine.store.close()
    with sqlite3.connect(tmp_path / DB_NAME) as con:  # the manifests table as it was before
        con.execute("ALTER TABLE manifests DROP COLUMN expert")
        assert "expert" not in {r[1] for r in con.execute("PRAGMA table_info(manifests)")}
    side = SidecarProcess(tmp_path).start()
    try:
        after = side.get(f"/api/v1/runs/{run.run}")
    finally:
        side.kill()
    assert after == before and {m["expert"] for m in after["matrices"]} == {None}
    with sqlite3.connect(tmp_path / DB_NAME) as con:
        assert "expert" in {r[1] for r in con.execute("PRAGMA table_info(manifests)")}

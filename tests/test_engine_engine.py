"""The engine on a real store, fed real MatrixChecks from the core's trackers: numbers against the
exact float64 reference, persistence across a new Engine on the same data dir, duplicates,
validation errors that change nothing, resume semantics and run aggregates."""

from __future__ import annotations

import dataclasses
import math
import os
import sqlite3
import statistics

import pytest
import torch
from deltawatch.client.records import ManifestEntry
from deltawatch.sidecar.engine import Engine, aggregate_rows
from deltawatch.sidecar.errors import ValidationError
from deltawatch.sidecar.exact import exact_counts
from deltawatch.sidecar.keys import MATRIX_KEYS
from deltawatch.sidecar.store import Store
from support import SyntheticRun, assert_matches_reference

STEPS = 6


@pytest.fixture(scope="module")
def toy():
    """One synthetic run and its checks for steps 1..STEPS (computed once: trackers are stateful)."""
    run = SyntheticRun(scale=2e-4, noise=2e-6)
    baselines = run.baselines()
    checks = {step: run.checks(step) for step in range(1, STEPS + 1)}
    return run, baselines, checks


def _feed(engine, run, baselines, checks, steps, incarnation=1, resume_step=None):
    engine.hello(run.run, incarnation, resume_step, run.manifest(), run.config())
    for name, sketch in baselines.items():
        engine.baseline(run.run, incarnation, name, sketch)
    for step in steps:
        for check in checks[step]:
            assert engine.ingest(run.run, incarnation, check) is True


# The geometry's device: cpu here; DELTAWATCH_TEST_DEVICE=cuda runs the same tests on a GPU.
DEVICE = os.environ.get("DELTAWATCH_TEST_DEVICE", "cpu")


def _engine(path) -> Engine:
    return Engine(Store(path), channel_rank=8, device=DEVICE)


def _table_counts(path) -> dict[str, int]:
    con = sqlite3.connect(path / "deltawatch.sqlite3")
    try:
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {n: con.execute(f"SELECT COUNT(*) FROM {n}").fetchone()[0] for n in names}
    finally:
        con.close()


@pytest.fixture(scope="module")
def fed(toy, tmp_path_factory):
    run, baselines, checks = toy
    path = tmp_path_factory.mktemp("fed")
    engine = _engine(path)
    _feed(engine, run, baselines, checks, range(1, STEPS + 1))
    return engine, path


def test_engine_numbers_equal_the_exact_reference(toy, fed):
    """Issue-2 bounds, OPD-like after >= 3 checks (see assert_matches_reference)."""
    run, _, checks = toy
    engine, _ = fed
    assert_matches_reference(run, engine.run_detail(run.run)["matrices"], checks, STEPS)


def test_engine_aggregate_follows_design_rules(toy, fed):
    run, _, _ = toy
    engine, _ = fed
    detail = engine.run_detail(run.run)
    agg, mats = detail["aggregate"], detail["matrices"]
    for key in ("stable_rank", "horizon_alignment", "rotation_mean_degrees", "frobenius_norm"):
        values = [m[key] for m in mats if m[key] is not None]
        if not values:  # the rotation is null where its bound cannot certify it
            assert agg[key] is None, key
            continue
        assert agg[key] == pytest.approx(sum(values) / len(values), rel=1e-12)
    counts = [exact_counts(run.W0[n], run.weight(n, STEPS)) for n in run.shapes]
    numel = sum(m * n for m, n in run.shapes.values())
    visible = sum(c["visible"] for c in counts)
    assert agg["bf16_visible_ratio"] == visible / numel
    assert agg["low_magnitude_overlap"] == sum(c["visible_low"] for c in counts) / visible
    assert agg["principal_overlap"] == sum(c["visible_principal"] for c in counts) / visible
    assert agg["locked_ratio"] == 1.0
    assert agg["lock_step"] == statistics.median(m["lock_step"] for m in mats)
    assert set(agg) == {*(k for k in MATRIX_KEYS if k != "locked"), "locked_ratio"}
    assert aggregate_rows([])["stable_rank"] is None and aggregate_rows([])["locked_ratio"] is None


def test_engine_history_holds_every_check(toy, fed):
    run, _, _ = toy
    engine, _ = fed
    name = next(iter(run.shapes))
    hist = engine.history(run.run, name)
    assert hist["matrix"] == name
    assert [p["step"] for p in hist["points"]] == list(range(1, STEPS + 1))
    assert all(set(p) == {"step", *MATRIX_KEYS} for p in hist["points"])
    last = hist["points"][-1]
    detail = {m["matrix"]: m for m in engine.run_detail(run.run)["matrices"]}[name]
    assert {k: last[k] for k in MATRIX_KEYS} == {k: detail[k] for k in MATRIX_KEYS}
    assert engine.history(run.run, "nope") is None
    assert engine.history("nope", name) is None
    assert engine.run_detail("nope") is None


def test_engine_state_survives_a_new_engine_on_the_same_data_dir(toy, fed):
    run, _, _ = toy
    engine, path = fed
    again = _engine(path)
    assert again.run_detail(run.run) == engine.run_detail(run.run)
    for name in run.shapes:
        assert again.history(run.run, name) == engine.history(run.run, name)
    assert again.runs() == engine.runs()
    refs = again.hello(run.run, 1, None, run.manifest(), run.config()).lock_references
    assert set(refs) == set(run.shapes)
    for lock_step, v_ref in refs.values():
        assert lock_step <= STEPS and v_ref.shape[1] == run.channel_rank
    for name, (_, v_ref) in refs.items():  # the geometry keeps V_ref as sent (float32), not twice
        stored = engine.store.load_tensors(run.run, name)["v_ref"]
        assert stored.dtype == torch.float32 and torch.equal(stored, v_ref)


def test_engine_restart_mid_run_continues_exactly(toy, tmp_path):
    """A new Engine on the data dir mid-run (as after kill -9) computes the later checks exactly
    as an uninterrupted engine: the horizon snapshots and lock reference came back."""
    run, baselines, checks = toy
    control = _engine(tmp_path / "control")
    _feed(control, run, baselines, checks, range(1, STEPS + 1))
    first = _engine(tmp_path / "restarted")
    _feed(first, run, baselines, checks, range(1, 4))
    del first  # abandoned without close, as a killed process would
    second = _engine(tmp_path / "restarted")
    for step in range(4, STEPS + 1):
        for check in checks[step]:
            assert second.ingest(run.run, 1, check)
    assert second.run_detail(run.run) == control.run_detail(run.run)
    for name in run.shapes:
        assert second.history(run.run, name) == control.history(run.run, name)


def test_engine_duplicates_are_acknowledged_and_change_nothing(toy, tmp_path):
    run, baselines, checks = toy
    engine = _engine(tmp_path)
    seen = []

    def broken(*event):
        raise RuntimeError("a listener's failure never reaches ingest")

    engine.subscribe(broken)
    engine.subscribe(lambda *event: seen.append(event[:3]))
    _feed(engine, run, baselines, checks, range(1, 3))
    before = (engine.run_detail(run.run), _table_counts(tmp_path), len(seen))
    for step in (1, 2):
        for check in checks[step]:
            assert engine.ingest(run.run, 1, check) is False
    assert (engine.run_detail(run.run), _table_counts(tmp_path), len(seen)) == before
    assert seen[:3] == [(run.run, name, 1) for name in run.shapes]


def _bad_reports(run, check):
    """(name, mutated check or callable, expected code) for one good check."""
    n = check.shape[1]
    up = check.update
    return [
        ("shape", dataclasses.replace(check, shape=(check.shape[0] + 1, n)), "INVALID_ARGUMENT"),
        ("numel", dataclasses.replace(check, numel=check.numel + 1), "INVALID_ARGUMENT"),
        (
            "G rows",
            dataclasses.replace(check, update=dataclasses.replace(up, G=up.G[:-1])),
            "INVALID_ARGUMENT",
        ),
        (
            "C shape",
            dataclasses.replace(check, update=dataclasses.replace(up, C=up.C[:-1])),
            "INVALID_ARGUMENT",
        ),
        (
            "non-finite G",
            dataclasses.replace(
                check, update=dataclasses.replace(up, G=up.G.clone().fill_(float("nan")))
            ),
            "INVALID_ARGUMENT",
        ),
        (
            "non-finite frobenius",
            dataclasses.replace(check, frobenius_sq=math.inf),
            "INVALID_ARGUMENT",
        ),
        ("counts", dataclasses.replace(check, visible_count=check.numel + 1), "INVALID_ARGUMENT"),
        (
            "matrix",
            dataclasses.replace(check, matrix="model.layers.9.x.weight"),
            "INVALID_ARGUMENT",
        ),
        (
            "locked without v_ref",
            dataclasses.replace(check, locked_now=True, lock_step=check.step, v_ref=None),
            "INVALID_ARGUMENT",
        ),
        ("old step", dataclasses.replace(check, step=0), "FAILED_PRECONDITION"),
    ]


def test_engine_validation_errors_change_nothing(toy, tmp_path):
    run, baselines, checks = toy
    engine = _engine(tmp_path)
    with pytest.raises(ValidationError) as e:
        engine.ingest(run.run, 1, checks[1][0])
    assert e.value.code == "FAILED_PRECONDITION" and "before its hello" in e.value.message
    _feed(engine, run, baselines, checks, range(1, 3))
    before = (engine.run_detail(run.run), _table_counts(tmp_path))
    good = checks[3][0]
    for what, bad, code in _bad_reports(run, good):
        with pytest.raises(ValidationError, match=".") as e:
            engine.ingest(run.run, 1, bad)
            pytest.fail(f"{what}: accepted")
        assert e.value.code == code, what
        assert run.run in e.value.message, what
    for inc in (0, 2):  # stale and not-yet-hello incarnations
        with pytest.raises(ValidationError) as e:
            engine.ingest(run.run, inc, good)
        assert e.value.code == "FAILED_PRECONDITION"
    bad_hellos = [
        ("bad name!", 1, run.manifest(), run.config(), "INVALID_ARGUMENT"),
        (run.run, 1, [], run.config(), "INVALID_ARGUMENT"),
        (run.run, 1, run.manifest() * 2, run.config(), "INVALID_ARGUMENT"),
        (run.run, 0, run.manifest(), run.config(), "INVALID_ARGUMENT"),  # 1..2⁶³−1
        (run.run, 1, run.manifest(), {**run.config(), "channel_rank": 4}, "FAILED_PRECONDITION"),
        (
            run.run,
            1,
            [dataclasses.replace(e, shape=(e.shape[1], e.shape[0])) for e in run.manifest()],
            run.config(),
            "FAILED_PRECONDITION",
        ),
        (
            run.run,
            1,
            [dataclasses.replace(run.manifest()[0], numel=5)],
            run.config(),
            "INVALID_ARGUMENT",
        ),
    ]
    for name, inc, manifest, config, code in bad_hellos:
        with pytest.raises(ValidationError) as e:
            engine.hello(name, inc, None, manifest, config)
        assert e.value.code == code, (name, inc, config)
    with pytest.raises(ValidationError):
        bad = dataclasses.replace(baselines[good.matrix], C=baselines[good.matrix].C[:2])
        engine.baseline(run.run, 1, good.matrix, bad)
    assert (engine.run_detail(run.run), _table_counts(tmp_path)) == before
    # the engine still takes the good report afterwards
    assert engine.ingest(run.run, 1, good) is True


def test_engine_resume_replaces_the_old_incarnation_from_the_resume_step(toy, tmp_path):
    """Incarnation 1 reports steps 1..6 and locks at 4; the trainer restarts from a step-3
    checkpoint: incarnation 2 says hello with resume_step 4 and reports 4..6 from new trackers.
    The result equals a run that never had the interruption (steps 1..3, then the new 4..6)."""
    run, baselines, checks = toy
    lock_steps = {c.lock_step for step in checks for c in checks[step] if c.locked_now}
    assert lock_steps and min(lock_steps) >= 3 and max(lock_steps) <= STEPS
    resumed_run = SyntheticRun(scale=2e-4, noise=2e-6, lock_at_step=5)
    new_checks = {step: resumed_run.checks(step) for step in range(4, STEPS + 1)}
    resume = 4

    engine = _engine(tmp_path / "resumed")
    _feed(engine, run, baselines, checks, range(1, STEPS + 1))
    result = engine.hello(run.run, 2, resume, run.manifest(), run.config())
    assert all(step < resume for step, _ in result.lock_references.values())
    assert all(step < resume for step in result.last_steps.values())
    for name in run.shapes:
        assert [p["step"] for p in engine.history(run.run, name)["points"]] == [1, 2, 3]
    for name, sketch in baselines.items():
        engine.baseline(run.run, 2, name, sketch)
    for step in range(resume, STEPS + 1):
        for check in new_checks[step]:
            assert engine.ingest(run.run, 2, check)
    with pytest.raises(ValidationError) as e:  # the old incarnation is stale now
        engine.ingest(run.run, 1, checks[STEPS][0])
    assert e.value.code == "FAILED_PRECONDITION"

    control = _engine(tmp_path / "control")
    _feed(control, run, baselines, checks, range(1, resume))
    for step in range(resume, STEPS + 1):
        for check in new_checks[step]:
            assert control.ingest(run.run, 1, check)
    assert engine.run_detail(run.run) == control.run_detail(run.run)
    for name in run.shapes:
        assert engine.history(run.run, name) == control.history(run.run, name)
    # and the same after a restart of the sidecar
    again = _engine(tmp_path / "resumed")
    assert again.run_detail(run.run) == control.run_detail(run.run)
    assert {m: s for m, (s, _) in again.store.lock_refs(run.run).items()} == {
        c.matrix: c.lock_step for step in new_checks for c in new_checks[step] if c.locked_now
    }
    # killed after the resume's hello was persisted but before the rewind: the restarted engine
    # finishes the rewind from the store, and the new incarnation's checks come out the same
    crashed = _engine(tmp_path / "crashed")
    _feed(crashed, run, baselines, checks, range(1, STEPS + 1))
    crashed.store.save_hello(run.run, 2, resume, run.config(), run.manifest())
    del crashed
    restarted = _engine(tmp_path / "crashed")
    assert all(s < resume for s, _ in restarted.store.lock_refs(run.run).values())
    restarted.hello(run.run, 2, resume, run.manifest(), run.config())  # the trainer's re-hello
    for name, sketch in baselines.items():
        restarted.baseline(run.run, 2, name, sketch)
    for step in range(resume, STEPS + 1):
        for check in new_checks[step]:
            assert restarted.ingest(run.run, 2, check)
    assert restarted.run_detail(run.run) == control.run_detail(run.run)


def test_engine_dropped_reports_and_runs_listing(toy, tmp_path):
    run, baselines, checks = toy
    engine = _engine(tmp_path)
    _feed(engine, run, baselines, checks, range(1, 2))
    engine.record_dropped(run.run, 3)
    engine.record_dropped(run.run, 0)
    with pytest.raises(ValidationError):
        engine.record_dropped("other", 1)
    assert _engine(tmp_path).dropped_reports() == {run.run: 3}
    (item,) = engine.runs()
    assert item["run"] == run.run and item["last_step"] == 1 and item["matrices"] == 3
    assert item["locked_ratio"] == 0.0
    assert item["created_at"].endswith("Z") and item["updated_at"] >= item["created_at"]


def test_engine_unreported_matrices_are_all_null(toy, tmp_path):
    run, _, _ = toy
    engine = _engine(tmp_path)
    extra = ManifestEntry(
        "lm_head.weight", (8, 4), 32, "float32", None, "lm_head.weight", "replicated", 0
    )
    engine.hello(run.run, 1, None, [*run.manifest(), extra], run.config())
    detail = engine.run_detail(run.run)
    assert detail["last_step"] is None
    item = detail["matrices"][-1]
    assert item["layer"] is None and item["module"] == "lm_head.weight"
    assert all(item[k] is None for k in ("step", *MATRIX_KEYS))
    assert all(v is None for v in detail["aggregate"].values())


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_engine_device_option(tmp_path, device):
    engine = Engine(Store(tmp_path), device=device)
    expected = "cuda" if device == "auto" and torch.cuda.is_available() else "cpu"
    assert engine.device.type == expected
    with pytest.raises(ValueError):
        Engine(Store(tmp_path), device="tpu")


def test_engine_zero_update_is_null_and_left_out_of_aggregates(tmp_path):
    """A matrix whose bf16 view has not changed (ΔW = 0): ratios and stable rank are null, the
    aggregate's means ignore it, the pooled visibility counts it with 0 visible weights, and its
    null keys are not exported to Prometheus."""
    from deltawatch.sidecar.metrics import EngineCollector
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    run = SyntheticRun(run="toy-still", scale=2e-4, noise=2e-6)
    still = next(iter(run.shapes))
    engine = _engine(tmp_path)
    run.start(engine)
    for step in (1, 2):
        for name, tr in run.trackers.items():
            W = run.W0[name].clone() if name == still else run.weight(name, step)
            assert engine.ingest(run.run, 1, tr.check(W, step))
    detail = engine.run_detail(run.run)
    rows = {m["matrix"]: m for m in detail["matrices"]}
    zero = rows[still]
    assert zero["frobenius_norm"] == 0.0 and zero["bf16_visible_ratio"] == 0.0
    for key in ("stable_rank", "topk_energy_ratio", "low_magnitude_overlap", "principal_overlap"):
        assert zero[key] is None, key
    others = [m for name, m in rows.items() if name != still]
    agg = detail["aggregate"]
    assert agg["stable_rank"] == pytest.approx(
        sum(m["stable_rank"] for m in others) / len(others), rel=1e-12
    )
    numel = sum(m * n for m, n in run.shapes.values())
    visible = sum(m["bf16_visible_ratio"] * m["shape"][0] * m["shape"][1] for m in others)
    assert agg["bf16_visible_ratio"] == pytest.approx(visible / numel, rel=1e-12)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine))
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    exported = {s.labels["matrix"] for s in families["deltawatch_update_stable_rank"].samples}
    assert exported == {m["matrix"] for m in others}
    frob = {s.labels["matrix"] for s in families["deltawatch_update_frobenius_norm"].samples}
    assert still in frob


def test_group_commit_stores_what_one_by_one_stores_and_refuses_items_alone(toy, tmp_path):
    run, baselines, checks = toy
    alone, grouped = _engine(tmp_path / "alone"), _engine(tmp_path / "grouped")
    _feed(alone, run, baselines, checks, range(1, 4))
    _feed(grouped, run, baselines, checks, [])
    bad = dataclasses.replace(checks[2][0], frobenius_sq=math.inf)
    items = [(run.run, 1, c, 0) for c in checks[1]]
    items += [(run.run, 1, bad, 0), (run.run, 1, checks[1][0], 0)]  # refused; a duplicate
    items += [(run.run, 1, c, 2) for step in (2, 3) for c in checks[step]]  # same matrices again
    results = grouped.ingest_many(items)
    n = len(checks[1])
    assert results[:n] == [True] * n
    assert isinstance(results[n], ValidationError) and "frobenius_sq" in results[n].message
    assert results[n + 1] is False and results[n + 2 :] == [True] * (2 * n)
    assert grouped.run_detail(run.run) == alone.run_detail(run.run)
    for name in run.shapes:
        assert grouped.history(run.run, name) == alone.history(run.run, name)
    assert grouped.dropped_reports() == {run.run: 2 * 2 * n}
    again = _engine(tmp_path / "grouped")  # what the batch committed is what a restart reads
    assert again.run_detail(run.run) == grouped.run_detail(run.run)
    assert again.dropped_reports() == grouped.dropped_reports()

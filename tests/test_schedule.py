"""`Monitor(schedule="spread", weight_every=N)` (client/schedule.py) through a real `deltawatch
serve`: each matrix is checked once per cycle of `every` steps, in its own balanced slot; the W_t
tracker runs in cycles 1, 1 + N, ...; the other checks carry no W_t sketch and their rotation keys
are null (never a stale value); ‖ΔW‖_F and the stable rank match the exact float64 reference at
each matrix's own step; the run aggregate a cycle completes reaches `mon.latest()` labelled with
the cycle's last step and equals the API's aggregate over every matrix's latest report. Then the
same under torchrun (2 ranks, gloo, FSDP2 `fully_shard`): every rank issues the same collectives,
and the sharded run's histories equal the single process's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from deltawatch.client import Monitor
from deltawatch.client.schedule import cycle, cycle_label, slot_of_step, slots, weight_due
from deltawatch.client.sketch import ROUNDING
from deltawatch.sidecar.exact import exact_keys
from deltawatch.sidecar.process import SidecarProcess

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
import sidecar_process as serve  # noqa: E402
from toy import FUSED, Toy, initial_weights, weights_at  # noqa: E402

EVERY, WEIGHT_EVERY, CYCLES = 3, 2, 3
STEPS = EVERY * CYCLES
SETTINGS = dict(
    every=EVERY, schedule="spread", weight_every=WEIGHT_EVERY, channel_rank=4, oversample=4,
    fused=FUSED,
)  # fmt: skip
ROTATION = ("rotation_max_degrees", "rotation_mean_degrees", "spectral_shift_topk")

pytestmark = pytest.mark.timeout(240)


def test_slots_balance_the_parameters_and_cycles_label_their_last_step() -> None:
    costs = [6208, 2048, 2048, 2048, 64, 6208, 6208]  # the toy's matrices
    got = slots(costs, 3)
    assert got == slots(costs, 3)  # deterministic
    load = [sum(c for c, s in zip(costs, got, strict=True) if s == j) for j in range(3)]
    assert max(load) - min(load) <= max(costs)
    assert slots(costs, 1) == [0] * 7 and sorted(slots([5, 5, 5], 3)) == [0, 1, 2]
    assert [cycle(s, 3) for s in range(1, 7)] == [1, 1, 1, 2, 2, 2]
    assert [cycle_label(s, 3) for s in range(1, 7)] == [3, 3, 3, 6, 6, 6]
    assert [slot_of_step(s, 3) for s in range(1, 7)] == [0, 1, 2, 0, 1, 2]
    assert [weight_due(s, 3, 2) for s in (3, 6, 9, 12)] == [True, False, True, False]


def test_keywords_are_validated() -> None:
    with pytest.raises(ValueError, match="schedule='burst' is not one of"):
        Monitor(Toy(), run="x", schedule="burst")
    with pytest.raises(ValueError, match="weight_every must be > 0"):
        Monitor(Toy(), run="x", weight_every=0)


def _toy() -> Toy:
    toy, W0 = Toy(), initial_weights()
    with torch.no_grad():
        for name, p in toy.named_parameters():
            if name in W0:
                p.copy_(W0[name])
    return toy


def point_shape(run: dict, name: str) -> list[int]:
    return next(m["shape"] for m in run["matrices"] if m["matrix"] == name)


def _wait_latest(mon: Monitor, step: int, timeout: float = 30.0) -> dict | None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        latest = mon.latest()
        if latest is not None and latest["step"] >= step:
            return latest
        time.sleep(0.05)
    return mon.latest()


def test_spread_checks_each_matrix_once_per_cycle_exactly(tmp_path: Path) -> None:
    toy, W0 = _toy(), initial_weights()
    params = dict(toy.named_parameters())
    latest = {}
    with SidecarProcess(tmp_path / "data") as side:
        mon = Monitor(toy, run="spread", endpoint=side.endpoint, **SETTINGS)
        for step in range(1, STEPS + 1):
            with torch.no_grad():
                for name, W in weights_at(step, W0).items():
                    params[name].copy_(W)
            mon.step(step)
            if step % EVERY == 0:  # the cycle's last slot: its aggregate comes back
                latest[step] = _wait_latest(mon, step)
        assert mon.close(timeout=30) is True
        assert mon.stats()["errors"] == {} and mon.stats()["dropped_reports"] == 0
        run = side.run("spread")
        histories = {m["matrix"]: side.history("spread", m["matrix"]) for m in run["matrices"]}

    names = [e["matrix"] for e in mon.manifest]
    numel = {e["matrix"]: e["numel"] for e in mon.manifest}
    first = {name: min(h) for name, h in histories.items()}
    # every matrix once per cycle, at its slot's step; every slot used, balanced by parameters
    for name, h in histories.items():
        assert sorted(h) == [first[name] + EVERY * c for c in range(CYCLES)], name
    assert {first[n] for n in names} == set(range(1, EVERY + 1))
    load = [sum(numel[n] for n in names if first[n] == s) for s in range(1, EVERY + 1)]
    assert max(load) - min(load) <= max(numel.values())

    parts = {"q_proj": (0, 32), "k_proj": (32, 64), "v_proj": (64, 96)}
    for name, h in histories.items():
        base, rows = name, None
        for part, r in parts.items():
            if name not in W0 and f".{part}." in name:  # a part of the fused QKV
                base, rows = name.replace(part, "qkv_proj"), r
        for step, point in h.items():
            w0, wt = W0[base], weights_at(step, {base: W0[base]})[base]
            if rows is not None:
                w0, wt = w0[rows[0] : rows[1]], wt[rows[0] : rows[1]]
            ref = exact_keys(w0, wt, channel_rank=4, k_rotation=4)
            where = f"{name} step {step}"
            assert abs(point["frobenius_norm"] / ref["frobenius_norm"] - 1) <= 1e-4, where
            if point["stable_rank"] is not None:
                error = abs(point["stable_rank"] / ref["stable_rank"] - 1)
                assert error <= point["convergence"] + ROUNDING, where
            if weight_due(step, EVERY, WEIGHT_EVERY):  # the W_t tracker ran: null or accurate
                shift, exact = point["spectral_shift_topk"], ref["spectral_shift_topk"]
                # the 1-row gate takes the exact path: its rotation is always known
                assert shift is not None or min(point_shape(run, name)) > 8, where
                assert shift is None or abs(shift - exact) <= 0.02 * exact + ROUNDING, where
            else:  # it did not: null, never the previous check's value
                assert all(point[k] is None for k in ROTATION), (where, point)
    # the aggregate of each cycle, labelled with its last step; the last equals the API's
    assert [latest[s]["step"] for s in sorted(latest)] == [3, 6, 9]
    final = {k: v for k, v in latest[STEPS].items() if k != "step"}
    api = run["aggregate"]
    assert set(final) == set(api)
    for key, value in final.items():
        assert value == api[key] or abs(value - api[key]) <= 1e-12 * abs(api[key]), key
    assert final["spectral_shift_topk"] is not None  # cycle 3 ran the W_t tracker
    assert latest[6]["spectral_shift_topk"] is None  # cycle 2 did not: null, not stale


def test_spread_under_fsdp2_lines_up_on_every_rank(tmp_path: Path) -> None:
    import json

    script = ROOT / "tests" / "dist" / "run_toy.py"
    monitor = json.dumps({k: v for k, v in SETTINGS.items() if k != "fused"} | {"lock_at_step": 4})
    with serve.sidecar(tmp_path) as (endpoint, base):
        args = ["--settings", monitor]
        out, _ = serve.torchrun_beside_reference(
            script, tmp_path / "out", endpoint, "spread", STEPS, ["--modes", "single", *args],
            [(2, ["--modes", "fsdp2", *args])], timeout=200,
        )  # fmt: skip
        names = [e["matrix"] for e in out["single-rank0"]["manifest"]]
        single = {n: serve.get_json(base, f"/runs/spread-single/history?matrix={n}") for n in names}
        fsdp2 = {n: serve.get_json(base, f"/runs/spread-fsdp2/history?matrix={n}") for n in names}
    r0, r1 = out["fsdp2-rank0"], out["fsdp2-rank1"]
    for r in (out["single-rank0"], r0, r1):
        assert r["acknowledged"] is True and r["stats"]["errors"] == {}, r
    assert r0["calls"] and r0["calls"] == r1["calls"]  # the same collectives, in the same order
    compared = 0
    slack = dict.fromkeys(("convergence", "spectral_shift_topk"), ROUNDING)
    for name in names:
        a, b = single[name]["points"], fsdp2[name]["points"]
        assert [p["step"] for p in a] == [p["step"] for p in b] and len(a) == CYCLES, name
        compared += serve.compare_points(a, b, name, 1e-4, slack)
    assert compared > len(names) * CYCLES * 8

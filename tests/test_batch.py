"""Same-shape dense matrices checked as one batch (client/batch.py `MatrixGroup`, the Monitor's
default `batch_matrices=True`).

* a group of dense matrices equals a `MatrixTracker` loop over them, check by check (tracked and
  exact paths, a check where no member moved, a matrix that never moves, checks without the W_t
  tracker, a lock and its channel energy), and the last check equals the float64 reference;
* a real Monitor beside a real `deltawatch serve`: the batched run (`schedule="every"` with
  `weight_every=2` and an audit of every check, and `schedule="spread"`) stores what the
  per-matrix run (`batch_matrices=False`) stores for every matrix at every step within float32
  rounding; its state_dict carries the same bases, and a Monitor loading it continues as the
  original does;
* a batch whose check fails drops every member's check (counted per member, logged once), and
  the members' next checks are exact again.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from deltawatch.client import Monitor
from deltawatch.client.batch import MatrixGroup
from deltawatch.client.collectives import CheckSession
from deltawatch.client.settings import LockSettings, SketchSettings
from deltawatch.client.sketch import ROUNDING, sim_k
from deltawatch.client.tracker import MatrixTracker
from deltawatch.sidecar.exact import exact_keys
from deltawatch.sidecar.process import SidecarProcess
from support import assert_check_is_exact, assert_same_check, packed_trajectory
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
import sidecar_process as serve  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SKETCH = SketchSettings(channel_rank=4, oversample=4)  # r = 8
KEYWORDS = dict(channel_rank=4, oversample=4)
REL = 1e-4
# what a check determines alone (the others compare it with the sidecar's earlier points)
OWN_KEYS = ("step", "frobenius_norm", "spectral_norm", "stable_rank", "topk_energy_ratio",
            "bf16_visible_ratio", "rotation_mean_degrees", "convergence")  # fmt: skip


@pytest.mark.parametrize("shape", [(24, 32), (6, 32)], ids=["tracked", "exact"])
def test_a_dense_group_equals_its_trackers_and_float64(shape):
    B, (m, n), steps, still = 4, shape, 4, 2
    W0, trajectory = packed_trajectory(B, m, n, steps, still)
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(B)]
    lock = LockSettings(at_step=2)
    params = [torch.nn.Parameter(W0[i].clone()) for i in range(B)]

    def trackers() -> list[MatrixTracker]:
        return [
            MatrixTracker.attach(nm, W0[i].clone(), sketch=SKETCH, lock=lock)
            for i, nm in enumerate(names)
        ]

    group = MatrixGroup(trackers(), lambda: [p.detach() for p in params])
    group.batch = 3  # several batches per check
    loop = trackers()
    weights = (True, False, True, False)  # weight_every=2
    trajectory = [W0.clone(), *trajectory]  # step 1: no member moved (frozen weights)
    for t, (W, weight) in enumerate(zip(trajectory, (True, *weights), strict=True), start=1):
        with torch.no_grad():
            for p, w in zip(params, W, strict=True):
                p.copy_(w)
        checks = group.check(t, CheckSession(None, "cpu", step=t), weight)
        assert checks is not None and [c.matrix for c in checks] == names
        for i, (got, tracker) in enumerate(zip(checks, loop, strict=True)):
            ref = tracker.check(W[i].clone(), t, weight=weight)
            assert_same_check(got, ref, f"{names[i]} step {t}")
            assert (got.weight is None) == (not weight)
    locked = [c for c in checks if c.channel_energy_sq is not None]
    assert len(locked) == B - 1  # every moving matrix locked at step 2
    for i, got in enumerate(checks):
        assert_check_is_exact(got, W0[i], trajectory[-1][i], SKETCH.channel_rank)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(48, 40, bias=False)
        self.self_attn.k_proj = nn.Linear(48, 40, bias=False)
        self.self_attn.o_proj = nn.Linear(40, 48, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate = nn.Linear(48, 6, bias=False)  # min(m, n) <= r: the exact path


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([Block() for _ in range(3)])


def _model() -> Model:
    torch.manual_seed(0)
    model = Model()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _update(name: str, shape: torch.Size, step: int) -> torch.Tensor:
    """ΔW_t of one matrix: a rank-2 channel growing with the step plus faint dense noise."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    m, n = shape
    A, B = torch.randn(m, 2, generator=g), torch.randn(2, n, generator=g)
    noise = torch.randn(m, n, generator=torch.Generator().manual_seed(step))
    return step * 2e-3 * (A @ B) + 3e-4 * step**0.5 * noise


def _write(model: Model, W0: dict[str, torch.Tensor], step: int) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(W0[name] + _update(name, p.shape, step))


def _groups(mon: Monitor) -> list[list[str]]:
    return [u.names for units in mon._slots for u in units if isinstance(u, MatrixGroup)]


@pytest.mark.parametrize(
    "settings",
    [dict(every=1, weight_every=2, audit_every=1), dict(every=2, schedule="spread")],
    ids=["every", "spread"],
)
def test_the_batched_monitor_reports_what_each_matrix_would(tmp_path, settings):
    model = _model()
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps, saved = 8, 4
    kw = dict(KEYWORDS, **settings)
    with SidecarProcess(tmp_path / "data") as side:
        batched = Monitor(model, run="batched", endpoint=side.endpoint, **kw)
        alone = Monitor(model, run="alone", endpoint=side.endpoint, batch_matrices=False, **kw)
        resumed = Monitor(model, run="resumed", endpoint=side.endpoint, **kw)  # the same W0
        assert _groups(alone) == []
        grouped = sorted(n for g in _groups(batched) for n in g)
        spread = settings.get("schedule") == "spread"  # groups inside each slot
        assert len(grouped) >= 6 if spread else len(grouped) == 12, grouped
        for step in range(1, saved + 1):
            _write(model, W0, step)
            batched.step(step)
            alone.step(step)
        state, ref_state = batched.state_dict(), alone.state_dict()
        resumed.load_state_dict(state)
        for step in range(saved + 1, steps + 1):
            _write(model, W0, step)
            for mon in (batched, alone, resumed):
                mon.step(step)
        for mon in (batched, alone, resumed):
            assert mon.close(timeout=60) is True
            assert mon.stats()["errors"] == {} and mon.stats()["checks_dropped"] == 0
        names = [e["matrix"] for e in batched.manifest]
        histories = {
            run: {name: side.history(run, name) for name in names}
            for run in ("batched", "alone", "resumed")
        }
        audited = serve.get_json(side.http_url, "/runs/batched")["audit"]["matrices"]
    compared, resumed_h = 0, histories["resumed"]
    for name in names:
        ref, got = histories["alone"][name], histories["batched"][name]
        assert sorted(got) == sorted(ref) and len(got) >= steps // settings["every"], name
        points = [ref[s] for s in sorted(ref)], [got[s] for s in sorted(ref)]
        compared += serve.compare_points(*points, name, REL, {"convergence": ROUNDING})
        later = sorted(s for s in got if s > saved)  # the keys of the check itself
        assert later, name
        pairs = [[{k: p[s][k] for k in OWN_KEYS} for s in later] for p in (got, resumed_h[name])]
        compared += serve.compare_points(*pairs, name, REL, {})
        last = max(got)
        exact = exact_keys(W0[name], W0[name] + _update(name, W0[name].shape, last))
        assert got[last]["frobenius_norm"] == pytest.approx(exact["frobenius_norm"], rel=1e-5)
    assert compared > len(names) * 10
    for name in names:  # the saved bases are the per-matrix run's
        a, b = state["trackers"][name], ref_state["trackers"][name]
        for key in ("V", "V_w"):
            assert sim_k(a[key], b[key]) == pytest.approx(1.0, abs=1e-6), (name, key)
    if settings.get("audit_every"):
        assert len(audited) >= 6  # batched members audited in rotation


def test_a_failed_batch_drops_every_members_check(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAWATCH_FAULT", "start:0:2")  # the first unit checked at step 2
    model = _model()
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with SidecarProcess(tmp_path / "data") as side:
        mon = Monitor(model, run="faulty", endpoint=side.endpoint, every=1, **KEYWORDS)
        first = mon._slots[0][0]
        assert isinstance(first, MatrixGroup) and len(first.names) == 6  # q_proj, k_proj x 3
        for step in (1, 2, 3):
            _write(model, W0, step)
            mon.step(step)
        assert mon.close(timeout=60) is True
        stats = mon.stats()
        histories = {e["matrix"]: side.history("faulty", e["matrix"]) for e in mon.manifest}
    assert stats["checks_dropped"] == 6
    assert stats["errors"] == {"check_failed_InjectedFault": 1, "check_dropped": 1}
    for name, h in histories.items():
        assert sorted(h) == ([1, 3] if name in first.names else [1, 2, 3]), name
        exact = exact_keys(W0[name], W0[name] + _update(name, W0[name].shape, 3))
        assert h[3]["frobenius_norm"] == pytest.approx(exact["frobenius_norm"], rel=1e-5)

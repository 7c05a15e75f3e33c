"""A check that fails on one rank is dropped on every rank, and training goes on (DESIGN §3).

One real `deltawatch serve`; one `torchrun --standalone --nproc-per-node 2` (gloo, CPU) feeds
tests/dist/toy.py's trajectory through FSDP2, tensor parallel and DDP while the DELTAWATCH_FAULT
seam makes one rank fail: at the start of a check (step 2), right after the statistics all-reduce
(step 3), inside a power step as a real allocation failure (step 4: torch is asked for a 4 EiB
tensor) and after the last collective of the last matrix (step 5), alternating ranks; then trains
the tensor-parallel toy with `enforce_channel=True` while one rank's projection fails. One plain
process is the reference: the same trajectory with the same checks dropped (the same fault plan
on its only rank). Both ranks must finish; the dropped checks must be counted on every rank (DDP:
only where they failed, there is no collective to agree on); every later check must arrive and
equal the reference within 1e-4 relative (a dropped check leaves the bases and the lock as they
were); the collectives stay identical on both ranks; the owner's dropped reports reach the
sidecar's `deltawatch_client_dropped_reports_total`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from deltawatch.client.sketch import ROUNDING
from support import sidecar_fixture

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
import sidecar_process as serve  # noqa: E402

SCRIPT = ROOT / "tests" / "dist" / "run_faults.py"
STEPS = 6
REL = 1e-4
# the matrices in selection order (tests/dist/toy.py, fused QKV split): 0 is the first checked,
# 6 the last; DDP's rank 0 computes 0, 2, 4, 6 (the reference's first and last), rank 1 1, 3, 5
FIRST, LAST = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"
DDP_RANK1_FIRST = "model.layers.0.mlp.down_proj.weight"


def plan(ranks: tuple[int, int, int, int]) -> str:
    """start at step 2, after_stats at 3, a real allocation failure in a power step at 4, the
    last matrix at 5, on the given ranks."""
    points = ("start", "after_stats", "power_step", "last_matrix")
    entries = [f"{p}:{r}:{s}" for p, r, s in zip(points, ranks, (2, 3, 4, 5), strict=True)]
    entries[2] += ":alloc"
    return ",".join(entries)


PLANS = {
    "fsdp2": plan((1, 0, 1, 1)),
    "tp": plan((0, 1, 0, 0)),
    "ddp": plan((0, 0, 0, 0)) + ",power_step:1:6",  # rank 1: its first matrix at the last step
    "tp_project": "project:1:3",
}
REFERENCE = {"single": plan((0, 0, 0, 0))}
DROPPED = {(FIRST, 2), (FIRST, 3), (FIRST, 4), (LAST, 5)}  # every rank, every check mode

pytestmark = pytest.mark.timeout(300)


sidecar = sidecar_fixture()


@pytest.fixture(scope="module")
def runs(sidecar, tmp_path_factory):
    """The reference process and the torchrun job side by side; every rank's output."""
    out = tmp_path_factory.mktemp("ranks")
    reference = ["--faults", json.dumps(REFERENCE)]
    jobs = [(2, ["--faults", json.dumps(PLANS)])]
    return serve.torchrun_beside_reference(
        SCRIPT, out, sidecar.endpoint, "faults", STEPS, reference, jobs, timeout=240
    )


def test_both_ranks_finish_and_count_every_dropped_check(runs):
    ranks, _ = runs
    expected = {"fsdp2": (4, 4), "tp": (4, 4), "ddp": (4, 1)}  # DDP: no agreement, no collective
    for mode, counts in expected.items():
        for k, count in enumerate(counts):
            r = ranks[f"{mode}-rank{k}"]
            assert r["acknowledged"] is True, r
            assert r["stats"]["checks_dropped"] == count, (mode, k, r["stats"])
            errors = r["stats"]["errors"]
            assert errors.pop("check_dropped") == count, (mode, k, errors)
            # what failed here: the injected raises, and the allocator's own error
            failed_here = PLANS[mode].count(f":{k}:")
            assert sum(errors.values()) == failed_here, (mode, k, errors)
            if f"power_step:{k}:4:alloc" in PLANS[mode]:
                assert errors.get("check_failed_RuntimeError") == 1, errors
    assert ranks["single-rank0"]["stats"]["checks_dropped"] == 4


def test_the_failure_is_logged_once_per_kind(runs):
    _, log = runs
    assert "can't allocate memory" in log  # torch's own allocation failure ran
    assert log.count("dropped the check of") == 6  # once per Monitor: 2 ranks x 3 modes
    assert "logged once" in log


@pytest.mark.parametrize("mode", ("fsdp2", "tp", "ddp"))
def test_later_checks_arrive_and_equal_the_reference(runs, sidecar, mode):
    """Every kept check is stored; values equal the single process with the same drops, so a
    dropped check changed neither the bases nor the lock (matrix 0 locks at step 5 in both)."""
    matrices = [m["matrix"] for m in sidecar.run("faults-single")["matrices"]]
    assert len(matrices) == 7 and (matrices[0], matrices[-1]) == (FIRST, LAST)
    dropped = set(DROPPED) | ({(DDP_RANK1_FIRST, 6)} if mode == "ddp" else set())
    compared = 0
    for name in matrices:
        ref = sidecar.history("faults-single", name)
        got = sidecar.history(f"faults-{mode}", name)
        assert sorted(got) == [s for s in range(1, STEPS + 1) if (name, s) not in dropped], name
        assert sorted(ref) == [s for s in range(1, STEPS + 1) if (name, s) not in DROPPED], name
        # the error bound subtracts Ritz values: meaningful to float32 rounding only
        points = [ref[s] for s in sorted(got)], [got[s] for s in sorted(got)]
        compared += serve.compare_points(*points, f"{mode} {name}", REL, {"convergence": ROUNDING})
    assert sidecar.history(f"faults-{mode}", FIRST)[5]["lock_step"] == 5
    assert compared > 7 * 4 * 10


@pytest.mark.parametrize("mode", ("fsdp2", "tp"))
def test_the_ranks_stay_in_lockstep(runs, mode):
    ranks, _ = runs
    assert ranks[f"{mode}-rank0"]["calls"] == ranks[f"{mode}-rank1"]["calls"]


def test_dropped_reports_reach_the_sidecar(sidecar):
    """The owner counts each report of a dropped check; the count travels with its next report
    (DDP: rank 0's four, and rank 1's own drop at step 6, carried by its next matrix's report)."""
    text = sidecar.metrics_text()
    for run, count in (("single", 4), ("fsdp2", 4), ("tp", 4), ("ddp", 5)):
        pattern = rf'deltawatch_client_dropped_reports_total{{run="faults-{run}"}} (\S+)'
        found = re.search(pattern, text)
        assert found and float(found.group(1)) == count, (run, found)


def test_a_failed_projection_is_left_out_on_every_rank(runs):
    """enforce_channel under tensor parallel (columns split: the projection all-reduces over
    them): rank 1 fails projecting the first matrix at optimizer step 3; both ranks leave that
    gradient as it is (its update leaves the channel at that step only), every other update of a
    locked matrix stays in the channel, and training goes on."""
    ranks, _ = runs
    r0, r1 = ranks["tp_project-rank0"], ranks["tp_project-rank1"]
    assert r0["residuals"] == r1["residuals"]
    for r in (r0, r1):
        assert r["stats"]["projections_dropped"] == 1 and r["acknowledged"] is True
    for name, residual in r0["residuals"].items():
        assert residual[0] is None  # not locked before the first check
        for step, value in enumerate(residual[1:], start=2):
            if (name, step) == (FIRST, 3):
                assert value > 0.5, residual
            else:
                assert value < 1e-5, (name, step, residual)


def test_a_malformed_fault_plan_is_refused():
    from deltawatch.client.collectives import FaultPlan

    assert FaultPlan.from_env({}) is None
    with pytest.raises(ValueError, match="POINT:RANK:STEP"):
        FaultPlan.from_env({"DELTAWATCH_FAULT": "middle:0:2"})
    assert FaultPlan.from_env({"DELTAWATCH_FAULT": "start:0:2,power_step:1:3:alloc"}).faults == {
        ("start", 2): False
    }


@pytest.mark.parametrize("point", ("start", "after_stats", "power_step", "last_matrix"))
def test_a_dropped_check_leaves_the_tracker_as_it_was(point):
    """Single process: a check failing at any point returns None and changes nothing, so the next
    check equals that of a twin tracker that never saw the failed one."""
    import torch
    from deltawatch.client.collectives import CheckSession, FaultPlan
    from deltawatch.client.settings import LockSettings, SketchSettings
    from deltawatch.client.tracker import MatrixTracker

    g = torch.Generator().manual_seed(5)
    W0 = torch.randn(80, 48, generator=g) * 0.05
    steps = [W0 + 1e-2 * k * torch.randn(80, 48, generator=g) for k in range(1, 4)]
    kw = dict(sketch=SketchSettings(channel_rank=4, oversample=4), lock=LockSettings(at_step=2))
    a, b = MatrixTracker.attach("m", W0, **kw), MatrixTracker.attach("m", W0, **kw)
    for t in (a, b):
        t.check(steps[0], 1)
    faults = FaultPlan({(point, 2): point == "power_step"})  # power_step: a real allocation
    failing = CheckSession(None, "cpu", step=2, faults=faults, last=True)
    before = a.state_dict()
    assert a.check(steps[1], 2, failing) is None and failing.failure is not None
    after = a.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if torch.is_tensor(before[k]))
    assert a.lock_step is None  # the dropped check would have locked (lock_at_step=2)
    ca, cb = a.check(steps[2], 3), b.check(steps[2], 3)
    assert torch.equal(ca.update.G, cb.update.G) and ca.lock_step == cb.lock_step == 3

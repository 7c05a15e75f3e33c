"""Sharded trainers report the same geometry as a single process, through a real sidecar.

One real `deltawatch serve` process; one plain process feeds the toy trajectory (tests/dist/toy.py)
through a Monitor; one `torchrun --standalone --nproc-per-node 2` (gloo, CPU) feeds the same
trajectory through FSDP2 `fully_shard` (Shard(0), uneven and empty blocks, a fused QKV split
across ranks), tensor parallel `RowwiseParallel` (Shard(1), uneven columns) and DDP (replicated),
FSDP1 (use_orig_params False with a unit per block, True with one root unit and SHARD_GRAD_OP)
and DeepSpeed ZeRO-3 (flat slices); a 4-rank torchrun does the same on a 2 x 2 (dp, tp) mesh:
FSDP2 over colwise/rowwise tensor parallel (`_StridedShard` rows, and row+column blocks), HSDP
(2 replicas of 2 shards: `(Replicate(), Shard(0))`) and FSDP1 HYBRID_SHARD. The flat modes then
take one real optimizer step, checked against the framework's own gathered weights. Every key read back over the sidecar's HTTP API must equal the single-process
value within 1e-4 relative; no collective issued during a check may move O(m·n) elements; both
ranks must issue the same sequence of collectives; DDP issues none.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from deltawatch.client.sketch import ROUNDING
from support import sidecar_fixture

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
import sidecar_process as serve  # noqa: E402

SCRIPT = ROOT / "tests" / "dist" / "run_toy.py"
MODES = ("fsdp2", "tp", "ddp")  # torchrun, 2 ranks
MESH_2D = "fsdp2_tp"  # torchrun, 4 ranks: a 2 x 2 (dp, tp) mesh
HSDP = "hsdp"  # torchrun, 4 ranks: 2 replicas x 2 shards
FLAT_2 = ("fsdp1", "fsdp1_orig", "zero3")  # flat shards, 2 ranks (tests/dist/run_toy.py)
FLAT_4 = ("fsdp1_hybrid",)  # 4 ranks: HYBRID_SHARD, 2 replicas x 2 shards
FLAT = FLAT_2 + FLAT_4
WORLD = {"single": 1, "fsdp2": 2, "tp": 2, "ddp": 2, MESH_2D: 4, HSDP: 4}
WORLD |= dict.fromkeys(FLAT_2, 2) | dict.fromkeys(FLAT_4, 4)
DOWN = "fsdp2_down"  # fsdp2 with rank 1's sidecar down
R = 4 + 4  # K + p (channel_rank + oversample) in tests/dist/run_toy.py MONITOR
STEPS = 5
REL = 1e-4
# the error bound is meaningful to float32 rounding only (sketch.ROUNDING): it subtracts Ritz
# values, so the sharded sums' rounding moves it by more than REL of a small value
BOUND_ABS = ROUNDING

pytestmark = pytest.mark.timeout(400)


sidecar = sidecar_fixture()


@pytest.fixture(scope="module")
def runs(sidecar, tmp_path_factory):
    """Run the single-process reference and the torchrun job side by side; their outputs."""
    out = tmp_path_factory.mktemp("ranks")
    jobs = [
        (nproc, ["--modes", ",".join(modes)])
        for nproc, modes in ((2, (*MODES, DOWN, *FLAT_2)), (4, (MESH_2D, HSDP, *FLAT_4)))
    ]
    result, _ = serve.torchrun_beside_reference(
        SCRIPT, out, sidecar.endpoint, "toy", STEPS, ["--modes", "single"], jobs, timeout=360
    )
    return result


def _history(sidecar, run: str, matrix: str) -> list[dict]:
    return list(sidecar.history(run, matrix).values())


def test_every_rank_delivered_every_report(runs):
    for mode in ("single", *MODES, MESH_2D, HSDP, *FLAT):
        for k in range(WORLD[mode]):
            r = runs[f"{mode}-rank{k}"]
            assert r["acknowledged"] is True, r
            assert r["stats"]["errors"] == {}, r["stats"]
            assert r["stats"]["dropped_reports"] == 0


@pytest.mark.parametrize("mode", (*MODES, MESH_2D, HSDP, *FLAT))
def test_sharded_geometry_equals_single_process(runs, sidecar, mode):
    single = sidecar.run("toy-single")
    sharded = sidecar.run(f"toy-{mode}")
    names = sorted(m["matrix"] for m in single["matrices"])
    assert names == sorted(m["matrix"] for m in sharded["matrices"])
    assert len(names) == 7  # 5 weights, the fused QKV split into q/k/v
    assert single["last_step"] == STEPS
    assert sharded["last_step"] == STEPS + (mode in FLAT)  # flat: one real optimizer step more
    by_name = {m["matrix"]: m for m in sharded["matrices"]}
    for m in single["matrices"]:
        assert (by_name[m["matrix"]]["layer"], by_name[m["matrix"]]["module"]) == (
            m["layer"],
            m["module"],
        )
    compared = 0
    for name in names:
        a = _history(sidecar, "toy-single", name)
        b = [p for p in _history(sidecar, f"toy-{mode}", name) if p["step"] <= STEPS]
        assert [p["step"] for p in a] == [p["step"] for p in b] == list(range(1, STEPS + 1))
        compared += serve.compare_points(a, b, f"{mode} {name}", REL, {"convergence": BOUND_ABS})
    assert compared > 7 * STEPS * 10


@pytest.mark.parametrize("mode", ("fsdp2", "tp", MESH_2D, HSDP, *FLAT))
def test_no_collective_moves_a_matrix(runs, mode):
    """Every collective of a check is O((m+n)·r): P (m×r), G (n×r), C (r×r), counts, norms."""
    ranks = [runs[f"{mode}-rank{k}"] for k in range(WORLD[mode])]
    r0 = ranks[0]
    shapes = [tuple(e["shape"]) for e in r0["manifest"]]
    bound = max((m + n) * R for m, n in shapes)
    smallest_tracked = min(m * n for m, n in shapes if min(m, n) > R)
    assert bound < smallest_tracked  # the sizes make the test meaningful
    assert r0["calls"], "a sharded check must reduce something"
    assert max(numel for r in ranks for _, numel in r["calls"]) <= bound
    # the same collectives in the same order on every rank; on a 1-D mesh the same sizes too (on
    # the 2 x 2 mesh sizes differ between groups: G's all-reduce over dp is n_local x r, 49 or 48
    # columns; gloo itself fails a collective whose sizes differ inside one group)
    for r in ranks[1:]:
        assert [name for name, _ in r["calls"]] == [name for name, _ in r0["calls"]]
        if mode in ("fsdp2", "tp", *FLAT):  # flat: P (m×r) and G (n×r) whole on every rank
            assert r["calls"] == r0["calls"]


def test_ddp_has_no_collectives_and_spreads_the_work(runs):
    r0, r1 = runs["ddp-rank0"], runs["ddp-rank1"]
    assert r0["calls"] == [] and r1["calls"] == []
    names = [e["matrix"] for e in r0["manifest"]]
    assert [e["owner_rank"] for e in r0["manifest"]] == [i % 2 for i in range(len(names))]
    assert {e["shard_layout"] for e in r0["manifest"]} == {"replicated"}
    assert r0["computed"] == names[0::2] and r1["computed"] == names[1::2]


def test_sharded_layouts_and_owners(runs):
    fsdp, tp = runs["fsdp2-rank0"]["manifest"], runs["tp-rank1"]["manifest"]
    assert {e["shard_layout"] for e in fsdp} == {"rows"}
    assert {e["shard_layout"] for e in tp} == {"cols"}
    assert [e["owner_rank"] for e in fsdp] == [i % 2 for i in range(len(fsdp))]
    # every rank computes every sharded matrix (the collectives need all of them)
    assert len(runs["fsdp2-rank1"]["computed"]) == len(fsdp)
    # FSDP2 over tensor parallel: colwise weights are rows split over both mesh dimensions
    # (_StridedShard), rowwise ones rows over dp and columns over tp; owners spread over 4 ranks
    mesh = runs[f"{MESH_2D}-rank3"]["manifest"]
    layouts = {e["module"]: e["shard_layout"] for e in mesh}
    assert layouts["mlp.down_proj"] == "rows+cols"
    assert layouts["self_attn.q_proj"] == layouts["self_attn.v_proj"] == "rows"
    assert [e["owner_rank"] for e in mesh] == [i % 4 for i in range(len(mesh))]


@pytest.mark.parametrize("mode", FLAT)
def test_flat_shards_read_the_weights_the_optimizer_stepped(runs, sidecar, mode):
    """After the written trajectory, one real optimizer step (torch SGD through FSDP1; DeepSpeed's
    engine.step() for ZeRO-3) and a check: ‖ΔW‖_F within 1e-4 relative and the bf16-visible ratio
    exactly the float64 values from the framework's own gathered weights (summon_full_params,
    GatheredParameters); layouts are "flat" under the original names."""
    r0 = runs[f"{mode}-rank0"]
    assert {e["shard_layout"] for e in r0["manifest"]} == {"flat"}
    assert [e["owner_rank"] for e in r0["manifest"]] == [i % WORLD[mode] for i in range(7)]
    exact = r0["after_step"]
    assert sorted(exact) == sorted(e["matrix"] for e in r0["manifest"])
    moved = 0
    for name, ref in exact.items():
        got = next(p for p in _history(sidecar, f"toy-{mode}", name) if p["step"] == STEPS + 1)
        where = f"{mode} {name}: {got} vs {ref}"
        assert abs(got["frobenius_norm"] - ref["frobenius_norm"]) <= REL * ref["frobenius_norm"]
        assert got["bf16_visible_ratio"] == ref["bf16_visible_ratio"], where
        stepped = _history(sidecar, f"toy-{mode}", name)[STEPS - 1]["frobenius_norm"]
        moved += got["frobenius_norm"] != stepped
    assert moved == len(exact)  # the step changed every matrix: the check saw the new weights


def test_a_sidecar_down_on_one_node_never_stalls_the_job(runs, sidecar):
    """Rank 1's sidecar refuses connections (the Monitor's connect timeout is 20 s): every step of
    both ranks still returns far below it, the collectives stay in lockstep (the job finished),
    and rank 0's matrices arrive at every step."""
    r0, r1 = runs[f"{DOWN}-rank0"], runs[f"{DOWN}-rank1"]
    assert max(r0["step_seconds"] + r1["step_seconds"]) < 5.0
    assert r0["acknowledged"] is True
    assert r1["acknowledged"] is False and r1["stats"]["unacknowledged"] > 0
    assert r0["calls"] == r1["calls"]
    detail = sidecar.run(f"toy-{DOWN}")
    owned_by_0 = sorted(e["matrix"] for e in r0["manifest"] if e["owner_rank"] == 0)
    arrived = sorted(m["matrix"] for m in detail["matrices"] if m["step"] is not None)
    assert arrived == owned_by_0
    for name in owned_by_0:
        assert [p["step"] for p in _history(sidecar, f"toy-{DOWN}", name)] == [1, 2, 3, 4, 5]

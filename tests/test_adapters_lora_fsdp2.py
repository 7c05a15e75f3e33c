"""PEFT LoRA under FSDP2 reports what one process reports, through a real sidecar.

One real `deltawatch serve`; one plain process fine-tunes tests/dist/run_lora.py's LoRA Qwen3
(two adapters, a 97-row gate_proj, an r = 1 adapter) with a Monitor; one `torchrun --standalone
--nproc-per-node 2` (gloo, CPU) fine-tunes the same model under FSDP2 `fully_shard`, every base
weight and factor a Shard(0) DTensor, on the same batches (so the trajectories are bit-identical).
Each also runs once more with a DELTAWATCH_FAULT plan (torchrun: rank 1 fails at the start of a
check, rank 0 runs out of memory inside a power step). Checked: FSDP2 chunks lora_B's rows as the
base weight's (uneven 49 + 48, an empty lora_A block on rank 1); the same names and every key
within 1e-4 relative of the single process; ‖ΔW‖_F, σ1 and the stable rank equal to float64
s·B·A from the final factors, the bf16-visible ratio to PEFT's own merged weights; no collective
of a check above (m+n)·r elements and the same collectives on both ranks; a failing rank drops
the check on both and training goes on; unsupported layouts are refused with the reason.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from deltawatch.client.sketch import ROUNDING
from support import sidecar_fixture

pytest.importorskip("peft")  # the "peft" extra
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
import sidecar_process as serve  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

SCRIPT = ROOT / "tests" / "dist" / "run_lora.py"
STEPS = 4
REL = 1e-4
R = 4 + 4  # channel_rank + oversample in run_lora.MONITOR
FIRST = "model.layers.0.self_attn.q_proj.weight"  # the first matrix each check reaches
SINGLE = {"single": "", "single_faults": "start:0:2,power_step:0:3:alloc"}
FSDP2 = {"fsdp2": "", "fsdp2_faults": "start:1:2,power_step:0:3:alloc"}
DROPPED = {(FIRST, 2), (FIRST, 3)}
ADAPTED = {  # module: active adapters (run_lora.ADAPTERS)
    "self_attn.q_proj": ("default", "second"),
    "self_attn.v_proj": ("default",),
    "mlp.gate_proj": ("default", "second"),
    "mlp.down_proj": ("default",),
}
# both are meaningful to float32 rounding only: the error bound subtracts Ritz values, and the
# top-k shift is a small difference of σ's from float32 products (docs/geometry.md "Known limit")
SLACK = {"convergence": ROUNDING, "spectral_shift_topk": ROUNDING}
NAMES = sorted(f"model.layers.{i}.{mod}.weight" for i in (0, 1) for mod in ADAPTED)

pytestmark = pytest.mark.timeout(180)


sidecar = sidecar_fixture()


@pytest.fixture(scope="module")
def runs(sidecar, tmp_path_factory):
    """The single-process runs and the torchrun job side by side: ({file stem: JSON}, out dir)."""
    out = tmp_path_factory.mktemp("ranks")
    reference = ["--faults", json.dumps(SINGLE)]
    jobs = [(2, ["--faults", json.dumps(FSDP2), "--refusals"])]
    outputs, _ = serve.torchrun_beside_reference(
        SCRIPT, out, sidecar.endpoint, "lora", STEPS, reference, jobs, timeout=150
    )
    return outputs, out


def _param(matrix: str, what: str) -> str:
    """The PEFT parameter name of `matrix`'s base weight (what="base_layer") or of a factor
    (what="lora_A.default", ...)."""
    return "base_model.model." + matrix.removesuffix(".weight") + f".{what}.weight"


def _compare(sidecar, run_a: str, run_b: str, dropped: set) -> int:
    """Every key of every stored check of run_b equals run_a's within REL; the steps are 1..STEPS
    less `dropped`. Returns how many numbers were compared."""
    compared = 0
    for name in NAMES:
        a, b = sidecar.history(run_a, name), sidecar.history(run_b, name)
        steps = [s for s in range(1, STEPS + 1) if (name, s) not in dropped]
        assert sorted(a) == sorted(b) == steps, (run_a, run_b, name)
        points = [a[s] for s in steps], [b[s] for s in steps]
        compared += serve.compare_points(*points, f"{run_a} vs {run_b} {name}", REL, SLACK)
    return compared


def test_fsdp2_splits_lora_B_by_the_base_weights_rows(runs):
    """fully_shard chunks dim 0 of W0 [m, n] and of lora_B [m, r] by the same torch.chunk rule
    (uneven 97 rows: 49 + 48; FSDP2's padding stays out of the local tensor), and lora_A [r, n] by
    its r rows (3 = 2 + 1; r = 1 leaves rank 1 an empty block); every local block is those rows of
    DTensor's own full_tensor()."""
    ranks, _ = runs
    for k in (0, 1):
        blocks = ranks[f"fsdp2-rank{k}"]["blocks"]
        assert blocks and all(b["matches"] for b in blocks.values()), blocks
        for module, adapters in ADAPTED.items():
            matrix = f"model.layers.0.{module}.weight"
            W = blocks[_param(matrix, "base_layer")]
            assert W["local_shape"] == [W["rows"][1] - W["rows"][0], W["shape"][1]]
            for a in adapters:
                assert blocks[_param(matrix, f"lora_B.{a}")]["rows"] == W["rows"]
        gate = "model.layers.0.mlp.gate_proj.weight"
        assert blocks[_param(gate, "base_layer")]["rows"] == ([0, 49], [49, 97])[k]
        assert blocks[_param(gate, "lora_A.default")]["local_shape"] == ([2, 64], [1, 64])[k]
        assert blocks[_param(gate, "lora_A.second")]["local_shape"] == ([1, 64], [0, 64])[k]


def test_every_rank_delivered_every_report(runs):
    ranks, _ = runs
    for run in ("single-rank0", "fsdp2-rank0", "fsdp2-rank1"):
        r = ranks[run]
        assert r["acknowledged"] is True, r
        assert r["stats"]["errors"] == {} and r["stats"]["dropped_reports"] == 0, r["stats"]
    manifest = ranks["fsdp2-rank0"]["manifest"]
    names = [e["matrix"] for e in manifest]
    assert names == [e["matrix"] for e in ranks["single-rank0"]["manifest"]]  # the same order
    assert sorted(names) == NAMES  # base names, no factors
    assert {e["shard_layout"] for e in manifest} == {"rows"}
    assert [e["owner_rank"] for e in manifest] == [i % 2 for i in range(len(NAMES))]
    assert len(ranks["fsdp2-rank1"]["computed"]) == len(NAMES)  # every rank computes


def test_the_fsdp2_fine_tune_equals_the_single_process(runs, sidecar):
    """The same trajectory (final factors bit-identical), the same names, every key of every
    check within 1e-4 relative."""
    _, out = runs
    single, sharded = load_file(out / "single.safetensors"), load_file(out / "fsdp2.safetensors")
    factors = [n for n in single if ".lora_" in n and not n.startswith("merged.")]
    assert len(factors) == 2 * 2 * 6  # A and B, 2 blocks, 6 adapted (layer, adapter) pairs
    assert all(torch.equal(single[n], sharded[n]) for n in factors)
    assert all(single[n].abs().max() > 0 for n in factors if ".lora_B." in n)  # B moved from 0
    stored = sidecar.run("lora-fsdp2")["matrices"]
    assert sorted(m["matrix"] for m in stored) == NAMES
    assert _compare(sidecar, "lora-single", "lora-fsdp2", set()) > len(NAMES) * STEPS * 10


@pytest.mark.parametrize("mode", ("single", "fsdp2"))
def test_the_update_is_sBA_and_the_counts_those_of_the_merged_weights(runs, sidecar, mode):
    """At the last step: ‖ΔW‖_F equals float64 ‖Σ s·B·A‖_F from the final factors (1e-9
    relative), σ1 and the stable rank within 1e-4 (rank ΔW ≤ 4 < r = 8: the sketch spans it), and
    the bf16-visible ratio is exactly that of PEFT's merged weights against W0."""
    _, out = runs
    state = load_file(out / f"{mode}.safetensors")
    merged = load_file(out / "single.safetensors")
    for name in NAMES:
        layer = "base_model.model." + name.removesuffix(".weight")
        D = 0
        for a in ADAPTED[name.split(".", 3)[3].removesuffix(".weight")]:
            B, A = state[f"{layer}.lora_B.{a}.weight"], state[f"{layer}.lora_A.{a}.weight"]
            D = D + state[f"{layer}.scaling.{a}"] * (B.double() @ A.double())
        sigma = torch.linalg.svdvals(D)
        got = sidecar.history(f"lora-{mode}", name)[STEPS]
        assert got["frobenius_norm"] == pytest.approx(D.norm().item(), rel=1e-9), name
        assert got["spectral_norm"] == pytest.approx(sigma[0].item(), rel=1e-4), name
        stable = (D.norm() ** 2 / sigma[0] ** 2).item()
        assert got["stable_rank"] == pytest.approx(stable, rel=1e-4), name
        W0 = state[_param(name, "base_layer")].to(torch.bfloat16).view(torch.int16)
        visible = merged[f"merged.{name}"].to(torch.bfloat16).view(torch.int16) != W0
        assert 0 < visible.sum() < D.numel(), name
        assert got["bf16_visible_ratio"] == visible.sum().item() / D.numel(), name


def test_no_collective_moves_a_matrix(runs):
    """Every collective of a check is O((m+n)·r): each lora_A is assembled whole (r_a·n: 3 x 97
    for down_proj's), never W0 or lora_B; both ranks issue the same collectives."""
    ranks, _ = runs
    r0, r1 = ranks["fsdp2-rank0"], ranks["fsdp2-rank1"]
    shapes = [tuple(e["shape"]) for e in r0["manifest"]]
    bound = max((m + n) * R for m, n in shapes)
    assert bound < min(m * n for m, n in shapes)  # the sizes make the test meaningful
    assert ("all_reduce", 3 * 97) in [tuple(c) for c in r0["calls"]]
    assert max(numel for _, numel in r0["calls"] + r1["calls"]) <= bound
    assert r0["calls"] == r1["calls"]


def test_a_fault_on_one_rank_leaves_training_running(runs, sidecar):
    """Rank 1 fails at the start of the first check of step 2 (before the factors are gathered),
    rank 0 runs out of memory in a power step at step 3: both ranks drop those two checks, train
    on (final factors those of the run without faults), stay in lockstep, and every other check
    equals the single process under the same plan."""
    ranks, out = runs
    for k in (0, 1):
        r = ranks[f"fsdp2_faults-rank{k}"]
        assert r["acknowledged"] is True, r
        assert r["stats"]["checks_dropped"] == 2, r["stats"]
        errors = dict(r["stats"]["errors"])
        assert errors.pop("check_dropped") == 2, errors
        assert errors == ({"check_failed_RuntimeError": 1}, {"check_failed_InjectedFault": 1})[k]
    assert ranks["fsdp2_faults-rank0"]["calls"] == ranks["fsdp2_faults-rank1"]["calls"]
    clean = load_file(out / "fsdp2.safetensors")
    faulty = load_file(out / "fsdp2_faults.safetensors")
    assert clean.keys() == faulty.keys()
    assert all(torch.equal(clean[n], faulty[n]) for n in clean)
    assert ranks["single_faults-rank0"]["stats"]["checks_dropped"] == 2
    assert _compare(sidecar, "lora-single_faults", "lora-fsdp2_faults", DROPPED) > 0


def test_layouts_it_does_not_read_are_refused(runs):
    """Tensor parallel RowwiseParallel on a base weight (its columns split), and an FSDP2-sharded
    base weight whose lora_B is whole: refused at construction, saying why."""
    ranks, _ = runs
    for k in (0, 1):
        refused = ranks[f"refusals-rank{k}"]
        assert "columns are split" in refused["rowwise"] and "Shard(dim=1)" in refused["rowwise"]
        assert "lora_B['default'] is not sharded" in refused["base_only"], refused
        assert all("FSDP2 fully_shard" in message for message in refused.values())

"""The tracker's estimates against the exact float64 reference (full SVDs) on the synthetic
trajectories of test_core_trajectories (OPD-, SFT-, RLVR-like; 256×512 fp32 and 512×256 bf16
parameters; a check every step). The bounds are issue 2's and are not loosened to pass:

* every check: ‖ΔW‖_F relative error ≤ 1e-4; visible, visible∩low and visible∩principal counts
  equal to the reference computed with the same thresholds and tie rule;
* OPD-like after 3 checks: stable rank within 2%, σ1 within 1%, top-K energy within 0.02,
  Sim_K (the horizon alignment) within 0.02;
* SFT-/RLVR-like: stable rank within 10% after 3 checks and 5% after 10, σ1 within 3% after 10;
* rotation (mean and max principal angle) null or within 10% or 0.05°, whichever is larger
  (test_core_rotation sweeps it);
* the OPD-like run locks within 10 checks; the SFT-like run never locks over 50 checks;
* every check: the reported `convergence` (the tracker's error bound) is never below the actual
  relative error of σ1 and of the stable rank, for ΔW and for W_t (float64 SVDs), and an estimate
  is reported exactly when its bound is within tolerance.
"""

from __future__ import annotations

import pytest
import torch
from deltawatch.client.lock import is_snapshot_check
from deltawatch.client.settings import AnchorSettings
from deltawatch.client.sketch import rayleigh_ritz
from deltawatch.client.tracker import MatrixTracker
from deltawatch.sidecar.exact import exact_anchor, exact_keys, right_vectors, view_of
from deltawatch.sidecar.geometry import MatrixGeometry
from support import assert_rotation_within_bound
from test_core_trajectories import pretrained_like, trajectory

NAME = "model.layers.0.mlp.up_proj.weight"
K = 16


def rel(estimate: float | None, exact: float) -> float:
    assert estimate is not None, "estimate is null"
    return abs(estimate - exact) / abs(exact)


def run(kind: str, shape: tuple[int, int], dtype: torch.dtype, checks: int, view: str = "bf16"):
    """Yield (step, W_t, check, keys, reference keys at the same horizon and V_ref)."""
    W0 = pretrained_like(*shape, seed=0, dtype=dtype)
    tracker = MatrixTracker.attach(NAME, W0, anchor=AnchorSettings(view=view))
    geometry = MatrixGeometry(shape, channel_rank=K)
    geometry.baseline(tracker.baseline())
    anchor = exact_anchor(W0, view=view)
    masks = anchor["masks"]
    exact_VK: dict[int, torch.Tensor] = {}
    v_ref = None
    for step, W in trajectory(kind, W0, checks):
        check = tracker.check(W, step)
        keys = geometry.ingest(check)
        D = view_of(W, view).double() - view_of(W0, view).double()
        if is_snapshot_check(step):  # a possible horizon later (checks every step)
            exact_VK[step] = right_vectors(D, K)[1]
        if check.locked_now:
            v_ref = check.v_ref
        # exact statistics on every check
        assert rel(keys["frobenius_norm"], float(D.norm())) <= 1e-4
        visible = W.to(torch.bfloat16).view(torch.int16) != W0.to(torch.bfloat16).view(torch.int16)
        assert check.visible_count == int(visible.sum())
        assert check.visible_low_count == int((visible & masks["low"]).sum())
        assert check.visible_principal_count == int((visible & masks["principal"]).sum())
        assert_bounded(check, keys, D, view_of(W, view).double(), geometry.tolerance)
        h = geometry.last_horizon_step
        yield (
            step,
            W,
            check,
            keys,
            lambda W=W, h=h, v=v_ref: exact_keys(
                W0, W, view=view, channel_rank=K, horizon_V=exact_VK.get(h), v_ref=v
            ),
        )


def assert_bounded(check, keys: dict, D: torch.Tensor, W_view: torch.Tensor, tol: float) -> None:
    """The error bounds of both trackers against the float64 σ1 of ΔW and of view(W_t)."""
    if check.update is None:
        return
    sigma1 = {}
    for name, sketch, A in (("update", check.update, D), ("weight", check.weight, W_view)):
        sigma1[name] = float(torch.linalg.svdvals(A)[0])
        theta1 = float(rayleigh_ritz(sketch.G, sketch.C)[0][0])
        sr_error = sigma1[name] ** 2 / theta1 - 1  # ‖A‖_F²/θ_1 against ‖A‖_F²/σ1²
        assert sketch.convergence >= sr_error - 1e-9, (check.step, name, sketch.convergence)
    bound, s1 = check.update.convergence, sigma1["update"]
    reported = keys["stable_rank"] is not None
    assert reported == (bound <= tol)
    if reported:
        assert rel(keys["spectral_norm"], s1) <= bound + 1e-9
        assert rel(keys["stable_rank"], check.frobenius_sq / s1**2) <= bound + 1e-6


CASES = [
    (kind, shape, dtype)
    for kind in ("opd", "sft", "rlvr")
    for shape, dtype in (((256, 512), torch.float32), ((512, 256), torch.bfloat16))
]


@pytest.mark.parametrize("kind,shape,dtype", CASES)
def test_estimates_within_the_issue_bounds(kind: str, shape, dtype) -> None:
    lock_step = None
    for step, _W, check, keys, reference in run(kind, shape, dtype, checks=10):
        lock_step = check.lock_step if lock_step is None else lock_step
        if step not in (3, 10):
            continue
        ref = reference()
        if kind == "opd" and step == 3:
            assert rel(keys["stable_rank"], ref["stable_rank"]) <= 0.02
            assert rel(keys["spectral_norm"], ref["spectral_norm"]) <= 0.01
            assert abs(keys["topk_energy_ratio"] - ref["topk_energy_ratio"]) <= 0.02
            assert abs(keys["horizon_alignment"] - ref["horizon_alignment"]) <= 0.02
        if kind != "opd":
            bound = 0.10 if step == 3 else 0.05
            assert rel(keys["stable_rank"], ref["stable_rank"]) <= bound
            if step == 10:
                assert rel(keys["spectral_norm"], ref["spectral_norm"]) <= 0.03
        assert_rotation_within_bound(keys, ref)
        # null while the W_t sketch's bound (its subspace sine included) is above tolerance
        if keys["spectral_shift_topk"] is not None:
            assert rel(keys["spectral_shift_topk"], ref["spectral_shift_topk"]) <= 0.02
        if kind == "opd" and step == 10:
            assert lock_step is not None and lock_step <= 10
            assert keys["locked"] and keys["lock_step"] == lock_step
            assert abs(keys["subspace_alignment"] - ref["subspace_alignment"]) <= 0.02
            assert rel(keys["channel_energy_ratio"], ref["channel_energy_ratio"]) <= 1e-4


def test_native_view_fp32_opd() -> None:
    """view="native": ΔW = W_t − W0 in fp32, masks on W0 itself."""
    for step, _W, _check, keys, reference in run("opd", (256, 512), torch.float32, 3, "native"):
        if step == 3:
            ref = reference()
            assert rel(keys["stable_rank"], ref["stable_rank"]) <= 0.02
            assert rel(keys["spectral_norm"], ref["spectral_norm"]) <= 0.01


def test_sft_never_locks_over_50_checks() -> None:
    """50 checks of the SFT-like random walk (128×256, to keep the suite short): no lock, and the
    reason is visible: the horizon alignment of a random walk stays far below the 0.9 threshold."""
    W0 = pretrained_like(128, 256, seed=0)
    tracker = MatrixTracker.attach(NAME, W0)
    geometry = MatrixGeometry((128, 256), channel_rank=K)
    geometry.baseline(tracker.baseline())
    alignments = []
    for step, W in trajectory("sft", W0, 50):
        check = tracker.check(W, step)
        keys = geometry.ingest(check)
        assert check.lock_step is None and not check.locked_now and not keys["locked"]
        alignments.append(keys["horizon_alignment"])
    measured = [a for a in alignments if a is not None]
    assert len(measured) >= 40 and max(measured) < 0.9

"""MatrixTracker behaviour: ΔW = 0, the exact path, determinism, placement, views, checkpoints."""

from __future__ import annotations

import pytest
import torch
from deltawatch.client.records import MatrixCheck, Sketch
from deltawatch.client.settings import AnchorSettings, SketchSettings
from deltawatch.client.tracker import MatrixTracker
from deltawatch.sidecar.exact import exact_keys
from deltawatch.sidecar.geometry import MatrixGeometry, ritz_pairs
from deltawatch.sidecar.keys import MATRIX_KEYS
from test_core_trajectories import pretrained_like, trajectory

NAME = "model.layers.1.self_attn.o_proj.weight"


def test_zero_update_reports_nulls_and_no_rotation() -> None:
    """W_t = W0, and updates below bf16 resolution: ΔW = 0 in the bf16 view -> no power step,
    update None, every ratio null, stable rank null, rotation and spectral shift 0."""
    W0 = pretrained_like(128, 192, seed=5).to(torch.bfloat16).float()  # on the bf16 grid
    tracker = MatrixTracker.attach(NAME, W0)
    geometry = MatrixGeometry((128, 192))
    geometry.baseline(tracker.baseline())
    V_before = tracker.V.clone()
    for step, W in ((1, W0.clone()), (2, W0 * (1 + 1e-6)), (3, W0.clone())):
        check = tracker.check(W, step)
        assert check.update is None and check.frobenius_sq == 0.0 and check.visible_count == 0
        keys = geometry.ingest(check)
        assert set(keys) == set(MATRIX_KEYS)
        for key in (
            "stable_rank",
            "topk_energy_ratio",
            "horizon_alignment",
            "subspace_alignment",
            "channel_energy_ratio",
            "low_magnitude_overlap",
            "principal_overlap",
        ):
            assert keys[key] is None, key
        assert keys["frobenius_norm"] == 0.0 and keys["bf16_visible_ratio"] == 0.0
        assert keys["rotation_max_degrees"] == 0.0 and keys["spectral_shift_topk"] == 0.0
        assert keys["locked"] is False and keys["lock_step"] is None
    assert torch.equal(tracker.V, V_before)  # V kept


def test_unchanged_weight_after_a_change_reads_no_spurious_rotation() -> None:
    """A real update, then W_t back at W0: the rotation is 0 again (W0's own sketch)."""
    W0 = pretrained_like(128, 192, seed=5)
    tracker = MatrixTracker.attach(NAME, W0)
    geometry = MatrixGeometry((128, 192))
    geometry.baseline(tracker.baseline())
    geometry.ingest(tracker.check(W0 + 1e-3 * torch.randn(128, 192), 1))
    keys = geometry.ingest(tracker.check(W0.clone(), 2))
    assert keys["rotation_mean_degrees"] == 0.0 and keys["rotation_max_degrees"] == 0.0


@pytest.mark.parametrize("shape", [(20, 300), (300, 20), (24, 24), (32, 200)])
def test_small_matrices_take_the_exact_path(shape: tuple[int, int]) -> None:
    W0 = pretrained_like(*shape, seed=6)
    tracker = MatrixTracker.attach(NAME, W0)
    geometry = MatrixGeometry(shape)
    geometry.baseline(tracker.baseline())
    assert tracker.baseline().exact
    for step, W in trajectory("sft", W0, 2):
        check = tracker.check(W, step)
        assert check.update.exact and check.update.power_steps == 1
        assert check.update.convergence == 0.0 and check.weight.exact
        keys = geometry.ingest(check)
        ref = exact_keys(W0, W, channel_rank=16)
        for key in ("spectral_norm", "stable_rank", "topk_energy_ratio"):
            assert keys[key] == pytest.approx(ref[key], rel=1e-4), key
        # σ(W_t) comes from float32 products: the shift has a floor of ~1e-6 (docs/geometry.md)
        assert keys["spectral_shift_topk"] == pytest.approx(ref["spectral_shift_topk"], abs=5e-6)
        assert keys["rotation_mean_degrees"] == pytest.approx(
            ref["rotation_mean_degrees"], abs=1e-3
        )


def test_every_rank_draws_the_same_start_and_checks_are_deterministic() -> None:
    W0 = pretrained_like(96, 160, seed=7)
    a = MatrixTracker.attach(NAME, W0, sketch=SketchSettings(seed=3))
    b = MatrixTracker.attach(NAME, W0.clone(), sketch=SketchSettings(seed=3))
    c = MatrixTracker.attach(NAME + ".other", W0, sketch=SketchSettings(seed=3))
    assert torch.equal(a.V, b.V) and not torch.equal(a.V, c.V)
    for step, W in trajectory("opd", W0, 3):
        ca, cb = a.check(W, step), b.check(W, step)
        assert torch.equal(ca.update.G, cb.update.G) and torch.equal(ca.weight.C, cb.weight.C)


def test_host_and_device_placement_agree() -> None:
    W0 = pretrained_like(96, 160, seed=8)
    host = MatrixTracker.attach(NAME, W0, anchor=AnchorSettings(location="host"))
    device = MatrixTracker.attach(NAME, W0, anchor=AnchorSettings(location="device"))
    for step, W in trajectory("rlvr", W0, 2):
        ch, cd = host.check(W, step), device.check(W, step)
        assert ch.frobenius_sq == cd.frobenius_sq and ch.visible_count == cd.visible_count
        assert torch.equal(ch.update.G, cd.update.G)


def test_bf16_parameters_and_the_native_view() -> None:
    W0 = pretrained_like(96, 160, seed=9, dtype=torch.bfloat16)
    native = MatrixTracker.attach(NAME, W0, anchor=AnchorSettings(view="native"))
    bf16 = MatrixTracker.attach(NAME, W0)
    assert native.anchor.W0.dtype == torch.bfloat16 == bf16.anchor.W0.dtype
    for step, W in trajectory("sft", W0, 2):
        cn, cb = native.check(W, step), bf16.check(W, step)
        assert cn.frobenius_sq == cb.frobenius_sq  # a bf16 parameter: the views coincide
    fp32 = MatrixTracker.attach(NAME, W0.float(), anchor=AnchorSettings(view="native"))
    assert fp32.anchor.W0.dtype == torch.float32
    W = W0.float() * (1 + 1e-6)  # W0 is on the bf16 grid: invisible in bf16, not natively
    check = fp32.check(W, 1)
    assert check.update is not None and check.visible_count == 0
    assert check.frobenius_sq == pytest.approx(float((W.double() - W0.double()).square().sum()))


def test_state_dict_round_trip_resumes_identically() -> None:
    W0 = pretrained_like(96, 160, seed=10)
    a = MatrixTracker.attach(NAME, W0)
    steps = list(trajectory("opd", W0, 8))
    for step, W in steps[:5]:
        a.check(W, step)
    state = a.state_dict()
    assert all(isinstance(v, torch.Tensor | int) for v in state.values())
    b = MatrixTracker.attach(NAME, W0)
    b.load_state_dict(state)
    for step, W in steps[5:]:
        ca, cb = a.check(W, step), b.check(W, step)
        assert torch.equal(ca.update.G, cb.update.G) and ca.lock_step == cb.lock_step


def test_lock_reference_is_sent_once_and_can_be_restored() -> None:
    W0 = pretrained_like(96, 160, seed=11)
    tracker = MatrixTracker.attach(NAME, W0)
    sent = []
    for step, W in trajectory("opd", W0, 10):
        check = tracker.check(W, step)
        assert isinstance(check, MatrixCheck) and isinstance(check.weight, Sketch)
        if check.v_ref is not None:
            sent.append((check.step, check.v_ref))
            assert check.locked_now and check.lock_step == step
            assert check.v_ref.shape == (160, 16) and check.v_ref.dtype == torch.float32
    assert len(sent) == 1 and check.channel_energy_sq is not None
    restored = MatrixTracker.attach(NAME, W0)
    restored.restore_lock(*sent[0])
    assert restored.lock_step == sent[0][0] and torch.equal(restored.v_ref, sent[0][1])
    sigma, _, _ = ritz_pairs(check.update, 16)
    assert sigma.numel() == 16


def test_the_tracker_takes_its_settings_from_its_anchor() -> None:
    W0 = pretrained_like(48, 64, seed=12)
    sketch = SketchSettings(channel_rank=8, oversample=4)
    tracker = MatrixTracker.attach(NAME, W0, anchor=AnchorSettings(view="native"), sketch=sketch)
    again = MatrixTracker(NAME, tracker.anchor)  # settings travel once: with the anchor
    assert (again.k, again.r, again.shape) == (8, 12, (48, 64))
    assert again.anchor.settings.view == "native" and again.V.shape == (64, 12)
    with pytest.raises(ValueError, match="channel_rank must be > 0"):
        SketchSettings(channel_rank=0)
    with pytest.raises(ValueError, match="local shape"):
        tracker.check(torch.zeros(64, 48), 1)


def test_a_non_finite_weight_leaves_the_tracker_intact() -> None:
    """A diverged step (NaN in W_t) is reported as non-finite (the sidecar refuses it) and
    touches neither basis, so the next finite check goes on as if it had not happened."""
    W0 = pretrained_like(96, 160, seed=16)
    a, b = MatrixTracker.attach(NAME, W0), MatrixTracker.attach(NAME, W0)
    steps = list(trajectory("sft", W0, 3))
    for step, W in steps[:2]:
        a.check(W, step)
        b.check(W, step)
    broken = steps[2][1].clone()
    broken[3, 5] = float("nan")
    check = a.check(broken, 3)
    assert check.update is None and check.frobenius_sq != check.frobenius_sq  # NaN
    assert torch.equal(a.V, b.V) and torch.equal(a.V_w, b.V_w)
    assert torch.equal(a.check(steps[2][1], 4).update.G, b.check(steps[2][1], 4).update.G)


def test_the_anchor_is_a_copy_not_the_live_parameter() -> None:
    """Training updates the parameter in place: the anchor must not move with it."""
    for dtype, view in ((torch.float32, "native"), (torch.bfloat16, "bf16")):
        param = pretrained_like(48, 64, seed=17, dtype=dtype)
        tracker = MatrixTracker.attach(
            NAME, param, anchor=AnchorSettings(location="device", view=view)
        )
        param.add_(1.0)
        check = tracker.check(param, 1)
        assert check.frobenius_sq == pytest.approx(48 * 64, rel=1e-3), (dtype, view)


def test_frobenius_norm_is_accumulated_in_float64():
    """‖ΔW‖_F² is summed in float64 (MatrixCheck.frobenius_sq): on a dense 1024×2048 update a
    float32 reduction would be off by ~1e-5 relative; float64 is exact to rounding."""
    g = torch.Generator().manual_seed(11)
    W0 = torch.randn(1024, 2048, generator=g) * 0.02
    tracker = MatrixTracker.attach("model.layers.0.mlp.up_proj.weight", W0.clone())
    W = W0 + 1e-3 * torch.randn(1024, 2048, generator=g)
    check = tracker.check(W, 1)
    D = W.to(torch.bfloat16).double() - W0.to(torch.bfloat16).double()
    exact = float((D * D).sum())
    assert abs(check.frobenius_sq - exact) <= 1e-10 * exact

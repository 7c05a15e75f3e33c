"""The live self-audit's arithmetic (sidecar/audit.py) against numpy float64: ΔW assembled from
blocks (the tracker's own float32 ΔW blocks) equals the whole ΔW exactly; the exact keys match an independent SVD; a real tracker's live
keys are within their stated bounds (error ratio ≤ 1) and a scaled estimate is not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from deltawatch.client.audit import audited_index
from deltawatch.client.records import AuditPiece, ManifestEntry
from deltawatch.client.tracker import MatrixTracker
from deltawatch.sidecar.audit import (
    AuditError,
    Auditor,
    assemble,
    error_ratios,
    exact_update_keys,
)
from deltawatch.sidecar.errors import ValidationError
from deltawatch.sidecar.geometry import MatrixGeometry
from deltawatch.sidecar.store import Store
from test_core_trajectories import pretrained_like, trajectory

NAME = "model.layers.0.mlp.up_proj.weight"
K = 16


def blocks_of(D: torch.Tensor, rows: int, cols: int) -> list[tuple[int, int, torch.Tensor]]:
    """D split into a rows × cols grid of the tracker's float32 blocks, as the ranks of a 2-D
    mesh send them."""
    out = []
    for rb in torch.tensor_split(torch.arange(D.shape[0]), rows):
        for cb in torch.tensor_split(torch.arange(D.shape[1]), cols):
            out.append((int(rb[0]), int(cb[0]), D[rb][:, cb].float()))
    return out


def test_live_keys_are_within_their_stated_bounds_and_a_scaled_one_is_not() -> None:
    W0 = pretrained_like(256, 512, seed=3, dtype=torch.bfloat16)
    tracker = MatrixTracker.attach(NAME, W0)
    geometry = MatrixGeometry((256, 512), channel_rank=K)
    geometry.baseline(tracker.baseline())
    audited = 0
    for step, W in trajectory("opd", W0, 3):
        keys = geometry.ingest(tracker.check(W, step))
        D = W.double() - W0.double()  # both bf16: the visible update, in float64
        sent = tracker.update_block(W)  # what the Monitor sends: the tracker's float32 ΔW
        assert torch.equal(sent.double(), D)  # a difference of bf16 values is exact in float32
        pieces = blocks_of(sent, 2, 2)
        A = assemble((256, 512), pieces[:3])
        assert A is None  # a block missing: not yet whole
        A = assemble((256, 512), list(reversed(pieces)))
        assert torch.equal(A, D)  # the blocks, put back in place
        exact = exact_update_keys(A, K)
        S = np.linalg.svd(A.numpy(), compute_uv=False)
        fro2 = float((A.numpy() ** 2).sum())
        assert exact["frobenius_norm"] == pytest.approx(np.sqrt(fro2), rel=1e-12)
        assert exact["spectral_norm"] == pytest.approx(S[0], rel=1e-12)
        assert exact["stable_rank"] == pytest.approx(fro2 / S[0] ** 2, rel=1e-12)
        assert exact["topk_energy_ratio"] == pytest.approx((S[:K] ** 2).sum() / fro2, rel=1e-12)
        ratios = error_ratios(keys, exact)
        assert all(r <= 1 for r in ratios.values()), ratios
        audited += len(ratios)
        wrong = dict(keys, spectral_norm=keys["spectral_norm"] * 1.2)
        assert error_ratios(wrong, exact)["spectral_norm"] > 1
    assert audited >= 3 * 3  # σ1, stable rank, energy reported at least; ‖ΔW‖_F always


def test_a_block_outside_the_matrix_or_overlapping_is_refused() -> None:
    block = torch.zeros(4, 4, dtype=torch.bfloat16)
    with pytest.raises(AuditError, match="outside the matrix of shape"):
        assemble((8, 8), [(6, 0, block)])
    with pytest.raises(AuditError, match="overlap"):
        assemble((8, 8), [(0, 0, block), (2, 2, block)])


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def auditor(tmp_path, **limits) -> tuple[Auditor, Clock]:
    """An Auditor over a real Store with a one-matrix 8×8 manifest of run "r"."""
    entry = ManifestEntry("m", (8, 8), 64, "float32", 0, "mlp.up_proj", "rows", 0)
    clock = Clock()
    a = Auditor(Store(tmp_path), lambda run: [entry], lambda run: 4, clock=clock, **limits)
    return a, clock


def half(step: int, row: int) -> AuditPiece:
    return AuditPiece("m", step, row, 0, torch.ones(4, 8))


def test_incomplete_assemblies_are_bounded_in_age_and_bytes_and_counted(tmp_path) -> None:
    a, clock = auditor(tmp_path, max_bytes=3 * 4 * 8 * 4, timeout_s=60.0)
    assert a.add("r", 1, half(1, 0)) and not a.add(
        "r", 1, half(1, 0)
    )  # a resent block: a duplicate
    clock.now = 61.0
    assert a.add("r", 1, half(2, 0)) and a.pending() == 1 and a.evicted == 1  # step 1 too old
    assert a.add("r", 1, half(3, 0)) and a.add("r", 1, half(4, 0))  # 3 halves: at the cap
    assert a.pending() == 3 and a.pending_bytes == 3 * 128
    assert a.add("r", 1, half(5, 0))  # over the cap: the oldest (step 2) goes
    assert a.pending() == 3 and a.evicted == 2
    with pytest.raises(ValidationError, match="over the sidecar's audit memory cap"):
        auditor(tmp_path / "small", max_bytes=100)[0].add("r", 1, half(1, 0))
    assert a.add("r", 1, half(5, 4))  # step 5's other half needs room too: step 3 goes
    a.drain(60)  # step 5 complete, audited on the auditor's thread
    assert a.completed == 1 and a.evicted == 3 and a.pending() == 1
    (row,) = a.store.latest_audits("r")
    assert row["step"] == 5 and row["exact"]["frobenius_norm"] == pytest.approx(8.0)
    assert row["live"]["spectral_norm"] is None and row["ratios"] == {}  # no report stored
    assert not a.add("r", 1, half(5, 0))  # a block of an audit already stored: a duplicate
    a.close()


def test_the_audited_matrix_is_one_per_cycle_under_both_schedules():
    """Under schedule="every" the check at step c·every of cycle c audits matrix (c / audit_every)
    mod count; under "spread" every step of that cycle names the same matrix, so it is audited at
    whichever step checks it."""
    every, audit_every, count = 4, 2, 3
    for c in range(1, 13):
        steps = range((c - 1) * every + 1, c * every + 1)
        chosen = {audited_index(s, every, audit_every, count) for s in steps}
        expected = None if c % audit_every else (c // audit_every) % count
        assert chosen == {expected}, c
    assert audited_index(8, every, None, count) is None
    assert audited_index(8, every, 2, 0) is None

"""sidecar/geometry.py: every §2 key, the degenerate cases, and state that survives a restart."""

from __future__ import annotations

import json

import torch
from deltawatch.client.records import MatrixCheck
from deltawatch.client.sketch import (
    generalized_eigh,
    gram_matrix,
    principal_angles_degrees,
    ritz_vectors,
)
from deltawatch.client.tracker import MatrixTracker
from deltawatch.sidecar.geometry import MatrixGeometry, batched_ritz_pairs, whitening
from deltawatch.sidecar.keys import MATRIX_KEYS
from test_core_trajectories import pretrained_like, trajectory

NAME = "model.layers.2.mlp.gate_proj.weight"
SHAPE = (96, 160)


def checks(kind: str, steps: int) -> tuple[MatrixTracker, list[MatrixCheck]]:
    W0 = pretrained_like(*SHAPE, seed=14)
    tracker = MatrixTracker.attach(NAME, W0)
    return tracker, [tracker.check(W, step) for step, W in trajectory(kind, W0, steps)]


def test_state_round_trip_through_json_resumes_identically() -> None:
    tracker, reports = checks("opd", 12)
    a = MatrixGeometry(SHAPE)
    a.baseline(tracker.baseline())
    for check in reports[:6]:
        a.ingest(check)
    tensors, meta = a.state()
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    b = MatrixGeometry.from_state(tensors, json.loads(json.dumps(meta)))
    for check in reports[6:]:
        ka, kb = a.ingest(check), b.ingest(check)
        assert set(ka) == set(MATRIX_KEYS)
        for key in MATRIX_KEYS:
            if isinstance(ka[key], float):
                assert abs(ka[key] - kb[key]) <= 1e-9 * max(1.0, abs(ka[key])), key
            else:
                assert ka[key] == kb[key], key
    assert ka["locked"] and ka["subspace_alignment"] is not None


def test_unconverged_estimates_are_null_not_guessed() -> None:
    """A tolerance no iteration reaches: σ-based estimates and the rotation are null; exact
    statistics are still reported."""
    tracker, reports = checks("sft", 2)
    geometry = MatrixGeometry(SHAPE, tolerance=1e-12)
    geometry.baseline(tracker.baseline())
    keys = geometry.ingest(reports[-1])
    for key in ("spectral_norm", "stable_rank", "topk_energy_ratio", "horizon_alignment"):
        assert keys[key] is None, key
    assert keys["rotation_mean_degrees"] is None and keys["spectral_shift_topk"] is None
    assert keys["convergence"] > 1e-12
    assert keys["frobenius_norm"] > 0 and keys["bf16_visible_ratio"] > 0
    assert keys["low_magnitude_overlap"] is not None


def test_cholesky_whitening_solves_the_same_ritz_problem_and_spares_rank_deficient_sketches():
    """`whitening` takes C's Cholesky factor only where C is certified far from its cutoff; there
    the Ritz pairs equal the eigen-whitening's (`generalized_eigh`) to rounding, and a
    rank-deficient C is left to `rayleigh_ritz` (None from the batched call)."""
    g = torch.Generator().manual_seed(7)
    n, r, k = 96, 12, 4
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    full_rank = torch.randn(n, n, generator=g, dtype=torch.float64)
    low_rank = torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, n, generator=g, dtype=torch.float64
    )
    sketches = []
    for A in (full_rank, low_rank):
        G = A.T @ (A @ V)
        sketches.append((G, V.T @ G))
    C = torch.stack([c for _, c in sketches])
    W, full = whitening(C)
    assert full == [True, False]
    assert torch.allclose(W[0].T @ C[0] @ W[0], torch.eye(r, dtype=torch.float64), atol=1e-10)
    pairs = batched_ritz_pairs([G for G, _ in sketches], C, k)
    assert pairs[1] is None
    sigma, V_k, theta = pairs[0]
    G, C0 = sketches[0]
    theta_ref, Z = generalized_eigh(gram_matrix(G), C0)
    assert torch.allclose(theta, theta_ref, rtol=1e-10, atol=0)
    assert torch.allclose(sigma, theta_ref[:k].sqrt(), rtol=1e-10, atol=0)
    angles = principal_angles_degrees(V_k, ritz_vectors(G, Z, k))
    assert float(angles.max()) < 1e-6

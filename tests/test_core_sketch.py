"""The linear algebra of DESIGN §3 (client/sketch.py) against float64 SVDs."""

from __future__ import annotations

import math
import subprocess
import sys

import torch
from deltawatch.client.sketch import (
    cholesky_qr2,
    compress,
    error_bound,
    generalized_eigh,
    householder_orth,
    krylov_products,
    orth,
    power_step,
    principal_angles_degrees,
    rayleigh_ritz,
    ritz_value_change,
    ritz_vectors,
    sim_k,
    singular_values,
)


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_one_step_is_exact_when_the_short_side_fits_the_basis() -> None:
    """m ≤ r < n: span(P) = R^m, so Rayleigh–Ritz on span(P) gives every σ_i and v_i."""
    A = gaussian(20, 300)
    V = orth(gaussian(300, 32, seed=1))
    _, G, C = power_step(A, V)
    theta, Z = rayleigh_ritz(G, C)
    _, S, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    assert torch.allclose(singular_values(theta)[:20], S, rtol=1e-5)
    Vk = ritz_vectors(G, Z, 16)
    assert sim_k(Vk, Vh[:16].T) > 1 - 1e-6
    assert ritz_value_change(theta, C, 16) > 0  # span(V) alone is not exact, span(P) is


def test_identity_basis_padded_with_zero_columns_is_exact() -> None:
    """n ≤ r: V = I_n padded to r columns; C is singular and the cutoff drops the zeros."""
    A = gaussian(300, 24)
    V = torch.eye(24, 32)
    _, G, C = power_step(A, V)
    theta, Z = rayleigh_ritz(G, C)
    assert theta.numel() == 24
    S = torch.linalg.svdvals(A.double())
    assert torch.allclose(singular_values(theta), S, rtol=1e-5)


def test_singular_c_gives_no_spurious_ritz_values() -> None:
    """A of rank 5: C = PᵀP has rank 5; the whitening keeps 5 directions, all exact."""
    A = gaussian(100, 5) @ gaussian(5, 80, seed=1)
    V = orth(gaussian(80, 32, seed=2))
    _, G, C = power_step(A, V)
    theta, _ = rayleigh_ritz(G, C)
    S = torch.linalg.svdvals(A.double())
    assert theta.numel() == 5
    assert torch.allclose(singular_values(theta), S[:5], rtol=1e-5)


def test_invariant_subspace_has_zero_indicator_and_a_fresh_one_does_not() -> None:
    s = torch.arange(1, 121, dtype=torch.float64) ** -0.5
    U = torch.linalg.qr(gaussian(200, 120).double())[0]
    Q = torch.linalg.qr(gaussian(150, 120, seed=1).double())[0]
    A = ((U * s) @ Q.T).float()
    _, G, C = power_step(A, Q[:, :32].float().contiguous())
    theta, _ = rayleigh_ritz(G, C)
    assert ritz_value_change(theta, C, 16) < 1e-5
    _, G, C = power_step(A, orth(gaussian(150, 32, seed=3)))
    theta, _ = rayleigh_ritz(G, C)
    assert ritz_value_change(theta, C, 16) > 1e-2


def test_ritz_values_are_lower_bounds_converging_with_power_steps() -> None:
    A = gaussian(256, 512) * (torch.arange(1, 513) ** -0.3)
    S = torch.linalg.svdvals(A.double())
    V = orth(gaussian(512, 32, seed=1))
    errors = []
    for _ in range(4):
        _, G, C = power_step(A, V)
        theta, _ = rayleigh_ritz(G, C)
        sigma1 = float(singular_values(theta)[0])
        assert sigma1 <= float(S[0]) * (1 + 1e-6)
        errors.append(1 - sigma1 / float(S[0]))
        V = orth(G)
    assert errors[-1] < errors[0]


def test_orth_is_deterministic_and_orthonormal() -> None:
    G = gaussian(64, 8)
    V = orth(G)
    assert torch.allclose(V.T @ V, torch.eye(8), atol=1e-6)
    assert torch.equal(V, orth(G.clone()))
    assert bool((torch.diagonal(V.T @ G) > 0).all())  # sign(diag R) > 0


def rotated(Va: torch.Tensor, angles_deg: list[float]) -> torch.Tensor:
    """Vb: column i of Va turned by angles_deg[i] towards an orthogonal direction."""
    n, k = Va.shape
    Q = torch.linalg.qr(torch.cat([Va, gaussian(n, k, seed=9).double()], dim=1))[0]
    W = Q[:, k : 2 * k]
    t = torch.deg2rad(torch.tensor(angles_deg, dtype=torch.float64))
    return Va * torch.cos(t) + W * torch.sin(t)


def test_principal_angles_exact_from_microdegrees_to_right_angles() -> None:
    Va = torch.linalg.qr(gaussian(300, 5).double())[0]
    wanted = [1e-6, 1e-3, 0.5, 30.0, 89.0]
    Vb = rotated(Va, wanted)
    got = principal_angles_degrees(Va, Vb)
    for g, w in zip(got.tolist(), wanted, strict=True):
        assert math.isclose(g, w, rel_tol=1e-6, abs_tol=1e-9), (g, w)
    assert float(principal_angles_degrees(Va, Va).max()) < 1e-9


def test_sim_k() -> None:
    Va = torch.linalg.qr(gaussian(50, 4).double())[0]
    assert math.isclose(sim_k(Va, Va), 1.0, rel_tol=1e-12)
    Vb = rotated(Va, [90.0, 90.0, 0.0, 0.0])
    assert math.isclose(sim_k(Va, Vb), 0.5, rel_tol=1e-9)
    assert math.isclose(sim_k(Va, Va[:, :2], 4), 0.5, rel_tol=1e-9)  # a missing column counts 0


PRECISION_PROBE = """
import torch
from deltawatch.client.sketch import highest_precision
API = {api!r}
if API == "legacy":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
elif API == "new":
    torch.backends.cuda.matmul.fp32_precision = "tf32"
with highest_precision():
    if API == "new":
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    else:
        assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
if API == "legacy":
    assert torch.backends.cuda.matmul.allow_tf32
    assert torch.get_float32_matmul_precision() == "high"
elif API == "new":
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
else:  # nothing was touched: the trainer may still pick either API afterwards
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
print("ok")
"""


def test_highest_precision_turns_tf32_off_and_restores_it_under_either_api() -> None:
    """TF32 off during a check, the trainer's setting back afterwards, whichever of PyTorch's two
    precision APIs the trainer used (mixing them raises, so each case is a fresh process)."""
    for api in ("legacy", "new", "untouched"):
        done = subprocess.run(
            [sys.executable, "-c", PRECISION_PROBE.format(api=api)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0 and done.stdout.strip() == "ok", (api, done.stderr[-2000:])


def krylov_check(A: torch.Tensor, V: torch.Tensor, steps: int, fresh: bool = False):
    """`steps` power steps from V with Rayleigh–Ritz on their block Krylov space, as the tracker
    runs them: (θ, bound, G, M, Z)."""
    Vs, Gs = [], []
    for _ in range(steps):
        _, G_j, _ = power_step(A, V)
        Vs.append(V)
        Gs.append(G_j)
        V = orth(G_j)
    G, H, M, N = krylov_products(Vs, Gs)
    theta, Z = generalized_eigh(H, M)
    frob_sq = float(A.double().square().sum())
    bound = error_bound(theta, H, M, N, 16, frob_sq, residual=not (fresh and steps == 1))
    return theta, bound, G, M, Z


def spectrum_matrix(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    U = torch.linalg.qr(gaussian(m, s.numel(), seed=seed).double())[0]
    Q = torch.linalg.qr(gaussian(n, s.numel(), seed=seed + 1).double())[0]
    return ((U * s) @ Q.T).float()


def test_error_bound_is_never_below_the_stable_rank_error() -> None:
    """Steep, flat and clustered spectra, 1 to 4 Krylov steps from a random basis (the first
    step without the residual bound, as for a fresh tracker): U/θ_1 − 1 ≥ the stable rank's
    relative error ‖A‖_F²/θ_1 vs ‖A‖_F²/σ1², which is ≥ σ1's."""
    i = torch.arange(1, 201, dtype=torch.float64)
    spectra = {
        "steep": i**-1.0,
        "flat": 1 - 0.3 * i / 200,
        "cluster": torch.cat([torch.full((20,), 1.0), 0.5 * i[:180] ** -0.5]),
    }
    for name, s in spectra.items():
        A = spectrum_matrix(300, 400, s, seed=3)
        sigma1_sq = float(s[0] ** 2)
        for steps in (1, 2, 3, 4):
            V = orth(gaussian(400, 32, seed=7))
            theta, bound, *_ = krylov_check(A, V, steps, fresh=True)
            sr_error = sigma1_sq / float(theta[0]) - 1
            assert bound >= sr_error - 1e-6, (name, steps, bound, sr_error)
            assert float(theta[0]) <= sigma1_sq * (1 + 1e-6)
    # an invariant subspace has a bound at rounding level
    A = spectrum_matrix(300, 400, spectra["steep"], seed=3)
    Q = torch.linalg.svd(A.double(), full_matrices=False)[2][:32].T.float().contiguous()
    _, bound, *_ = krylov_check(A, Q, 1)
    assert bound < 1e-5


def test_krylov_space_beats_the_last_block_and_compresses_exactly() -> None:
    """On a flat spectrum, Rayleigh–Ritz on [V_0, V_1, V_2] gets σ1 closer than on the last
    block alone; and the compressed sketch (G_w, C_w) gives back the same top-r Ritz values."""
    i = torch.arange(1, 201, dtype=torch.float64)
    A = spectrum_matrix(300, 400, 1 - 0.3 * i / 200, seed=4)
    V = orth(gaussian(400, 32, seed=8))
    theta, _, G, M, Z = krylov_check(A, V, 3)
    for _ in range(2):
        _, G_j, _ = power_step(A, V)
        V = orth(G_j)
    _, G_last, C_last = power_step(A, V)
    theta_last, _ = rayleigh_ritz(G_last, C_last)
    assert float(theta[0]) > float(theta_last[0])
    G_w, C_w = compress(G, M, Z, 32)
    assert G_w.shape == (400, 32) and C_w.shape == (32, 32)
    theta_w, Z_w = rayleigh_ritz(G_w, C_w)
    assert torch.allclose(theta_w, theta[:32], rtol=1e-5)
    assert sim_k(ritz_vectors(G_w, Z_w, 16), ritz_vectors(G, Z, 16)) > 1 - 1e-5


def test_cholesky_qr2_matches_householder() -> None:
    """CholeskyQR2 (the CUDA path of orth): orthonormal to float32 rounding, the same Q as
    Householder with sign(diag R) ≥ 0; None (Householder fallback) for a rank-deficient G."""
    for seed, scale in ((0, 1.0), (1, 1e-3)):
        G = gaussian(4096, 32, seed=seed) * (torch.arange(1, 33) ** -2.0) * scale
        Q = cholesky_qr2(G)
        assert Q is not None and Q.dtype == torch.float32
        assert torch.allclose(Q.T @ Q, torch.eye(32), atol=1e-5)
        assert torch.allclose(Q, householder_orth(G), atol=1e-4)
        assert torch.allclose(Q @ (Q.T @ G), G, atol=1e-5 * float(G.abs().max()))
    G = gaussian(256, 32)
    G[:, 5] = G[:, 3]
    assert cholesky_qr2(G) is None
    V = orth(G)  # the CPU path is Householder: still orthonormal
    assert torch.allclose(V.T @ V, torch.eye(32), atol=1e-5)
    # full rank but κ(G) ≈ 1e8, above CHOLESKY_QR_MAX_CONDITION: refused, not a lossy Q
    G = gaussian(4096, 32, seed=3) * torch.logspace(0, -8, 32)
    assert cholesky_qr2(G) is None and cholesky_qr2(G, max_condition=1e9) is not None
    Q = householder_orth(G)
    assert torch.allclose(Q.T @ Q, torch.eye(32), atol=1e-5)


def test_no_bound_without_the_frobenius_norm_on_a_fresh_basis() -> None:
    """A fresh random basis after one step has no residual bound; without ‖A‖_F² there is no
    bound at all (inf; the tracker sends NO_BOUND, finite, so the estimates are null)."""
    A = gaussian(100, 80) * (torch.arange(1, 81) ** -0.5)
    theta, bound, *_ = krylov_check(A, orth(gaussian(80, 32, seed=2)), 1, fresh=True)
    assert math.isfinite(bound)  # the Frobenius bound holds
    Vs, Gs = [orth(gaussian(80, 32, seed=2))], []
    Gs.append(power_step(A, Vs[0])[1])
    _, H, M, N = krylov_products(Vs, Gs)
    theta, _ = generalized_eigh(H, M)
    assert error_bound(theta, H, M, N, 16, None, residual=False) == math.inf

"""The linear algebra of DESIGN §3: warm-started randomized subspace iteration with Rayleigh–Ritz
on span(P), as plain functions with the paper's letters.

For a tracked matrix A (m×n: the update ΔW or the weight W_t) and an orthonormal basis
V ∈ R^{n×r} (r = K + p), one power step is

    P = A·V        (m×r)
    G = Aᵀ·P       (n×r)   = AᵀA·V
    C = Pᵀ·P       (r×r)   = Vᵀ·G

costing 4·m·n·r flops. Rayleigh–Ritz on span(P) (one power step fresher than span(V)) solves the
generalized eigenproblem GᵀG z = θ C z: for u = P z, uᵀAAᵀu / uᵀu = zᵀGᵀGz / zᵀCz. Then
σ_i ≈ √θ_i (lower bounds) and the right singular vectors are the normalised columns of G·z
(Aᵀu = G z, ‖G z‖² = θ zᵀCz). Ritz values on span(V) are the eigenvalues of C, so the
convergence indicator needs no extra matmul (Halko, Martinsson, Tropp 2011, Alg. 4.4 with the
Rayleigh–Ritz of Saad, "Numerical Methods for Large Eigenvalue Problems", §4.3).

All r×r work is done in float64 on the host (it is O(r³), negligible); products with A are float32 with
TF32 off (`highest_precision`), since TF32's 10-bit mantissa drowns a small ΔW.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from . import flat
from .collectives import PLAIN, Reductions, ShardSpec, all_reduce_sum, gather_cols

# A check stops its power steps when the indicator is at or below this (and estimates are null
# above it). Chosen so the accuracy bounds of docs/geometry.md hold on the synthetic trajectories.
DEFAULT_TOLERANCE = 1e-2
# Eigenvalues of C below DEFAULT_CUTOFF · λ_max(C) are dropped when whitening: C is computed in
# float32 (relative error ~1e-7), so smaller eigenvalues carry no information.
DEFAULT_CUTOFF = 1e-6


@contextlib.contextmanager
def highest_precision() -> Iterator[None]:
    """float32 matmuls in full IEEE precision (TF32 off on CUDA, no reduced-precision CPU
    kernels) for the duration of a check; the caller's settings are restored on exit.

    PyTorch has two APIs for this (the legacy `allow_tf32` / `set_float32_matmul_precision` and
    the newer `fp32_precision` attributes) and raises when a process mixes them, so this touches
    nothing when the precision is already full, and otherwise speaks the API the process already
    uses. cuDNN's flag is left alone: no cuDNN kernel runs in a check, and setting it could break
    a trainer that reads it through the other API."""
    restore: list[tuple[object, str, object]] = []
    matmul = torch.backends.cuda.matmul
    try:
        legacy = (matmul.allow_tf32, torch.get_float32_matmul_precision())
    except RuntimeError:  # the process set precision through the new API: use it
        legacy = None
    if legacy is not None and legacy != (False, "highest"):
        restore.append((matmul, "allow_tf32", legacy[0]))
        restore.append((torch, "float32_matmul_precision", legacy[1]))
        matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    elif legacy is None:
        for backend in (matmul, getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)):
            old = getattr(backend, "fp32_precision", None)
            if old not in (None, "ieee", "none"):
                restore.append((backend, "fp32_precision", old))
                backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        for obj, attr, old in reversed(restore):
            if attr == "float32_matmul_precision":
                torch.set_float32_matmul_precision(old)
            else:
                setattr(obj, attr, old)


def power_step(
    A: torch.Tensor | None,
    V: torch.Tensor,
    spec: ShardSpec | None = None,
    reductions: Reductions = PLAIN,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One power step: P = A·V, G = Aᵀ·P, C = PᵀP. Cost 4·m·n·r flops (local block).

    A is the local block (spec None: the whole matrix); V the full (n, r) basis, identical on
    every rank. Sharded (docs/architecture.md "Sharding"): P = A_local·V[cols] summed over the
    column group; G_local = A_localᵀ·P summed over the row group, then assembled over the column
    group; C = PᵀP summed over the row group. Every collective is O((m+n)·r). Returns P for the
    local rows, and the full G (n, r) and C (r, r) on every rank. A flat slice (FSDP1, ZeRO-3):
    client/flat.py's `power_step`.

    `reductions` runs the contributions of the local block A (P's and G's): plainly, or through
    a check's fault-isolated `CheckSession`, where A is None after a local failure (the rank then
    contributes zeros of the shapes declared from `spec`). What follows a reduction (assembling G,
    C = PᵀP) is computed on every rank alike.
    """
    if isinstance(spec, flat.FlatSpec):
        return flat.power_step(A, V, spec, reductions)
    spec = spec if spec is not None else ShardSpec.whole(tuple(A.shape))
    (m_local, n_local), r, dtype = spec.local_shape, V.shape[1], V.dtype
    rows, cols = (spec.row_group,), (spec.col_group,)
    P = reductions.all_reduce(lambda: A @ V[spec.cols], (m_local, r), cols, dtype)
    reductions.seam("power_step")
    G = reductions.all_reduce(lambda: A.T @ P, (n_local, r), rows, dtype)
    G = gather_cols(G, spec)
    C = all_reduce_sum(P.T @ P, spec.row_group)
    return P, G, C


def orth(G: torch.Tensor) -> torch.Tensor:
    """V = orth(G): the Q of a reduced QR with sign(diag R) ≥ 0, so the basis is deterministic
    (every rank computing it from the same G gets the same V). Cost 2·n·r² flops."""
    Q, R = torch.linalg.qr(G)
    d = torch.sign(torch.diagonal(R))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return Q * d


def rayleigh_ritz(
    G: torch.Tensor, C: torch.Tensor, cutoff: float = DEFAULT_CUTOFF
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rayleigh–Ritz on span(P): solve GᵀG z = θ C z, θ descending.

    C may be singular: with C = U diag(d) Uᵀ, keep d_i > cutoff·d_max, whiten with
    W = U_k diag(d_k^{-1/2}), solve Wᵀ(GᵀG)W y = θ y and return Z = W y (so ZᵀCZ = I).
    σ_i ≈ √θ_i; right singular vectors: `ritz_vectors(G, Z, k)`. float64.

    Only the r×r Gram matrix GᵀG (2·n·r² flops) is formed where G lives; the eigen-work is
    r×r and runs on the host: on a GPU a 32×32 eigendecomposition costs milliseconds of
    launches and synchronisations, on the CPU microseconds. Returns host tensors (theta (k',),
    Z (r, k')) with k' ≤ r the number of kept directions.
    """
    G64 = G.double()
    GtG = _symmetric((G64.T @ G64).cpu())
    d, U = torch.linalg.eigh(_symmetric(C.double().cpu()))
    d_max = d[-1] if d.numel() else torch.zeros((), dtype=d.dtype)
    if d.numel() == 0 or not d_max > 0:
        return d.new_zeros(0), d.new_zeros((d.shape[0], 0))
    keep = d > cutoff * d_max
    W = U[:, keep] / torch.sqrt(d[keep])
    theta, Y = torch.linalg.eigh(_symmetric(W.T @ GtG @ W))
    theta = theta.flip(0).clamp_min(0)
    Y = Y.flip(1)
    return theta, W @ Y


def _symmetric(M: torch.Tensor) -> torch.Tensor:
    return (M + M.T) / 2


def ritz_vectors(G: torch.Tensor, Z: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k right Ritz vectors: normalised columns of G·z_i (float64, n×min(k, k'), on G's
    device)."""
    Vk = G.double() @ Z[:, :k].to(G.device)
    norms = torch.linalg.vector_norm(Vk, dim=0)
    return Vk / torch.where(norms > 0, norms, torch.ones_like(norms))


def singular_values(theta: torch.Tensor) -> torch.Tensor:
    """σ_i = √θ_i (Ritz values are lower bounds of the true σ_i)."""
    return torch.sqrt(theta.clamp_min(0))


def convergence(theta: torch.Tensor, C: torch.Tensor, k: int) -> float:
    """The free convergence indicator: max_{i≤k} |σ_i^P − σ_i^V| / σ_1^P, comparing the Ritz
    values on span(P) (√θ from the generalized problem) with those on span(V) (√ of the
    eigenvalues of C, V orthonormal) from the same power step. 0 for a zero matrix."""
    sP = singular_values(theta)
    if sP.numel() == 0 or not sP[0] > 0:
        return 0.0
    lam = torch.linalg.eigvalsh(_symmetric(C.double().cpu())).flip(0)
    sV = singular_values(lam)
    j = min(k, sP.numel(), sV.numel())
    return float(torch.max(torch.abs(sP[:j] - sV[:j])) / sP[0])


def sim_k(Va: torch.Tensor, Vb: torch.Tensor, k: int | None = None) -> float:
    """Sim_K(a, b) = ‖V_aᵀ V_b‖_F² / K (mean cos² of the principal angles; 1 = same subspace).
    K defaults to Va's column count; a basis with fewer columns than K scores below 1."""
    K = Va.shape[1] if k is None else k
    if K == 0:
        return float("nan")
    M = Va.double().T @ Vb.double().to(Va.device)
    return float(torch.sum(M * M) / K)


def principal_angles_degrees(Va: torch.Tensor, Vb: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending, float64) between span(Va) and span(Vb).

    Small angles from sines, the singular values of (I − Va Vaᵀ) Vb (arcsin is well conditioned
    there, so sub-degree angles are exact); angles above 45° from cosines, the singular values of
    Vaᵀ Vb (Knyazev & Argentati 2002). Both bases are re-orthonormalised in float64 first."""
    Qa = torch.linalg.qr(Va.double())[0]
    Qb = torch.linalg.qr(Vb.double().to(Va.device))[0]
    cos = torch.linalg.svdvals(Qa.T @ Qb).clamp(0, 1)  # descending -> ascending angles
    sin = torch.linalg.svdvals(Qb - Qa @ (Qa.T @ Qb)).clamp(0, 1).flip(0)  # ascending
    j = min(cos.numel(), sin.numel())
    cos, sin = cos[:j], sin[:j]
    small = sin < math.sqrt(0.5)
    angles = torch.where(small, torch.arcsin(sin), torch.arccos(cos))
    return torch.rad2deg(angles)

"""The linear algebra of DESIGN §3: warm-started randomized block Krylov iteration with
Rayleigh–Ritz, and an error bound from the Ritz residuals, as plain functions with the paper's
letters.

For a tracked matrix A (m×n: the update ΔW or the weight W_t) and an orthonormal basis
V ∈ R^{n×r} (r = K + p), one power step is

    P = A·V        (m×r)
    G = Aᵀ·P       (n×r)   = AᵀA·V
    C = Pᵀ·P       (r×r)   = Vᵀ·G

costing 4·m·n·r flops. A check runs s power steps from the warm basis V_0 (V_j = orth(G_j)) and
keeps every block: X = [V_0 … V_{s−1}] (n×sr) and G = [G_1 … G_s] = AᵀA·X. That is the block
Krylov space span(V_0, AᵀA·V_0, …, (AᵀA)^{s−1}·V_0) of Musco & Musco, "Randomized Block Krylov
Methods for Stronger and Faster Approximate Singular Value Decomposition" (NeurIPS 2015,
Algorithm 2), whose Ritz values converge gap-independently, against simultaneous iteration's
span(V_{s−1}) alone (Halko, Martinsson, Tropp 2011, Alg. 4.4), for the same passes over A.

Rayleigh–Ritz on span(A·X) (half a step fresher than span(X)) solves the generalized eigenproblem
H z = θ M z with H = GᵀG and M = XᵀG = (AX)ᵀ(AX): for u = A·X·z, uᵀAAᵀu / uᵀu = zᵀHz / zᵀMz.
Then σ_i ≈ √θ_i (lower bounds: Cauchy interlacing) and the right singular vectors are the
normalised columns of G·z (Aᵀu = G z, ‖G z‖² = θ zᵀMz). For one step (s = 1) this is today's
GᵀG z = θ C z. The top r Ritz directions compress the space back to a sketch of the usual shape:
G_w = G·Z_r, C_w = Z_rᵀ·M·Z_r are exactly AᵀA·Y and (AY)ᵀ(AY) for the basis Y = X·Z_r, so the
sidecar's Rayleigh–Ritz on (G_w, C_w) returns the same Ritz pairs, and the next check starts
from V = orth(G_w), the top-r right Ritz vectors.

Error bound (`error_bound`): on span(X) the right Ritz pairs (λ_i, x_i = X·y_i) of AᵀA have
residuals r_i = AᵀA·x_i − λ_i·x_i = G·y_i − λ_i·X·y_i whose Gram is YᵀHY − Λ² (every product with
A is already in G); Weyl's theorem puts an eigenvalue of AᵀA within ‖r_1‖ of λ_1, and the
quadratic residual bound of Li & Li ("A note on eigenvalues of perturbed Hermitian matrices",
LAA 2005) narrows it to 2ρ²/(η + √(η² + 4ρ²)), ρ ≥ ‖R_{1:j}‖₂, when the top-j block is separated by η from
the next Ritz value's upper end λ_{j+1} + ‖r_{j+1}‖. Taking that eigenvalue to be σ1² gives
σ1² ≤ U; independently, σ1² ≤ θ_1 + (‖A‖_F² − Σθ_i) always (the energy outside span(A·X)). With
the estimate θ_1 ≤ σ1², the stable rank's relative error ‖A‖_F²/θ_1 vs ‖A‖_F²/σ1² is at most
U/θ_1 − 1, and σ1's is at most 1 − √(θ_1/U), smaller; the first is the reported bound.

All r×r work is done in float64 on the host (it is O((sr)³), negligible); products with A are
float32 with TF32 off (`highest_precision`), since TF32's 10-bit mantissa drowns a small ΔW.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from . import flat
from .collectives import PLAIN, Reductions, ShardSpec, all_reduce_sum, gather_cols

# The stated accuracy: a check stops its power steps once the error bound (the stable rank's
# relative error, so σ1's is at most about half of it) is at or below this, and estimates are null
# above it (docs/geometry.md "What converged guarantees").
DEFAULT_TOLERANCE = 5e-2
# Eigenvalues of C below DEFAULT_CUTOFF · λ_max(C) are dropped when whitening: C is computed in
# float32 (relative error ~1e-7), so smaller eigenvalues carry no information.
DEFAULT_CUTOFF = 1e-6
# CholeskyQR2 is used when its Gram's Cholesky factor has diag(R) ratio above this (κ(G) below
# ~1e6 in float64 arithmetic, where two passes give orthonormality to float32 rounding); else QR.
CHOLESKY_QR_MAX_CONDITION = 1e6
# The products with A are float32: relative differences below this between Ritz values are
# rounding, so the error bound never claims less, and a residual bound is consistent with θ_1
# within it.
ROUNDING = 1e-6
# The stated accuracy of the live rotation (DESIGN §2 `rotation_*_degrees`, issue 2): within 10%
# of the angle or 0.05°, whichever is larger; a rotation whose bound does not show that is null.
ROTATION_RELATIVE = 0.1
ROTATION_FLOOR_DEGREES = 0.05
# What a sketch's `convergence` says when no bound could be formed (error_bound's inf: the residual
# bound's assumption failed and ‖A‖_F² was not given): finite, as the wire requires, and above
# any tolerance, so the estimates are null.
NO_BOUND = 1e300


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
    if V.dim() == 3:
        return batched_power_step(A, V, spec)
    spec = spec if spec is not None else ShardSpec.whole(tuple(A.shape))
    (m_local, n_local), r, dtype = spec.local_shape, V.shape[1], V.dtype
    rows, cols = (spec.row_group,), (spec.col_group,)
    P = reductions.all_reduce(lambda: A @ V[spec.cols], (m_local, r), cols, dtype)
    reductions.seam("power_step")
    G = reductions.all_reduce(lambda: A.T @ P, (n_local, r), rows, dtype)
    G = gather_cols(G, spec)
    C = all_reduce_sum(P.T @ P, spec.row_group)
    return P, G, C


def batched_power_step(
    A: torch.Tensor, V: torch.Tensor, spec: ShardSpec | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One power step of each matrix of a batch: P = A·V, G = Aᵀ·P, C = PᵀP ([B, m, n],
    [B, n, r]; whole matrices on this rank, as packed experts are). Cost 4·m·n·r flops per matrix,
    as `bmm`s."""
    if spec is not None:
        raise ValueError(f"a batch of matrices is checked whole: got a layout {spec}")
    P = torch.bmm(A, V)
    return P, torch.bmm(A.mT, P), torch.bmm(P.mT, P)


def orth(G: torch.Tensor) -> torch.Tensor:
    """V = orth(G): the Q of a reduced QR with sign(diag R) ≥ 0, so the basis is deterministic
    (every rank computing it from the same G gets the same V). Cost 2·n·r² flops.

    On CUDA it is CholeskyQR2 (`cholesky_qr2`): two Grams and two triangular solves, all
    matmul-shaped, instead of Householder QR's r dependent panel steps, which dominate a GPU power
    step; Householder QR when G is too ill-conditioned for it."""
    if G.device.type == "cuda":
        Q = cholesky_qr2(G)
        if Q is not None:
            return Q
    return householder_orth(G)


def householder_orth(G: torch.Tensor) -> torch.Tensor:
    """The Q of Householder QR (`torch.linalg.qr`) with sign(diag R) ≥ 0 (a leading batch
    dimension, [E, n, r], orthonormalises each matrix)."""
    Q, R = torch.linalg.qr(G)
    d = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return Q * d.unsqueeze(-2)


def cholesky_qr2(
    G: torch.Tensor, max_condition: float = CHOLESKY_QR_MAX_CONDITION
) -> torch.Tensor | None:
    """CholeskyQR2 (Fukaya, Nakatsukasa, Yanagisawa, Yamamoto 2014): R1 = chol(GᵀG),
    Q1 = G·R1⁻¹, then once more on Q1: R2 = chol(Q1ᵀQ1), Q = Q1·R2⁻¹. In float64 (G's dtype on
    return). diag(R) > 0, so Q equals Householder's Q with sign(diag R) ≥ 0 up to rounding.
    Cost 4·n·r² flops. None when the Gram is not numerically positive definite or
    diag(R1)'s range says κ(G) > max_condition (the caller falls back to Householder)."""
    Q = G.double()
    for _ in range(2):
        R, info = torch.linalg.cholesky_ex(Q.mT @ Q, upper=True)
        d = torch.diagonal(R, dim1=-2, dim2=-1)
        low, high = d.amin(-1), d.amax(-1)  # per matrix of a batch
        ok = (info == 0) & (low > 0) & (high <= max_condition * low)
        if not bool(ok.all()):
            return None
        Q = torch.linalg.solve_triangular(R, Q, upper=True, left=False)
    return Q.to(G.dtype)


def rayleigh_ritz(
    G: torch.Tensor, C: torch.Tensor, cutoff: float = DEFAULT_CUTOFF
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rayleigh–Ritz on span(P): solve GᵀG z = θ C z, θ descending (`generalized_eigh`).

    σ_i ≈ √θ_i; right singular vectors: `ritz_vectors(G, Z, k)`. Only the r×r Gram matrix GᵀG
    (2·n·r² flops) is formed where G lives; the eigen-work is r×r and runs on the host: on a GPU a
    32×32 eigendecomposition costs milliseconds of launches and synchronisations, on the CPU
    microseconds. Returns host float64 tensors (theta (k',), Z (r, k')), k' ≤ r kept directions.
    """
    return generalized_eigh(gram_matrix(G), C.double().cpu(), cutoff)


def gram_matrix(G: torch.Tensor) -> torch.Tensor:
    """GᵀG in float64, on the host (symmetrised; of each matrix of a batch [B, n, r])."""
    G64 = G.double()
    return _symmetric((G64.mT @ G64).cpu())


def generalized_eigh(
    H: torch.Tensor,
    C: torch.Tensor | None,
    cutoff: float = DEFAULT_CUTOFF,
    decomposed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve H z = θ C z for symmetric H and positive semidefinite C, θ descending, ZᵀCZ = I.

    C may be singular: with C = U diag(d) Uᵀ, keep d_i > cutoff·d_max, whiten with
    W = U_k diag(d_k^{-1/2}), solve Wᵀ H W y = θ y and return Z = W y. C None: C = I (an
    orthonormal basis), a plain eigendecomposition. float64 on the host. `decomposed`: C's
    eigendecomposition (d, U) ascending, when the caller has it."""
    H = H.double().cpu()
    if C is None:
        theta, Y = torch.linalg.eigh(_symmetric(H))
        return theta.flip(0), Y.flip(1)
    d, U = decomposed or torch.linalg.eigh(_symmetric(C.double().cpu()))
    d_max = d[-1] if d.numel() else torch.zeros((), dtype=d.dtype)
    if d.numel() == 0 or not d_max > 0:
        return d.new_zeros(0), d.new_zeros((d.shape[0], 0))
    keep = d > cutoff * d_max
    W = U[:, keep] / torch.sqrt(d[keep])
    theta, Y = torch.linalg.eigh(_symmetric(W.T @ H @ W))
    return theta.flip(0).clamp_min(0), W @ Y.flip(1)


def batched_generalized_eigh(
    H: torch.Tensor,
    C: torch.Tensor | None,
    cutoff: float = DEFAULT_CUTOFF,
    decomposed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`generalized_eigh` (H z = θ C z, θ descending, ZᵀCZ = I) for each matrix of a batch
    ([B, k, k], host): one batched eigendecomposition of C, and one of the whitened Wᵀ H W for the
    matrices whose C keeps every eigenvalue above the cutoff (the usual case; the same arithmetic
    as the per-matrix routine); the others take the per-matrix routine. C None: C = I, one
    batched eigendecomposition of H. `decomposed`: C's batched eigendecomposition, when the
    caller has it."""
    if C is None:
        theta, Y = torch.linalg.eigh(_symmetric(H.double()))
        return list(zip(theta.flip(-1), Y.flip(-1), strict=True))
    d, U = decomposed or torch.linalg.eigh(_symmetric(C.double()))
    d_max = d[:, -1:]
    full = ((d > cutoff * d_max).all(-1) & (d_max[:, 0] > 0)).tolist()
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * H.shape[0]
    idx = [b for b, ok in enumerate(full) if ok]
    if idx:
        W = U[idx] / torch.sqrt(d[idx]).unsqueeze(-2)
        theta, Y = torch.linalg.eigh(_symmetric(W.mT @ H.double()[idx] @ W))
        theta, Z = theta.flip(-1).clamp_min(0), W @ Y.flip(-1)
        for j, b in enumerate(idx):
            out[b] = (theta[j], Z[j])
    for b, ok in enumerate(full):
        if not ok:
            out[b] = generalized_eigh(H[b], C[b], cutoff, (d[b], U[b]))
    return out


def krylov_products(
    Vs: list[torch.Tensor], Gs: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The block Krylov space of one check's power steps: G = [G_1 … G_s] (n×sr, on the device)
    and, float64 on the host, H = GᵀG, M = XᵀG = (AX)ᵀ(AX) and N = XᵀX for X = [V_0 … V_{s−1}]
    (None for one block: V_0 is orthonormal; `krylov_grams`). Blocks with a leading batch
    dimension ([E, n, r]) give the products of each matrix ([E, sr, sr])."""
    G = torch.cat(Gs, dim=-1)
    return G, *krylov_grams(torch.cat(Vs, dim=-1).double(), G.double(), len(Vs))


def krylov_grams(
    X64: torch.Tensor, G64: torch.Tensor, blocks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """H = GᵀG, M = XᵀG and N = XᵀX (None for one block) from float64 X and G on their device,
    returned on the host (symmetrised). Cost 2·n·(sr)²·3 flops (no product with A)."""
    H = _symmetric((G64.mT @ G64).cpu())
    M = _symmetric((X64.mT @ G64).cpu())
    N = _symmetric((X64.mT @ X64).cpu()) if blocks > 1 else None
    return H, M, N


@dataclasses.dataclass(frozen=True)
class Space:
    """The space Rayleigh–Ritz searched after `steps` power steps (`subspace_iteration`): V, the
    basis of the last step; its sketch G_s, C_s; the space's G (n×r or n×sr, on the device),
    H = GᵀG, M (C_s, or XᵀG) and N (XᵀX; None: I), float64 on the host; its Ritz pairs (θ, Z);
    the blocks X = [V_1 … V_s] whose images span it ([V] if not Krylov); `member`, its index in
    the batch (0 for one matrix); on the block Krylov space, `pairs`, the Ritz pairs (λ, Y) of
    AᵀA on span(X) (M y = λ N y: what the error bound and the sine bound both use, solved once,
    batched with the other members) and `G64`, G in float64. Each member of a batch has its own
    Space (views of the batch's tensors)."""

    V: torch.Tensor
    G_s: torch.Tensor
    C_s: torch.Tensor
    G: torch.Tensor
    H: torch.Tensor
    M: torch.Tensor
    N: torch.Tensor | None
    theta: torch.Tensor
    Z: torch.Tensor
    steps: int
    X: list[torch.Tensor]
    member: int = 0
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None
    G64: torch.Tensor | None = None


def subspace_iteration(
    A: torch.Tensor | None,
    V: torch.Tensor,
    spec: ShardSpec | None,
    reductions: Reductions = PLAIN,
    *,
    max_steps: int,
    tolerance: float,
    measure: Callable[[Space], float] | None = None,
    krylov: bool = False,
    done: Callable[[Space, float], bool] | None = None,
    measure_all: Callable[[list[Space]], list[float]] | None = None,
) -> tuple[Space, float] | list[tuple[Space, float]]:
    """Power steps from the orthonormal basis V with Rayleigh–Ritz after each, until
    `measure(space)` ≤ `tolerance` (or `done(space, measure)`, when given) or `max_steps` steps
    (the one iteration of the client, as torch/_lowrank.py has one get_approximate_basis).
    Returns the last space and its measure.

    Step j: G_j, C_j = `power_step`(A, V_j), V_{j+1} = orth(G_j). `krylov` False: simultaneous
    iteration (Halko, Martinsson, Tropp 2011, Alg. 4.4), Rayleigh–Ritz on span(A·V_s) alone,
    GᵀG z = θ C_s z (`rayleigh_ritz`); True: the block Krylov space span(A·[V_1 … V_s]) of every
    step (Musco & Musco 2015, Alg. 2), H z = θ M z (`krylov_products`, `generalized_eigh`).
    Cost per step 4·m·n·r flops (local block) plus the r×r (sr×sr) host work.

    A leading batch dimension (A [B, m, n], V [B, n, r], whole matrices, spec None): the members
    still iterating take each step together (`bmm` power steps, batched QR, one batched
    eigendecomposition for their Rayleigh–Ritz, `batched_generalized_eigh`); `measure` and `done`
    see each member's own Space (`Space.member` its index), or `measure_all` the list of the
    spaces of the members still iterating (one call per step, for a measure batched over them),
    and a member leaves the batch once its own rule stops it, so each member's result is the one
    it would get alone. Returns then, per member, (its last space, its measure)."""
    batched = V.dim() == 3
    members = list(range(V.shape[0])) if batched else [0]
    results: list[tuple[Space, float] | None] = [None] * len(members)
    Vs: list[torch.Tensor] = []  # krylov: every block; else none are kept
    Gs: list[torch.Tensor] = []
    steps = 0
    while True:
        _, G_j, C_j = power_step(A, V, spec, reductions)
        steps += 1
        G64 = pairs = None
        if krylov:
            Vs.append(V)
            Gs.append(G_j)
            G = torch.cat(Gs, dim=-1)
            G64 = G.double()
            H, M, N = krylov_grams(torch.cat(Vs, dim=-1).double(), G64, len(Vs))
        else:
            G, H, M, N = G_j, gram_matrix(G_j), C_j.double().cpu(), None
        # one block (N = I): M's eigendecomposition whitens span(A·X)'s problem and is span(X)'s
        # Ritz pairs, so it is solved once
        decomposed = torch.linalg.eigh(M) if krylov and N is None else None
        ritz = _eighs(H, M, batched, decomposed)
        if decomposed is not None:
            d, U = decomposed[0].flip(-1), decomposed[1].flip(-1)
            pairs = list(zip(d, U, strict=True)) if batched else [(d, U)]
        elif krylov:
            pairs = _eighs(M, N, batched)
        blocks = Vs if krylov else [V]
        spaces = []
        for j, member in enumerate(members):
            at = j if batched else None
            parts = [_member(t, at) for t in (V, G_j, C_j, G, H, M)]
            N_j = None if N is None else _member(N, at)
            X = [_member(x, at) for x in blocks]
            extra = {} if G64 is None else {"pairs": pairs[j], "G64": _member(G64, at)}
            spaces.append(Space(*parts, N_j, *ritz[j], steps, X, member, **extra))
        values = measure_all(spaces) if measure_all is not None else list(map(measure, spaces))
        going = []
        for j, (space, value) in enumerate(zip(spaces, values, strict=True)):
            finished = value <= tolerance if done is None else done(space, value)
            if finished or steps >= max_steps:
                results[space.member] = (space, value)
            else:
                going.append(j)
        if not going:
            return results if batched else results[0]
        if len(going) < len(members):  # a batch: the stopped members leave it
            sel = torch.tensor(going, device=G_j.device)
            A, G_j = A[sel], G_j[sel]
            Vs, Gs = [v[sel] for v in Vs], [g[sel] for g in Gs]
            members = [members[j] for j in going]
        V = orth(G_j)


def _eighs(
    H: torch.Tensor,
    C: torch.Tensor | None,
    batched: bool,
    decomposed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """H z = θ C z of each member of a batch, or of the one matrix (a list of one)."""
    if batched:
        return batched_generalized_eigh(H, C, decomposed=decomposed)
    return [generalized_eigh(H, C, decomposed=decomposed)]


def _member(t: torch.Tensor, j: int | None) -> torch.Tensor:
    """Member j of a batch's tensor, or the one matrix's (j None)."""
    return t if j is None else t[j]


def compress(
    G: torch.Tensor, M: torch.Tensor, Z: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sketch of the top-r Ritz directions: G_w = G·Z_r (n×r), C_w = Z_rᵀ·M·Z_r (r×r, = I
    up to rounding), zero-padded to r columns when fewer than r directions were kept. (G_w, C_w)
    is (AᵀA·Y, (AY)ᵀ(AY)) for Y = X·Z_r, so Rayleigh–Ritz on it gives back the top-r Ritz pairs.
    Of each matrix of a batch too (G [B, n, sr], M, Z [B, sr, ·])."""
    Zr = pad_columns(Z, r)
    Gw = (G.double() @ Zr.to(G.device)).to(G.dtype)
    return Gw, _symmetric(Zr.mT @ M @ Zr).to(G.dtype)


def pad_columns(Z: torch.Tensor, r: int) -> torch.Tensor:
    """Z's first r columns, zero-padded to r when it has fewer (float64, host)."""
    k = min(r, Z.shape[-1])
    Zr = torch.zeros((*Z.shape[:-1], r), dtype=torch.float64)
    Zr[..., :k] = Z[..., :k]
    return Zr


def _symmetric(M: torch.Tensor) -> torch.Tensor:
    return (M + M.mT) / 2


def ritz_vectors(G: torch.Tensor, Z: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k right Ritz vectors: normalised columns of G·z_i (float64, n×min(k, k'), on G's
    device; of each matrix of a batch too, a zero column staying zero)."""
    Vk = G.double() @ Z[..., :k].to(G.device)
    norms = torch.linalg.vector_norm(Vk, dim=-2, keepdim=True)
    return Vk / torch.where(norms > 0, norms, torch.ones_like(norms))


def singular_values(theta: torch.Tensor) -> torch.Tensor:
    """σ_i = √θ_i (Ritz values are lower bounds of the true σ_i)."""
    return torch.sqrt(theta.clamp_min(0))


def ritz_value_change(theta: torch.Tensor, C: torch.Tensor, k: int) -> float:
    """max_{i≤k} |σ_i^P − σ_i^V| / σ_1^P: the change of the top-k Ritz values over one power step
    (span(P)'s √θ against span(V)'s, the √ eigenvalues of C, V orthonormal). A stopping rule for
    the attach-time iterations only: it is not an error bound (on flat spectra it understates the
    error several times); `error_bound` is. 0 for a zero matrix."""
    sP = singular_values(theta)
    if sP.numel() == 0 or not sP[0] > 0:
        return 0.0
    lam = torch.linalg.eigvalsh(_symmetric(C.double().cpu())).flip(0)
    sV = singular_values(lam)
    j = min(k, sP.numel(), sV.numel())
    return float(torch.max(torch.abs(sP[:j] - sV[:j])) / sP[0])


def error_bound(
    theta: torch.Tensor,
    H: torch.Tensor,
    M: torch.Tensor,
    N: torch.Tensor | None,
    k: int,
    frobenius_sq: float | None = None,
    residual: bool = True,
    cutoff: float = DEFAULT_CUTOFF,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """A bound on the relative error of the stable rank ‖A‖_F²/θ_1 (and so of σ1 ≈ √θ_1):
    U/θ_1 − 1 with U ≥ σ1² (module docstring), from the Krylov products H = GᵀG, M = XᵀG,
    N = XᵀX (None: I) of the check and θ, the span(A·X) Ritz values. float64 on the host; no product
    with A.

    U is the smaller of (a) the residual bound λ_1 + min(‖r_1‖, Li–Li quadratic bounds over the
    top-j blocks, j < k, whose gap η_j = λ_j − max_{i>j}(λ_i + ‖r_i‖) is positive), which assumes
    the eigenvalue of AᵀA that Weyl's theorem places near λ_1 is σ1² (the basis has seen A: not
    used when `residual` is False, i.e. a fresh random basis after one step), and is discarded
    when below θ_1 by more than float32 rounding (`ROUNDING`, then that assumption is false);
    (b) θ_1 + (‖A‖_F² − Σθ_i), which always
    holds (given ‖A‖_F², exact on the client). Both are widened by float32 rounding
    (ROUNDING·θ_1: the Ritz values come from float32 products). inf when neither applies; 0 for
    a zero matrix. `pairs`: span(X)'s Ritz pairs (λ, Y) when the caller has them (`Space.pairs`),
    else solved here."""
    if theta.numel() == 0 or not theta[0] > 0:
        return 0.0
    t1 = float(theta[0])
    bounds = []
    if frobenius_sq is not None:
        bounds.append(t1 + max(float(frobenius_sq) - float(theta.sum()), 0.0) + ROUNDING * t1)
    if residual:
        lam, Y = pairs if pairs is not None else generalized_eigh(M, N, cutoff)
        if lam.numel():
            RtR = _symmetric(Y.T @ H @ Y) - torch.diag(lam**2)
            weyl = float(lam[0]) + _residual_margin(lam, RtR, k)
            if weyl >= t1 * (1 - ROUNDING):
                bounds.append(max(weyl, t1) + ROUNDING * t1)
    if not bounds:
        return math.inf
    return max(min(bounds) / t1 - 1.0, 0.0)


def ritz_subspace_sine(
    Vs: list[torch.Tensor],
    G: torch.Tensor,
    M: torch.Tensor,
    N: torch.Tensor | None,
    Z: torch.Tensor,
    k: int,
    next_upper: float | None = None,
    cutoff: float = DEFAULT_CUTOFF,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    V_hat: torch.Tensor | None = None,
) -> tuple[float, float]:
    """A bound on sin θ_max between the reported top-k right Ritz vectors V̂_k (the normalised
    columns of G·Z_k, what the sidecar's Rayleigh–Ritz returns) and the true top-k right singular
    subspace V_k of A, and λ_{k+1}⁺ from the check's own Ritz pairs. No product with A.

    Davis–Kahan sin θ theorem (Davis & Kahan 1970; Parlett, "The Symmetric Eigenvalue Problem"
    §11.7) on S = AᵀA: the Ritz pairs (Λ, X·Y) of S on span(X), Y from M y = λ N y, have the
    residual R_k = G·Y_k − X·Y_k·Λ_k (n×k, formed directly: the Gram form YᵀHY − Λ² cancels to
    √float32-rounding), and sin θ_max(X·Y_k, V_k) ≤ ‖R_k‖₂/δ with the gap δ = λ_k − λ_{k+1}⁺
    between the k-th Ritz value and an upper bound on S's (k+1)-th eigenvalue: the smaller of
    `next_upper` (the caller's, from Weyl's inequality) and max_{i>k}(λ_i + ‖r_i‖) (the
    assumption of `error_bound`'s residual bound: the basis is not orthogonal to S's top
    directions). ‖R_k‖₂ is widened by ROUNDING·λ_1·√k for G's float32 products. Then the angle
    between span(X·Y_k) and span(V̂_k) is added (the largest principal angle obeys the triangle
    inequality), plus `ROUNDING` for the float32 sketch. Returns (the sine bound, clamped to 1;
    λ_{k+1}⁺); (1, inf) when δ ≤ 0 or span(X) has at most k directions. `pairs` (span(X)'s
    Ritz pairs) and `V_hat` (`ritz_vectors(G, Z, k)`) when the caller has them, else formed here.

    The bound is first order in the gap: on the flat spectra of pretrained weights λ_k − λ_{k+1}
    is a fraction of a percent of λ_1, so the bound certifies only rotations well above the
    basis error (docs/geometry.md "Rotation"). `ritz_subspace_sines` of one space."""
    lam, Y = pairs if pairs is not None else generalized_eigh(M, N, cutoff)
    X = torch.cat(Vs, dim=1).double()
    V_hat = ritz_vectors(G, Z, k) if V_hat is None else V_hat
    (out,) = ritz_subspace_sines(X[None], G[None], lam[None], Y[None], V_hat[None], k, [next_upper])
    return out


def ritz_subspace_sines(
    X: torch.Tensor,
    G: torch.Tensor,
    lam: torch.Tensor,
    Y: torch.Tensor,
    V_hat: torch.Tensor,
    k: int,
    next_upper: Sequence[float | None],
) -> list[tuple[float, float]]:
    """`ritz_subspace_sine` of B spaces of one shape at once: X = [V_1 … V_s] [B, n, sr]
    (float64), G [B, n, sr], span(X)'s Ritz pairs λ [B, p] and Y [B, sr, p] (host), the reported
    V̂_k [B, n, k] and each space's λ_{k+1}⁺ from Weyl's inequality (None: none). The n-sized
    products are batched (`bmm`s), the spectral norms one batched call each; each space's result
    is its own (the products of one member do not mix with another's)."""
    B = X.shape[0]
    if lam.shape[-1] <= k:
        return [(1.0, math.inf)] * B
    Yd, lam_d = Y.to(X.device), lam.to(X.device)
    R = G.double() @ Yd - (X @ Yd) * lam_d[:, None, :]  # every Ritz pair's residual, [B, n, p]
    eps = torch.linalg.vector_norm(R, dim=-2).cpu()
    out: list[tuple[float, float]] = []
    gapped = []  # the spaces with a positive gap δ: their spectral norms, batched
    for b, upper in enumerate((lam[:, k:] + eps[:, k:]).amax(-1).tolist()):
        if next_upper[b] is not None:
            upper = min(upper, float(next_upper[b]))
        out.append((1.0, upper))
        if float(lam[b, k - 1]) - upper > 0:
            gapped.append(b)
    if not gapped:
        return out
    at = torch.tensor(gapped, device=X.device)
    Q = X[at] @ Yd[at, :, :k]  # orthonormal: YᵀNY = I
    V = V_hat[at]
    norms = torch.stack(
        [
            torch.linalg.matrix_norm(R[at, :, :k], ord=2),
            torch.linalg.matrix_norm(V - Q @ (Q.mT @ V), ord=2),
        ],
        dim=-1,
    ).tolist()
    for b, (residual, beside) in zip(gapped, norms, strict=True):
        upper = out[b][1]
        delta = float(lam[b, k - 1]) - upper
        rounding = ROUNDING * float(lam[b, 0]) * math.sqrt(k)
        dk = (residual + rounding) / delta
        angle = math.asin(min(dk, 1.0)) + math.asin(min(beside, 1.0))
        out[b] = (min(math.sin(min(angle, math.pi / 2)) + ROUNDING, 1.0), upper)
    return out


def rotation_bound_degrees(sine_weight: float, sine_anchor: float) -> float:
    """A bound on the error of every principal angle (so of their mean and maximum) between the
    reported top-k subspaces of W0 and W_t: θ_max(V̂0, V0) + θ_max(V̂t, Vt), since each angle
    moves by at most the largest angle between the perturbed subspace and the true one
    (Knyazev & Argentati, "Majorization for changes in angles between subspaces", SIMAX 2006);
    the sines come from `ritz_subspace_sine`. Degrees."""
    return math.degrees(math.asin(min(sine_weight, 1.0)) + math.asin(min(sine_anchor, 1.0)))


def rotation_within_accuracy(angle: float, bound: float) -> bool:
    """Whether an estimated angle (degrees) with error at most `bound` is within the stated
    accuracy of the true angle θ: bound ≤ max(ROTATION_RELATIVE·(angle − bound),
    ROTATION_FLOOR_DEGREES), as θ ≥ angle − bound."""
    return bound <= max(ROTATION_RELATIVE * (angle - bound), ROTATION_FLOOR_DEGREES)


def _residual_margin(lam: torch.Tensor, RtR: torch.Tensor, k: int) -> float:
    """σ1² − λ_1 ≤ min(‖r_1‖, 2ρ_j²/(η_j + √(η_j² + 4ρ_j²))) over j < k with η_j > 0, where
    ρ_j² = Σ_{i≤j} ‖r_i‖² ≥ ‖R_{1:j}‖₂² (the bound grows with ρ, so the Frobenius norm of the
    block residual, the trace of RtR = YᵀHY − Λ²'s leading j×j block, keeps it valid without an
    eigendecomposition per j) and η_j = λ_j − max_{i>j}(λ_i + ‖r_i‖)."""
    eps2 = torch.diagonal(RtR).clamp_min(0)
    eps = torch.sqrt(eps2)
    rho2 = torch.cumsum(eps2, 0)
    margin = float(eps[0])
    J = min(k, lam.numel() - 1)  # the blocks j = 1 … J, all at once
    if J < 1:
        return margin
    upper = (lam + eps).flip(0).cummax(0).values.flip(0)  # max_{i ≥ j}(λ_i + ‖r_i‖)
    eta = lam[:J] - upper[1 : J + 1]
    r2 = rho2[:J]
    quadratic = (2 * r2 / (eta + torch.sqrt(eta * eta + 4 * r2)))[eta > 0]
    return min(margin, float(quadratic.min())) if quadratic.numel() else margin


def sim_k(
    Va: torch.Tensor,
    Vb: torch.Tensor,
    k: int | None = None,
    matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.matmul,
) -> float:
    """Sim_K(a, b) = ‖V_aᵀ V_b‖_F² / K (mean cos² of the principal angles; 1 = same subspace).
    K defaults to Va's column count; a basis with fewer columns than K scores below 1. `matmul`
    forms the float64 V_aᵀV_b (the sidecar passes its own, sidecar/geometry.py `matmul`)."""
    K = Va.shape[1] if k is None else k
    if K == 0:
        return float("nan")
    M = matmul(Va.double().T, Vb.double().to(Va.device))
    return float(torch.sum(M * M) / K)


def principal_angles_degrees(Va: torch.Tensor, Vb: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending, float64) between span(Va) and span(Vb): both bases
    re-orthonormalised in float64 (QR), then `orthonormal_angles_degrees`."""
    Qa = torch.linalg.qr(Va.double())[0]
    Qb = torch.linalg.qr(Vb.double().to(Va.device))[0]
    return orthonormal_angles_degrees(Qa, Qb)


def orthonormal_angles_degrees(Qa: torch.Tensor, Qb: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending) between span(Qa) and span(Qb), orthonormal float64
    bases (n×k, or a batch [B, n, k] of them: one row of angles per pair).

    Small angles from sines, the singular values of (I − Qa Qaᵀ) Qb (arcsin is well conditioned
    there, so sub-degree angles are exact); angles above 45° from cosines, the singular values of
    Qaᵀ Qb (Knyazev & Argentati 2002)."""
    M = Qa.mT @ Qb
    return angles_degrees(torch.linalg.svdvals(M), torch.linalg.svdvals(Qb - Qa @ M).flip(-1))


def angles_degrees(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending) from their cosines (descending) and sines
    (ascending), [..., k] each: arcsin below 45°, arccos above (both well conditioned there)."""
    cos, sin = cos.clamp(0, 1), sin.clamp(0, 1)
    j = min(cos.shape[-1], sin.shape[-1])
    cos, sin = cos[..., :j], sin[..., :j]
    small = sin < math.sqrt(0.5)
    angles = torch.where(small, torch.arcsin(sin), torch.arccos(cos))
    return torch.rad2deg(angles)

"""A report (G, C and the exact statistics of a MatrixCheck) -> the §2 keys of one matrix.

Every formula is the client's (deltawatch.client.sketch / .lock): Rayleigh–Ritz on span(P) gives
σ_i = √θ_i and V_K; the horizon alignment comes from the same LockState snapshots the client keeps.
Degenerate cases (DESIGN §2): ΔW = 0 -> ratios and stable rank null, spectral norm 0, rotation and
spectral shift 0 (W_t = W0 in the view); M_vis empty -> overlaps null; estimates (spectral norm,
stable rank, top-K energy, alignments) null while the update's error bound is above tolerance;
rotation and spectral shift null while the W_t tracker's error bound is above tolerance, and
each rotation key null unless the bound of both top-k subspaces (`rotation_bound_degrees` of
the W_t and the baseline sketch's convergence, which include their subspaces' sine bounds) shows
it within its stated accuracy (`rotation_within_accuracy`: 10% or 0.05°);
subspace_alignment and channel_energy_ratio null before the lock.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from deltawatch.client.lock import Horizon, pad_columns
from deltawatch.client.records import MatrixCheck, Sketch
from deltawatch.client.sketch import (
    DEFAULT_CUTOFF,
    DEFAULT_TOLERANCE,
    angles_degrees,
    orthonormal_angles_degrees,
    rayleigh_ritz,
    ritz_vectors,
    rotation_bound_degrees,
    rotation_within_accuracy,
    sim_k,
    singular_values,
)

from .keys import MATRIX_KEYS


def ritz_pairs(sketch: Sketch, k: int, cutoff: float = DEFAULT_CUTOFF) -> tuple[torch.Tensor, ...]:
    """(σ (≤k,), V_k (n, ≤k), θ) of a sketch, float64: `batched_ritz_pairs` of one, or for a
    rank-deficient sketch `rayleigh_ritz` (client/sketch.py), which drops C's null directions."""
    (pairs,) = batched_ritz_pairs([sketch.G], sketch.C[None], k, cutoff)
    if pairs is not None:
        return pairs
    theta, Z = rayleigh_ritz(sketch.G, sketch.C, cutoff)
    return singular_values(theta[:k]), ritz_vectors(sketch.G, Z, k), theta


ROW_BLOCK = 4096  # rows of G converted to float64 at a time (per sketch)
# float64 entries of one batched block (8 MB): the batch's limit. Kept well under glibc's largest
# mmap threshold (32 MB), so a block's buffers come back from the heap call after call instead of
# being mapped and page-faulted afresh (which cost more than the products at n = 2048).
BLOCK_ELEMENTS = 1 << 20


def batched_ritz_pairs(
    Gs: Sequence[torch.Tensor], C: torch.Tensor, k: int, cutoff: float = DEFAULT_CUTOFF
) -> list[tuple[torch.Tensor, ...] | None]:
    """The Ritz pairs of B sketches of one shape at once: Gs B tensors (n, r), C (B, r, r).

    Rayleigh–Ritz on span(P) as `rayleigh_ritz` (client/sketch.py) solves it, GᵀG z = θ C z in
    float64: H = GᵀG where G lives, then on the host a whitening W with WᵀCW = I (`whitening`),
    WᵀHW y = θ y, Z = W y, and V_k = the normalised columns of G·Z[:, :k]. Every step is one
    batched call for the B sketches: the r×r LAPACK work, and the n-sized products by blocks of
    `ROW_BLOCK` rows of every G converted to float64 at once (`_row_blocks`: H summed over the
    blocks, V_k written block by block), so no float64 copy of a whole G is made. An item whose
    C has an eigenvalue at or below cutoff·d_max (a rank-deficient sketch) is None:
    `rayleigh_ritz` drops those directions, which changes the item's shapes, so the caller
    takes it alone. Its own pairs are the same whatever else the batch holds (the blocks are
    rows of each G, whatever B is; `ritz_pairs` is this call for a batch of one; the engine's
    test compares a group commit with report-by-report ingest exactly)."""
    (n, r), device = Gs[0].shape, Gs[0].device
    single = list(_row_blocks(Gs)) if n <= ROW_BLOCK else None  # one block: converted once
    H = torch.zeros((len(Gs), r, r), dtype=torch.float64, device=device)
    for _, X in single or _row_blocks(Gs):
        H += matmul(X.mT, X)
    H = _symmetric(H.cpu())
    W, full = whitening(_symmetric(C.double().cpu()), cutoff)
    theta, Y = torch.linalg.eigh(_symmetric(W.mT @ H @ W))
    theta = theta.flip(-1).clamp_min(0)
    Z = (W @ Y.flip(-1))[:, :, :k].to(device)
    sigma = singular_values(theta[:, :k])
    # Vᵀ = Zᵀ·Gᵀ, stored [B, k, n]: this BLAS runs the product 1.4–1.7× faster that way round
    # than G·Z (n ≫ r > k), and the norms are then over contiguous rows; V is its transpose view
    Vt = torch.empty((len(Gs), Z.shape[-1], n), dtype=torch.float64, device=device)
    Zt = Z.mT.contiguous()
    for rows, X in single or _row_blocks(Gs):
        Vt[:, :, rows] = matmul(Zt, X.mT)
    norms = torch.linalg.vector_norm(Vt, dim=-1, keepdim=True)
    Vt.div_(torch.where(norms > 0, norms, torch.ones_like(norms)))  # in place: V is n-sized
    V = Vt.mT
    return [(sigma[b], V[b], theta[b]) if ok else None for b, ok in enumerate(full)]


def matmul(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A @ B (batched): through numpy's BLAS on the CPU at one compute thread (the sidecar's
    default, `set_threads`), else torch's. For the geometry's float64 products ([B, n, r]ᵀ·[B, n, r],
    [B, n, r]·[B, r, k], n ≫ r) numpy's OpenBLAS ran 2–2.7× faster than torch's MKL on one thread
    of the AMD EPYC host of docs/sidecar.md. At more threads the two libraries' thread pools
    (torch's OpenMP, OpenBLAS's own) spun against each other there and the same check ran 2×
    slower, so there torch does all of it. Each item is its own GEMM either way: an item's product
    does not depend on the batch."""
    if A.device.type != "cpu" or torch.get_num_threads() != 1:
        return A @ B
    return torch.from_numpy(np.matmul(A.numpy(), B.numpy()))


def set_threads(threads: int) -> None:
    """The geometry's compute threads: torch's intra-op threads and numpy's BLAS threads (through
    threadpoolctl, which finds the BLAS numpy loaded), so neither spins more threads than
    `deltawatch serve --threads` allows beside a trainer."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(limits=threads, user_api="blas")


def _row_blocks(Gs: Sequence[torch.Tensor]) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, X) for each block of `ROW_BLOCK` rows of B tensors (n, r): X [B, rows, r] float64,
    one buffer reused for every block (read it before the next)."""
    n, r = Gs[0].shape
    buffer = torch.empty((len(Gs), min(n, ROW_BLOCK), r), dtype=torch.float64, device=Gs[0].device)
    for start in range(0, n, ROW_BLOCK):
        rows = slice(start, min(n, start + ROW_BLOCK))
        X = buffer[:, : rows.stop - start]
        for b, G in enumerate(Gs):
            X[b].copy_(G[rows])
        yield rows, X


def whitening(C: torch.Tensor, cutoff: float = DEFAULT_CUTOFF) -> tuple[torch.Tensor, list[bool]]:
    """W (B, r, r) with WᵀCW = I for a batch of symmetric positive semidefinite C (B, r, r), and
    per item whether it keeps all r directions (every eigenvalue d_i > cutoff·d_max).

    Cholesky C = LLᵀ, W = L⁻ᵀ, for an item where C − 2·cutoff·‖C‖_F·I is positive definite too
    (its Cholesky succeeds): then d_min > 2·cutoff·‖C‖_F ≥ cutoff·d_max with a margin far above
    rounding, so the eigen-whitening would keep every direction and both solve the same
    problem (θ and the Ritz subspaces agree up to rounding). One Cholesky and one triangular
    solve instead of an r×r eigendecomposition, which costs about as much as the Ritz step's
    own. The other items: C = U diag(d) Uᵀ, W = U diag(d^{-1/2}) (`generalized_eigh`); full
    where d_min > cutoff·d_max."""
    B, r, _ = C.shape
    eye = torch.eye(r, dtype=C.dtype).expand(B, r, r)
    shift = 2 * cutoff * torch.linalg.matrix_norm(C)
    L, info = torch.linalg.cholesky_ex(C)
    _, shifted = torch.linalg.cholesky_ex(C - shift[:, None, None] * eye)
    chol = (info == 0) & (shifted == 0)
    full = chol.tolist()
    W = torch.linalg.solve_triangular(L, eye, upper=False).mT.contiguous()
    rest = [b for b, ok in enumerate(full) if not ok]
    if rest:
        d, U = torch.linalg.eigh(C[rest])
        W[rest] = U / torch.sqrt(d.clamp_min(torch.finfo(d.dtype).tiny))[:, None, :]
        for b, ok in zip(rest, (d[:, 0] > cutoff * d[:, -1]).tolist(), strict=True):
            full[b] = ok
    return W, full


def _symmetric(M: torch.Tensor) -> torch.Tensor:
    return (M + M.mT) / 2


def stored_channel_rank(meta: dict) -> int:
    """K of a stored geometry state (`MatrixGeometry.state`; state stored before K had one name
    says `rank`)."""
    return int(meta["channel_rank"] if "channel_rank" in meta else meta["rank"])


class MatrixGeometry:
    """One matrix's engine state: W0's baseline Ritz pairs, the V_K snapshots (the horizon) and
    the lock the client decided."""

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        channel_rank: int = 16,
        alpha: float = 0.5,
        tolerance: float | None = None,
        cutoff: float = DEFAULT_CUTOFF,
        device: torch.device | str = "cpu",
    ) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.channel_rank = channel_rank
        self.alpha = alpha
        self.tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
        self.cutoff = cutoff
        self.device = torch.device(device)
        self.horizon = Horizon(channel_rank, max_rank=min(self.shape), matmul=matmul)
        self.base_sigma: torch.Tensor | None = None
        self.base_V: torch.Tensor | None = None
        self.base_convergence = 0.0  # the baseline's bound (its top-k subspace's sine too)
        self._base_Q: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (base_V, k, Q)
        self.lock_step: int | None = None
        self.v_ref: torch.Tensor | None = None
        self.last_horizon_step: int | None = None  # h(t) of the last ingested check

    def baseline(self, sketch: Sketch, pairs: tuple | None = None) -> None:
        """W0's sketch from the W_t tracker (once per incarnation); `pairs` its Ritz pairs when
        computed beforehand (`baseline_pairs`)."""
        if pairs is None:
            pairs = ritz_pairs(self._on_device(sketch), self.channel_rank, self.cutoff)
        sigma, V, _ = pairs
        # contiguous, as it comes back from the store (a product's rounding can depend on the
        # layout, and a restarted engine must compute what an uninterrupted one does)
        self.base_sigma, self.base_V = sigma, V.contiguous()
        self.base_convergence = float(sketch.convergence)

    def ingest(
        self,
        check: MatrixCheck,
        pairs: tuple[tuple | None, tuple | None] = (None, None),
        angles: tuple[float, float] | None = None,
    ) -> dict[str, float | bool | int | None]:
        """The §2 keys for one check (None where DESIGN §2 says null). `pairs`: the update's and
        the weight's Ritz pairs, `angles` the rotation's largest and mean principal angle, when
        computed beforehand (`ingest_batch`), else computed here. The r-sized values are read
        out of their tensors once and combined as Python floats (float64 both)."""
        K = self.channel_rank
        frob_sq = float(check.frobenius_sq)
        keys: dict[str, float | bool | int | None] = dict.fromkeys(MATRIX_KEYS)
        keys["frobenius_norm"] = math.sqrt(frob_sq)
        V_K = None
        converged = False
        self.last_horizon_step = None
        if check.update is None:
            keys["spectral_norm"] = 0.0
            self.horizon.observe(check.step, None)
        else:
            sigma, V_K, theta = (
                pairs[0]
                if pairs[0] is not None
                else ritz_pairs(self._on_device(check.update), K, self.cutoff)
            )
            converged = check.update.convergence <= self.tolerance
            alignment, self.last_horizon_step = self.horizon.observe(check.step, V_K.float())
            keys["convergence"] = float(check.update.convergence)
            s1 = float(sigma[0]) if sigma.numel() else 0.0
            if converged and s1 > 0:
                keys["spectral_norm"] = s1
                keys["stable_rank"] = frob_sq / (s1 * s1)
                keys["topk_energy_ratio"] = math.fsum(theta[:K].tolist()) / frob_sq
                keys["horizon_alignment"] = alignment
        if check.locked_now and check.v_ref is not None:
            self.v_ref = check.v_ref.to(self.device)  # as sent (float32): Sim_K upcasts it
        self.lock_step = check.lock_step
        keys["locked"] = check.lock_step is not None
        keys["lock_step"] = check.lock_step
        if keys["locked"]:
            if self.v_ref is not None and V_K is not None and converged:
                k_sim = self.horizon.k_sim
                padded = pad_columns(V_K, K)
                keys["subspace_alignment"] = sim_k(padded, self.v_ref, k_sim, matmul)
            if check.channel_energy_sq is not None and frob_sq > 0:
                keys["channel_energy_ratio"] = float(check.channel_energy_sq) / frob_sq
        numel = check.numel
        keys["bf16_visible_ratio"] = check.visible_count / numel if numel else None
        if check.visible_count > 0:
            keys["low_magnitude_overlap"] = check.visible_low_count / check.visible_count
            keys["principal_overlap"] = check.visible_principal_count / check.visible_count
        self._rotation(check, keys, pairs[1], angles)
        return keys

    def _rotation(
        self,
        check: MatrixCheck,
        keys: dict,
        pairs: tuple | None = None,
        angles: tuple[float, float] | None = None,
    ) -> None:
        """Principal angles between W0's and W_t's top-k Ritz vectors, and the top-k shift
        ‖σ_t[:k] − σ_0[:k]‖ / ‖σ_0[:k]‖."""
        if check.update is None:  # W_t = W0 in this view
            keys["rotation_max_degrees"] = keys["rotation_mean_degrees"] = 0.0
            keys["spectral_shift_topk"] = 0.0
            return
        if self.base_V is None or check.weight is None or check.weight.convergence > self.tolerance:
            return  # unknown (no baseline yet, no W_t sketch in this report, or not converged)
        if pairs is None:
            pairs = ritz_pairs(self._on_device(check.weight), self.channel_rank, self.cutoff)
        sigma, V, _ = pairs
        k = min(V.shape[1], self.base_V.shape[1])
        if angles is None:
            Vb = V[:, :k].double().to(self.base_V.device)
            (angles,) = angle_summary(ritz_angles_degrees([self.base_Q(k)], [Vb]))
        bound = rotation_bound_degrees(check.weight.convergence, self.base_convergence)
        for key, angle in zip(
            ("rotation_max_degrees", "rotation_mean_degrees"), angles, strict=True
        ):
            if rotation_within_accuracy(angle, bound):
                keys[key] = angle
        s0 = self.base_sigma[:k].tolist()
        shift = [a - b for a, b in zip(sigma[:k].tolist(), s0, strict=True)]
        norm = math.hypot(*s0)
        keys["spectral_shift_topk"] = math.hypot(*shift) / norm if norm > 0 else None

    def base_Q(self, k: int) -> torch.Tensor:
        """W0's top-k Ritz vectors re-orthonormalised in float64 (QR), W0's side of every
        check's principal angles: computed once per baseline and k, then kept."""
        cached = self._base_Q
        if cached is None or cached[0] is not self.base_V or cached[1] != k:
            Q = torch.linalg.qr(self.base_V[:, :k].double())[0]
            self._base_Q = cached = (self.base_V, k, Q)
        return cached[2]

    def _on_device(self, sketch: Sketch) -> Sketch:
        if sketch.G.device == self.device:
            return sketch
        return Sketch(
            sketch.G.to(self.device),
            sketch.C.to(self.device),
            sketch.convergence,
            sketch.power_steps,
            sketch.exact,
        )

    # -- persistence ----------------------------------------------------------------------

    def state(self, snapshots: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able dict): everything needed to resume after a restart (without the
        stacked V_K snapshots `lock.snapshot_V` for `snapshots=False`)."""
        # stored under "lock." (the name the store has always used for the horizon's snapshots)
        lock = self.horizon.state_dict(snapshots)
        tensors = {f"lock.{k}": v for k, v in lock.items() if isinstance(v, torch.Tensor)}
        meta = {
            "shape": list(self.shape),
            "channel_rank": self.channel_rank,
            "alpha": self.alpha,
            "tolerance": self.tolerance,
            "cutoff": self.cutoff,
            "lock_step": self.lock_step,
            "base_convergence": self.base_convergence,
            "lock": {k: v for k, v in lock.items() if not isinstance(v, torch.Tensor)},
        }
        for name in ("base_sigma", "base_V", "v_ref"):
            value = getattr(self, name)
            if value is not None:
                tensors[name] = value.detach().cpu()
        return tensors, meta

    @classmethod
    def from_state(
        cls, tensors: dict[str, torch.Tensor], meta: dict, device: torch.device | str = "cpu"
    ) -> MatrixGeometry:
        g = cls(
            tuple(meta["shape"]),
            channel_rank=stored_channel_rank(meta),
            alpha=meta["alpha"],
            tolerance=meta["tolerance"],
            cutoff=meta["cutoff"],
            device=device,
        )
        lock = dict(meta["lock"])
        lock.update({k[len("lock.") :]: v for k, v in tensors.items() if k.startswith("lock.")})
        g.horizon.load_state_dict(lock, g.device)
        g.lock_step = meta["lock_step"]
        g.base_convergence = float(meta.get("base_convergence", 1.0))  # unknown: null
        for name in ("base_sigma", "base_V"):
            if name in tensors:
                setattr(g, name, tensors[name].to(g.device, torch.float64))
        if "v_ref" in tensors:  # as it came (float64 in a data dir written before it was kept so)
            g.v_ref = tensors["v_ref"].to(g.device)
        return g


def ingest_batch(
    items: Sequence[tuple[MatrixGeometry, MatrixCheck]],
) -> list[dict[str, float | bool | int | None] | Exception]:
    """`MatrixGeometry.ingest` of many checks, each of a different matrix, with the
    Rayleigh–Ritz of every group of sketches of one (device, n, r, K, cutoff) run as one batched
    call (`batched_ritz_pairs`): the update's sketches and the weight's where the rotation will
    read them, together (a report's two sketches have one shape); and the rotation's principal
    angles of every group of one (device, n, k) as one batched call (`_batched_angles`). Per
    item: its keys, or the exception that refused it (the others go on)."""
    sketches = [((i, 0), g, c.update) for i, (g, c) in enumerate(items)]
    sketches += [((i, 1), g, _rotation_sketch(g, c)) for i, (g, c) in enumerate(items)]
    pairs = _batched_pairs(sketches)
    weight = {i: p for (i, kind), p in pairs.items() if kind == 1}
    angles = _batched_angles(items, weight)
    out: list[dict[str, float | bool | int | None] | Exception] = []
    for i, (geometry, check) in enumerate(items):
        try:
            keys = geometry.ingest(check, (pairs.get((i, 0)), weight.get(i)), angles.get(i))
            out.append(keys)
        except Exception as exc:
            out.append(exc)
    return out


def baseline_pairs(items: Sequence[tuple[MatrixGeometry, Sketch]]) -> list[tuple | None]:
    """The Ritz pairs of many baselines' sketches, batched over those of one shape as
    `ingest_batch` does (None for an item left to `MatrixGeometry.baseline` alone)."""
    pairs = _batched_pairs([(i, g, s) for i, (g, s) in enumerate(items)])
    return [pairs.get(i) for i in range(len(items))]


def _rotation_sketch(g: MatrixGeometry, c: MatrixCheck) -> Sketch | None:
    """The weight sketch `_rotation` will read (None where it reads none)."""
    ok = c.update is not None and g.base_V is not None and c.weight is not None
    return c.weight if ok and c.weight.convergence <= g.tolerance else None


def _batched_pairs(sketches) -> dict[Any, tuple[torch.Tensor, ...]]:
    """key -> Ritz pairs of each (key, geometry, sketch or None), batched over the sketches of
    one shape (a group whose batched call fails is left to the items alone)."""
    groups: dict[tuple, list[tuple[Any, Sketch]]] = {}
    for label, g, sketch in sketches:
        if sketch is not None:
            key = (g.device, tuple(sketch.G.shape), tuple(sketch.C.shape), g.channel_rank, g.cutoff)
            groups.setdefault(key, []).append((label, sketch))
    out: dict[Any, tuple[torch.Tensor, ...]] = {}
    for (device, (n, r), _, k, cutoff), group in groups.items():
        size = max(1, BLOCK_ELEMENTS // (min(n, ROW_BLOCK) * r))  # sketches per batched call
        for start in range(0, len(group), size):
            members = group[start : start + size]
            try:
                Gs = [s.G.to(device) for _, s in members]
                C = torch.stack([s.C for _, s in members])
                pairs = batched_ritz_pairs(Gs, C, k, cutoff)
            except Exception:  # e.g. an eigendecomposition that did not converge: each alone
                continue
            out.update((x, p) for (x, _), p in zip(members, pairs, strict=True) if p is not None)
    return out


def ritz_angles_degrees(Qa: Sequence[torch.Tensor], Vb: Sequence[torch.Tensor]) -> torch.Tensor:
    """Principal angles (degrees, ascending, [B, k]) between span(Qa[b]), orthonormal float64
    bases (n, k), and span(Vb[b]), normalised Ritz vectors (n, k) (orthogonal up to rounding:
    VᵀV = diag(θ) before the normalisation), without a QR or an n-sized SVD of Vb.

    S = VbᵀVb = LLᵀ (Cholesky; S ≈ I), so Qb = Vb·L⁻ᵀ is an orthonormal basis of span(Vb). With
    A = QaᵀVb and R = Vb − Qa·A, Qaᵀ Qb = A·L⁻ᵀ and (I − QaQaᵀ)·Qb = R·L⁻ᵀ: the cosines are the
    singular values of the k×k A·L⁻ᵀ, the sines the square roots of the eigenvalues of the k×k
    L⁻¹(RᵀR)L⁻ᵀ, and the angles are taken from them as `orthonormal_angles_degrees` takes them
    (sines below 45°, cosines above). R is formed explicitly, so an eigenvalue sin² is exact to
    ε·‖R‖² and a sine to ε·‖R‖²/sin, at most √ε·‖R‖ rad ≈ 1e-6° (ε = 2⁻⁵²), far below the
    rotation's stated accuracy (`rotation_within_accuracy`: 10% or 0.05°). Four n·k² products
    and k×k work, against a QR of Vb, two more n·k² products and an n×k SVD.

    The n-sized products (`_angle_products`) run pair by pair from n = `PAIRWISE_ROWS` on
    (straight from the pairs' own tensors: stacked [B, n, k] copies cost more than the products
    at n = 2048, in the fresh pages they touch), stacked below it (fewer calls); the k×k work is
    batched. Each pair's products are their own GEMMs either way, so a pair's angles do not
    depend on the rest of the batch. A pair whose S
    has no Cholesky (a zero Ritz vector: θ = 0) takes the QR path
    (`orthonormal_angles_degrees`)."""
    if Vb[0].shape[0] < PAIRWISE_ROWS:  # small: one stacked call each, fewer calls
        S, A, RtR = _angle_products(torch.stack(list(Qa)), torch.stack(list(Vb)))
    else:
        S, A, RtR = (torch.stack(x) for x in zip(*map(_angle_products, Qa, Vb), strict=True))
    L, info = torch.linalg.cholesky_ex(S)
    failed = torch.nonzero(info).flatten().tolist()
    L[failed] = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)  # overwritten below
    Lt = L.mT
    cos = torch.linalg.svdvals(torch.linalg.solve_triangular(Lt, A, upper=True, left=False))
    Y = torch.linalg.solve_triangular(L, RtR, upper=False)  # L⁻¹·RᵀR
    T = torch.linalg.solve_triangular(Lt, Y, upper=True, left=False)  # ·L⁻ᵀ
    sin = torch.sqrt(torch.linalg.eigvalsh(_symmetric(T)).clamp_min(0))  # ascending
    angles = angles_degrees(cos, sin)
    for b in failed:
        Qb = torch.linalg.qr(Vb[b])[0]
        angles[b] = orthonormal_angles_degrees(Qa[b], Qb)
    return angles


# Ritz vectors of at least this many rows go through `ritz_angles_degrees`' products pair by pair
PAIRWISE_ROWS = 1024


def _angle_products(Q: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(VᵀV, QᵀV, RᵀR) with R = V − Q·QᵀV, of one pair (n, k) or of a stack of pairs."""
    A = matmul(Q.mT, V)
    R = V - matmul(Q, A)
    return matmul(V.mT, V), A, matmul(R.mT, R)


def angle_summary(angles: torch.Tensor) -> list[tuple[float, float]]:
    """(largest, mean) of each row of principal angles [B, k] (the two rotation keys)."""
    return [tuple(x) for x in torch.stack([angles.amax(-1), angles.mean(-1)], -1).tolist()]


def _batched_angles(items, weight: dict[int, tuple]) -> dict[int, tuple[float, float]]:
    """item index -> the rotation's (largest, mean) principal angle `_rotation` reads (W0's
    `base_Q` against the weight's top-k Ritz vectors, `ritz_angles_degrees`), the k×k work
    batched over the items of one (device, n, k) with weight pairs (one n: below
    `PAIRWISE_ROWS` their products are stacked; a group whose batched call fails is left to the
    items alone)."""
    groups: dict[tuple, list[int]] = {}
    for i, pairs in weight.items():
        g = items[i][0]
        k = min(pairs[1].shape[1], g.base_V.shape[1])
        groups.setdefault((g.base_V.device, g.shape[1], k), []).append(i)
    out: dict[int, tuple[float, float]] = {}
    for (device, _, k), members in groups.items():
        try:
            Qa = [items[i][0].base_Q(k) for i in members]
            Vb = [weight[i][1][:, :k].double().to(device) for i in members]
            angles = ritz_angles_degrees(Qa, Vb)
        except Exception:  # noqa: S112 - each alone (MatrixGeometry._rotation)
            continue
        out.update(zip(members, angle_summary(angles), strict=True))
    return out

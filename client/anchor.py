"""The anchor W0: the local-shard copy the update is measured against, its masks, and W0's own
top-(k+p) Ritz basis for the W_t tracker.

Views (DESIGN §2): "bf16" keeps bf16(W0) and takes the masks on it (the visible update is
f32(bf16(W_t)) − f32(bf16(W0))); "native" keeps W0 in the parameter's own dtype.
Location: "device" keeps the copy beside the parameter; "host" keeps it in CPU memory (pinned
when the parameter is on CUDA) and streams it to the device in row chunks at check time.

Memory per parameter (local shard): the copy (2 bytes in the bf16 view; the dtype's size in the
native view, 4 for fp32) + the packed principal mask (1 bit = 0.125 bytes), so 2.125 bytes per
parameter by default, 4.125 for fp32 native; plus O((m+n)·(k+p)) for the bases. At attach, W0 is
also formed once as float32 on the device (4 bytes per parameter, transient).

Thresholds: a (low-magnitude) and b (principal) are exact order statistics (client/masks.py).
[W0]_R, the rank-R truncation (R = mask_rank): when min(m, n) ≤ EXACT_LIMIT it is exact — the
top-R eigenvectors of the float64 Gram matrix of the smaller side (at attach only; sharded, that
Gram is assembled with O((m+n)·min(m, n)) collectives) — else the subspace iteration of
client/sketch.py (float32, R + 16 columns) run until its indicator is ≤ MASK_TOLERANCE.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from . import flat
from .collectives import ShardSpec, all_reduce_sum, gather_cols
from .masks import (
    CHUNK_ELEMENTS,
    kth_largest_abs,
    low_magnitude_threshold,
    mask_count,
    pack_bits,
    unpack_bits,
)
from .settings import AnchorSettings, SketchSettings
from .sketch import (
    NO_BOUND,
    Space,
    error_bound,
    gram_matrix,
    highest_precision,
    orth,
    power_step,
    rayleigh_ritz,
    ritz_subspace_sine,
    ritz_value_change,
    ritz_vectors,
    subspace_iteration,
)

EXACT_LIMIT = (
    1024  # min(m, n) at or below which [W0]_R and W0's basis come from an exact eigensolve
)
ATTACH_TOLERANCE = 1e-5  # indicator target of the attach-time iteration for W0's basis
MASK_TOLERANCE = 1e-7  # for [W0]_R: Ritz vectors converge more slowly than Ritz values
ATTACH_MAX_STEPS = 50
MASK_OVERSAMPLE = 16


def stable_seed(seed: int, name: str) -> int:
    """A seed from (seed, matrix name) that is the same in every process (no Python hash())."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def gaussian_basis(n: int, r: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """An orthonormal (n, r) basis from a seeded Gaussian, drawn on the CPU so every rank and
    device draws the same numbers."""
    g = torch.Generator().manual_seed(seed)
    return orth(torch.randn(n, r, generator=g, dtype=torch.float32)).to(device)


def view_dtype(view: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the anchor keeps: bf16 in the bf16 view, the parameter's own in native."""
    return torch.bfloat16 if view == "bf16" else dtype


def chunk_rows(n_cols: int) -> int:
    """Rows per chunk: about CHUNK_ELEMENTS entries, a multiple of 8 (so packed masks align)."""
    return max(8, (CHUNK_ELEMENTS // max(n_cols, 1)) // 8 * 8)


def _attach_iteration(
    A: torch.Tensor,
    r: int,
    k: int,
    seed: int,
    spec: ShardSpec | None,
    tolerance: float = ATTACH_TOLERANCE,
) -> Space:
    """Simultaneous iteration (`subspace_iteration`) from a seeded (n, r) basis until
    ritz_value_change(k) ≤ tolerance (at most ATTACH_MAX_STEPS): the last basis V, its sketch
    (G, C) and their Ritz pairs."""
    n = A.shape[1] if spec is None else spec.shape[1]
    space, _ = subspace_iteration(
        A,
        gaussian_basis(n, r, seed, A.device),
        spec,
        max_steps=ATTACH_MAX_STEPS,
        tolerance=tolerance,
        measure=lambda x: ritz_value_change(x.theta, x.C_s, k),
    )
    return space


class Anchor:
    """W0's local shard, the thresholds a and b, the packed principal mask and W0's Ritz basis."""

    def __init__(
        self,
        W0_local: torch.Tensor,
        *,
        shape: tuple[int, int] | None = None,
        spec: ShardSpec | None = None,
        settings: AnchorSettings = AnchorSettings(),
        sketch: SketchSettings = SketchSettings(),
        name: str = "",
    ) -> None:
        if W0_local.ndim != 2:
            raise ValueError(f"{name}: the anchor needs a 2-D weight, got shape {W0_local.shape}")
        self.shape = tuple(shape) if shape is not None else tuple(W0_local.shape)
        if spec is not None and tuple(spec.shape) != self.shape:
            raise ValueError(f"{name}: spec shape {spec.shape} != shape {self.shape}")
        if spec is None and tuple(W0_local.shape) != self.shape:
            raise ValueError(f"{name}: local shape {tuple(W0_local.shape)} != {self.shape}")
        self.name = name
        self.settings = settings
        self.sketch = sketch
        self.spec = spec
        self.device = W0_local.device
        self.local_shape = tuple(W0_local.shape)
        self.numel = self.shape[0] * self.shape[1]
        self.dtype = view_dtype(settings.view, W0_local.dtype)
        W0 = W0_local.detach().to(self.dtype).contiguous()  # on the parameter's device
        if settings.location == "host" and W0.device.type != "cpu":
            self.W0 = W0.cpu().pin_memory()
        else:
            self.W0 = W0.clone() if W0.data_ptr() == W0_local.data_ptr() else W0
        with highest_precision():
            self.a = low_magnitude_threshold(
                flat.entries(W0, spec), settings.alpha, spec, self.numel
            )
            A = W0.float()
            gram = self._gram(A) if min(self.shape) <= EXACT_LIMIT else None
            self._principal_mask(A, gram)
            self.V0 = self._weight_basis(A, gram)
            _, G, C = power_step(A, self.V0, spec)
            theta, Z = rayleigh_ritz(G, C)
            self.exact = min(self.shape) <= sketch.r
            self.baseline_G, self.baseline_C = G, C
            # the error bound of one step from the orthonormal V0: X = V0, M = C, N = I
            k, M = sketch.channel_rank, C.double().cpu()
            eye = torch.eye(C.shape[0], dtype=torch.float64)
            bound = error_bound(theta, gram_matrix(G), M, eye, k)
            sine, upper = ritz_subspace_sine([self.V0], G, M, None, Z, k)
            # λ_{k+1}(W0ᵀW0) from above: exact on the Gram route, else the Ritz pairs' own bound
            lam = gram[2] if gram is not None else None
            exact_next = lam is not None and k < lam.numel()
            self.next_eigenvalue_upper = float(lam[k]) if exact_next else upper
            del gram, lam
            self.baseline_convergence = 0.0 if self.exact else min(max(bound, sine), NO_BOUND)

    # -- access at check time -------------------------------------------------------------

    def row_chunks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, W0[rows] on the compute device) for the local block, chunk by chunk."""
        m_loc, n_loc = self.local_shape
        step = chunk_rows(n_loc)
        for r0 in range(0, m_loc, step):
            rows = slice(r0, min(r0 + step, m_loc))
            yield rows, self.W0[rows].to(self.device, non_blocking=True)

    def principal_rows(self, rows: slice) -> torch.Tensor:
        """M_princ for the given local rows (boolean, on the compute device)."""
        n_loc = self.local_shape[1]
        start, stop = rows.start * n_loc, rows.stop * n_loc
        first, last = start // 8, (stop + 7) // 8  # move the packed bytes, unpack on the device
        packed = self.principal_packed[first:last].to(self.device, non_blocking=True)
        bits = unpack_bits(packed, start - 8 * first, stop - start)
        return bits.view(rows.stop - rows.start, n_loc)

    def low_mask(self, W0_rows: torch.Tensor) -> torch.Tensor:
        """M_low = {|W0| ≤ a} for a chunk of W0 (in the anchor's dtype)."""
        return W0_rows.abs() <= self.a.to(W0_rows.device)

    def nbytes(self) -> int:
        """Bytes held for this matrix: copy + packed mask + bases."""
        return (
            self.W0.numel() * self.W0.element_size()
            + self.principal_packed.numel()
            + self.V0.numel() * self.V0.element_size()
        )

    # -- attach-time computations ---------------------------------------------------------

    def _principal_mask(self, A: torch.Tensor, gram: tuple | None) -> None:
        """b and the packed M_princ from [W0]_R = L·Rtᵀ (local block), computed chunk-wise."""
        if self.settings.mask_rank >= min(self.shape):  # [W0]_R = W0 exactly (ties kept as ties)
            step, dtype = chunk_rows(A.shape[1]), A.dtype

            def chunks() -> Iterator[torch.Tensor]:
                for r0 in range(0, A.shape[0], step):
                    yield A[r0 : r0 + step]

        else:
            L, Rt, dtype = self._truncation_factors(A, gram)
            step = chunk_rows(Rt.shape[0])

            def chunks() -> Iterator[torch.Tensor]:
                for r0 in range(0, L.shape[0], step):
                    yield L[r0 : r0 + step] @ Rt.T

        k = mask_count(self.settings.alpha, self.numel)
        values = flat.entry_chunks(chunks, self.spec, step)  # a flat slice's own entries only
        self.b = kth_largest_abs(values, k, self.numel, self.spec, dtype=dtype)
        packed = [pack_bits(c.abs() >= self.b.to(c.device)) for c in chunks()]
        mask = torch.cat(packed) if packed else torch.zeros(0, dtype=torch.uint8)
        mask = mask.to(self.W0.device)
        self.principal_packed = mask.pin_memory() if self.W0.is_pinned() else mask

    def _gram(self, A: torch.Tensor) -> tuple[bool, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The exact route (min(m, n) ≤ EXACT_LIMIT): the float64 Gram matrix of the smaller side
        through `power_step` with V = I, and its eigendecomposition, descending.

        n ≤ m: G = WᵀW (n×n), P = W (local rows). n > m: through the transposed layout,
        G = WWᵀ (m×m), P = (W[:, local cols])ᵀ. Returns (transposed, P, λ, E)."""
        m, n = self.shape
        transposed = n > m
        side = m if transposed else n
        A64 = A.double().T if transposed else A.double()
        spec = self.spec if self.spec is None or not transposed else self.spec.transposed()
        eye = torch.eye(side, dtype=torch.float64, device=A.device)
        P, G, _ = power_step(A64, eye, spec)
        lam, E = torch.linalg.eigh((G + G.T) / 2)
        return transposed, P, lam.flip(0), E.flip(1)

    def _truncation_factors(
        self, A: torch.Tensor, gram: tuple | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
        """(L, Rt, dtype) with [W0]_R (local block) = L·Rtᵀ; float64 on the exact route."""
        m, n = self.shape
        R = min(self.settings.mask_rank, m, n)
        spec = self.spec
        rows = slice(None) if spec is None else spec.rows
        cols = slice(None) if spec is None else spec.cols
        if gram is not None:
            transposed, P, _, E = gram
            E_R = E[:, :R]
            if transposed:  # [W0]_R = U_R U_Rᵀ W0, (U_Rᵀ W0)[:, cols]ᵀ = P U_R
                return E_R[rows], P @ E_R, torch.float64
            return P @ E_R, E_R[cols], torch.float64  # [W0]_R = W0 V_R V_Rᵀ
        seed = stable_seed(self.sketch.seed, self.name + "#mask")
        space = _attach_iteration(A, R + MASK_OVERSAMPLE, R, seed, spec, MASK_TOLERANCE)
        V_R = ritz_vectors(space.G, space.Z, R).float()
        if isinstance(spec, flat.FlatSpec):  # whole rows of W0·V_R, partial rows summed
            return flat.row_products(A, V_R, spec)[spec.rows], V_R, torch.float32
        L = A @ V_R[cols]
        if spec is not None:
            all_reduce_sum(L, spec.col_group)
        return L, V_R[cols], torch.float32

    def _weight_basis(self, A: torch.Tensor, gram: tuple | None) -> torch.Tensor:
        """W0's top-(k+p) right singular basis (n, r) for the W_t tracker (float32, device); on the
        exact path (min(m, n) ≤ r) the tracker's fixed basis."""
        m, n = self.shape
        r = self.sketch.r
        spec = self.spec
        if n <= r:  # exact path: V = I_n; G and C are n×n (r = min(K + p, n) columns on the wire)
            return torch.eye(n, device=A.device)
        if m <= r:  # exact path: one power step from any full-rank V spans R^m
            return gaussian_basis(n, r, stable_seed(self.sketch.seed, self.name), A.device)
        if gram is not None:
            transposed, P, lam, E = gram
            if not transposed:
                return E[:, :r].float()
            # right vectors v_i = W0ᵀ u_i / σ_i; the local columns are rows of P U
            scale = torch.sqrt(lam[:r].clamp_min(torch.finfo(torch.float64).tiny))
            V_local = (P @ E[:, :r]) / scale
            V = V_local if spec is None else gather_cols(V_local, spec)
            return orth(V).float()
        seed = stable_seed(self.sketch.seed, self.name + "#weight")
        return _attach_iteration(A, r, self.sketch.channel_rank, seed, spec).V

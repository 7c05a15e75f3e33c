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
from collections.abc import Sequence

import torch
from deltawatch.client.lock import Horizon, pad_columns
from deltawatch.client.records import MatrixCheck, Sketch
from deltawatch.client.sketch import (
    DEFAULT_CUTOFF,
    DEFAULT_TOLERANCE,
    principal_angles_degrees,
    rayleigh_ritz,
    ritz_vectors,
    rotation_bound_degrees,
    rotation_within_accuracy,
    sim_k,
    singular_values,
)

from .keys import MATRIX_KEYS


def ritz_pairs(sketch: Sketch, k: int, cutoff: float = DEFAULT_CUTOFF) -> tuple[torch.Tensor, ...]:
    """(σ (≤k,), V_k (n, ≤k), θ) of a sketch, float64."""
    theta, Z = rayleigh_ritz(sketch.G, sketch.C, cutoff)
    return singular_values(theta[:k]), ritz_vectors(sketch.G, Z, k), theta


def batched_ritz_pairs(
    Gs: Sequence[torch.Tensor], C: torch.Tensor, k: int, cutoff: float = DEFAULT_CUTOFF
) -> list[tuple[torch.Tensor, ...] | None]:
    """`ritz_pairs` of B sketches of one shape at once: Gs B tensors (n, r), C (B, r, r).

    The same float64 algebra as `rayleigh_ritz` (client/sketch.py): H = GᵀG where G lives, then
    on the host C = U diag(d) Uᵀ, W = U diag(d^{-1/2}), WᵀHW y = θ y, Z = W y, and V_k = the
    normalised columns of G·Z[:, :k]. The r×r work, a few LAPACK calls of microseconds each, is
    batched (one call per step for the B sketches); the n-sized products stay one matrix each
    (a batched float64 product of tall blocks is slower than B plain ones). An item with an
    eigenvalue of C at or below cutoff·d_max (a rank-deficient sketch) is None: `ritz_pairs`
    drops those directions, which changes the item's shapes, so the caller takes it alone.
    Every other item's pairs are bitwise those of `ritz_pairs` (same products, same layouts)."""
    G64 = [G.double() for G in Gs]
    H = torch.stack([_symmetric((G.T @ G).cpu()) for G in G64])
    d, U = torch.linalg.eigh(_symmetric(C.double().cpu()))
    full = (d[:, 0] > cutoff * d[:, -1]).tolist()
    # row-major, as `generalized_eigh`'s U[:, keep] is: the products then round alike
    W = (U / torch.sqrt(d.clamp_min(torch.finfo(d.dtype).tiny))[:, None, :]).contiguous()
    theta, Y = torch.linalg.eigh(_symmetric(W.mT @ H @ W))
    theta = theta.flip(-1).clamp_min(0)
    Z = W @ Y.flip(-1)
    sigma = singular_values(theta[:, :k])
    out: list[tuple[torch.Tensor, ...] | None] = []
    for b, ok in enumerate(full):
        if ok:
            V = G64[b] @ Z[b, :, :k].to(G64[b].device)
            norms = torch.linalg.vector_norm(V, dim=0)
            out.append(
                (sigma[b], V / torch.where(norms > 0, norms, torch.ones_like(norms)), theta[b])
            )
        else:
            out.append(None)
    return out


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
        self.horizon = Horizon(channel_rank, max_rank=min(self.shape))
        self.base_sigma: torch.Tensor | None = None
        self.base_V: torch.Tensor | None = None
        self.base_convergence = 0.0  # the baseline's bound (its top-k subspace's sine too)
        self.lock_step: int | None = None
        self.v_ref: torch.Tensor | None = None
        self.last_horizon_step: int | None = None  # h(t) of the last ingested check

    def baseline(self, sketch: Sketch) -> None:
        """W0's sketch from the W_t tracker (once per incarnation)."""
        sigma, V, _ = ritz_pairs(self._on_device(sketch), self.channel_rank, self.cutoff)
        self.base_sigma, self.base_V = sigma, V
        self.base_convergence = float(sketch.convergence)

    def ingest(
        self, check: MatrixCheck, pairs: tuple[tuple | None, tuple | None] = (None, None)
    ) -> dict[str, float | bool | int | None]:
        """The §2 keys for one check (None where DESIGN §2 says null). `pairs`: the update's and
        the weight's Ritz pairs when computed beforehand (`ingest_batch`), else computed here."""
        K = self.channel_rank
        frob_sq = float(check.frobenius_sq)
        keys: dict[str, float | bool | int | None] = dict.fromkeys(MATRIX_KEYS)
        keys["frobenius_norm"] = math.sqrt(frob_sq)
        V_K = None
        converged = False
        energy = None
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
            energy = float(theta[:K].sum()) / frob_sq if frob_sq > 0 else None
            alignment, self.last_horizon_step = self.horizon.observe(check.step, V_K.float())
            keys["convergence"] = float(check.update.convergence)
            if converged and sigma.numel() and sigma[0] > 0:
                s1 = float(sigma[0])
                keys["spectral_norm"] = s1
                keys["stable_rank"] = frob_sq / (s1 * s1)
                keys["topk_energy_ratio"] = energy
                keys["horizon_alignment"] = alignment
        if check.locked_now and check.v_ref is not None:
            self.v_ref = check.v_ref.to(self.device, torch.float64)
        self.lock_step = check.lock_step
        keys["locked"] = check.lock_step is not None
        keys["lock_step"] = check.lock_step
        if keys["locked"]:
            if self.v_ref is not None and V_K is not None and converged:
                k_sim = self.horizon.k_sim
                keys["subspace_alignment"] = sim_k(pad_columns(V_K, K), self.v_ref, k_sim)
            if check.channel_energy_sq is not None and frob_sq > 0:
                keys["channel_energy_ratio"] = float(check.channel_energy_sq) / frob_sq
        numel = check.numel
        keys["bf16_visible_ratio"] = check.visible_count / numel if numel else None
        if check.visible_count > 0:
            keys["low_magnitude_overlap"] = check.visible_low_count / check.visible_count
            keys["principal_overlap"] = check.visible_principal_count / check.visible_count
        self._rotation(check, keys, pairs[1])
        return keys

    def _rotation(self, check: MatrixCheck, keys: dict, pairs: tuple | None = None) -> None:
        """Principal angles between W0's and W_t's top-k Ritz vectors, and the top-k shift."""
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
        angles = principal_angles_degrees(self.base_V[:, :k], V[:, :k])
        bound = rotation_bound_degrees(check.weight.convergence, self.base_convergence)
        for key, angle in (
            ("rotation_max_degrees", angles.max()),
            ("rotation_mean_degrees", angles.mean()),
        ):
            if rotation_within_accuracy(float(angle), bound):
                keys[key] = float(angle)
        s0 = self.base_sigma[:k]
        keys["spectral_shift_topk"] = float(
            torch.linalg.vector_norm(sigma[:k] - s0) / torch.linalg.vector_norm(s0)
        )

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

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able dict): everything needed to resume after a restart."""
        # stored under "lock." (the name the store has always used for the horizon's snapshots)
        lock = self.horizon.state_dict()
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
        for name in ("base_sigma", "base_V", "v_ref"):
            if name in tensors:
                setattr(g, name, tensors[name].to(g.device, torch.float64))
        return g


def ingest_batch(
    items: Sequence[tuple[MatrixGeometry, MatrixCheck]],
) -> list[dict[str, float | bool | int | None] | Exception]:
    """`MatrixGeometry.ingest` of many checks, each of a different matrix, with the
    Rayleigh–Ritz of every group of sketches of one (device, n, r, K, cutoff) run as one batched
    call (`batched_ritz_pairs`): the update's sketches, and the weight's where the rotation will
    read them. Per item: its keys, or the exception that refused it (the others go on)."""
    update = _batched_pairs(items, lambda g, c: c.update)
    weight = _batched_pairs(items, _rotation_sketch)
    out: list[dict[str, float | bool | int | None] | Exception] = []
    for i, (geometry, check) in enumerate(items):
        try:
            out.append(geometry.ingest(check, (update.get(i), weight.get(i))))
        except Exception as exc:
            out.append(exc)
    return out


def _rotation_sketch(g: MatrixGeometry, c: MatrixCheck) -> Sketch | None:
    """The weight sketch `_rotation` will read (None where it reads none)."""
    ok = c.update is not None and g.base_V is not None and c.weight is not None
    return c.weight if ok and c.weight.convergence <= g.tolerance else None


def _batched_pairs(items, sketch_of) -> dict[int, tuple[torch.Tensor, ...]]:
    """item index -> Ritz pairs of `sketch_of(geometry, check)`, for the groups of two or more
    sketches of one shape (a group whose batched call fails is left to the items alone)."""
    groups: dict[tuple, list[tuple[int, Sketch]]] = {}
    for i, (g, c) in enumerate(items):
        sketch = sketch_of(g, c)
        if sketch is not None:
            key = (g.device, tuple(sketch.G.shape), tuple(sketch.C.shape), g.channel_rank, g.cutoff)
            groups.setdefault(key, []).append((i, sketch))
    out: dict[int, tuple[torch.Tensor, ...]] = {}
    for (device, _, _, k, cutoff), members in groups.items():
        if len(members) < 2:
            continue
        try:
            Gs = [s.G.to(device) for _, s in members]
            C = torch.stack([s.C for _, s in members])
            pairs = batched_ritz_pairs(Gs, C, k, cutoff)
        except Exception:  # e.g. an eigendecomposition that did not converge: each alone
            continue
        out.update((i, p) for (i, _), p in zip(members, pairs, strict=True) if p is not None)
    return out

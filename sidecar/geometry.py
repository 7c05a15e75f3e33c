"""A report (G, C and the exact statistics of a MatrixCheck) -> the §2 keys of one matrix.

Every formula is the client's (deltawatch.client.sketch / .lock): Rayleigh–Ritz on span(P) gives
σ_i = √θ_i and V_K; the horizon alignment comes from the same LockState snapshots the client keeps.
Degenerate cases (DESIGN §2): ΔW = 0 -> ratios and stable rank null, spectral norm 0, rotation and
spectral shift 0 (W_t = W0 in the view); M_vis empty -> overlaps null; estimates (spectral norm,
stable rank, top-K energy, alignments) null while the update's error bound is above tolerance;
rotation and spectral shift null while the W_t tracker's error bound is above tolerance;
subspace_alignment and channel_energy_ratio null before the lock.
"""

from __future__ import annotations

import math

import torch
from deltawatch.client.lock import Horizon, pad_columns
from deltawatch.client.records import MatrixCheck, Sketch
from deltawatch.client.sketch import (
    DEFAULT_CUTOFF,
    DEFAULT_TOLERANCE,
    principal_angles_degrees,
    rayleigh_ritz,
    ritz_vectors,
    sim_k,
    singular_values,
)

from .keys import MATRIX_KEYS


def ritz_pairs(sketch: Sketch, k: int, cutoff: float = DEFAULT_CUTOFF) -> tuple[torch.Tensor, ...]:
    """(σ (≤k,), V_k (n, ≤k), θ) of a sketch, float64."""
    theta, Z = rayleigh_ritz(sketch.G, sketch.C, cutoff)
    return singular_values(theta[:k]), ritz_vectors(sketch.G, Z, k), theta


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
        self.lock_step: int | None = None
        self.v_ref: torch.Tensor | None = None
        self.last_horizon_step: int | None = None  # h(t) of the last ingested check

    def baseline(self, sketch: Sketch) -> None:
        """W0's sketch from the W_t tracker (once per incarnation)."""
        sigma, V, _ = ritz_pairs(self._on_device(sketch), self.channel_rank, self.cutoff)
        self.base_sigma, self.base_V = sigma, V

    def ingest(self, check: MatrixCheck) -> dict[str, float | bool | int | None]:
        """The §2 keys for one check (None where DESIGN §2 says null)."""
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
            sigma, V_K, theta = ritz_pairs(self._on_device(check.update), K, self.cutoff)
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
        self._rotation(check, keys)
        return keys

    def _rotation(self, check: MatrixCheck, keys: dict) -> None:
        """Principal angles between W0's and W_t's top-k Ritz vectors, and the top-k shift."""
        if check.update is None:  # W_t = W0 in this view
            keys["rotation_max_degrees"] = keys["rotation_mean_degrees"] = 0.0
            keys["spectral_shift_topk"] = 0.0
            return
        if self.base_V is None or check.weight.convergence > self.tolerance:
            return
        sigma, V, _ = ritz_pairs(self._on_device(check.weight), self.channel_rank, self.cutoff)
        k = min(V.shape[1], self.base_V.shape[1])
        angles = principal_angles_degrees(self.base_V[:, :k], V[:, :k])
        keys["rotation_max_degrees"] = float(angles.max())
        keys["rotation_mean_degrees"] = float(angles.mean())
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
        for name in ("base_sigma", "base_V", "v_ref"):
            if name in tensors:
                setattr(g, name, tensors[name].to(g.device, torch.float64))
        return g

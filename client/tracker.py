"""One matrix's trackers: the warm-started subspace iteration on ΔW (stable rank, energy, the lock)
and on W_t (rotation and spectral shift against W0), plus the exact statistics of DESIGN §2.

A check (DESIGN §3):
  1. form ΔW = view(W_t) − view(W0) chunk by chunk (the anchor may live on the host) and, in the
     same pass, the exact statistics: ‖ΔW‖_F² (float64), the bitwise bf16-visible count and its
     intersections with M_low and M_princ; reduced over shards (one O(1) collective per group);
  2. ΔW = 0: no power step, V kept, `update=None`; else power steps P = ΔW·V, G = ΔWᵀ·P,
     C = PᵀP, V ← orth(G), with Rayleigh–Ritz on the block Krylov space of all the check's steps
     (client/sketch.py), until the error bound ≤ tolerance or `max_power_steps`; the sketch sent
     is that space's top-r Ritz directions, and the next check starts from them;
  3. Rayleigh–Ritz on the client too (r×r, cheap) for V_K and the top-K energy, fed to the lock
     rule (client/lock.py) — decided from G and C, which every rank holds, so identical on every
     rank; once locked, ‖ΔW·V_ref‖_F² exactly;
  4. the same power steps on view(W_t), warm-started from W0's top-(k+p) Ritz basis.
Matrices with min(m, n) ≤ r = K + p take the exact path: one power step, `exact=True`.
"""

from __future__ import annotations

import math

import torch

from .anchor import Anchor, gaussian_basis, stable_seed
from .collectives import ShardSpec, all_reduce_sum, reduce_over_matrix
from .lock import DEFAULT_MIN_ENERGY, DEFAULT_PATIENCE, DEFAULT_THRESHOLD, LockState
from .records import MatrixCheck, Sketch
from .sketch import (
    DEFAULT_TOLERANCE,
    NO_BOUND,
    compress,
    error_bound,
    generalized_eigh,
    highest_precision,
    krylov_products,
    orth,
    power_step,
    rayleigh_ritz,
    ritz_vectors,
)


def _to_wire(G: torch.Tensor, C: torch.Tensor, conv: float, steps: int, exact: bool) -> Sketch:
    conv = min(float(conv), NO_BOUND)  # inf (no bound) travels as NO_BOUND: the wire is finite
    return Sketch(G.detach().float().cpu(), C.detach().float().cpu(), conv, steps, exact)


class MatrixTracker:
    """The per-matrix state of the client: anchor, ΔW and W_t bases, lock."""

    def __init__(
        self,
        name: str,
        shape: tuple[int, int],
        *,
        anchor: Anchor,
        rank: int = 16,
        oversample: int = 16,
        max_power_steps: int = 4,
        view: str = "bf16",
        alpha: float = 0.5,
        mask_rank: int = 64,
        seed: int = 0,
        spec: ShardSpec | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
        lock_threshold: float = DEFAULT_THRESHOLD,
        lock_patience: int = DEFAULT_PATIENCE,
        lock_min_energy: float = DEFAULT_MIN_ENERGY,
        lock_at_step: int | None = None,
    ) -> None:
        shape = (int(shape[0]), int(shape[1]))
        given = (anchor.shape, anchor.view, anchor.alpha, anchor.mask_rank, anchor.rank)
        wanted = (shape, view, alpha, mask_rank, rank)
        if given != wanted or anchor.oversample != oversample:
            raise ValueError(
                f"{name}: the anchor was built for (shape, view, alpha, mask_rank, rank) = "
                f"{given}, the tracker asks for {wanted}; build both with the same settings"
            )
        if max_power_steps < 1:
            raise ValueError(f"{name}: max_power_steps must be >= 1, got {max_power_steps}")
        self.name = name
        self.shape = shape
        self.anchor = anchor
        self.rank = rank
        self.r = rank + oversample
        self.max_power_steps = max_power_steps
        self.view = view
        self.spec = spec
        self.tolerance = tolerance
        self.device = anchor.device
        self.exact = min(shape) <= self.r
        if self.exact:
            self.V = anchor.V0.clone()
        else:
            self.V = gaussian_basis(shape[1], self.r, stable_seed(seed, name), self.device)
        self.fresh = not self.exact  # V is still the seeded Gaussian: no residual bound yet
        self.V_w = anchor.V0.clone()
        self.lock = LockState(
            rank,
            threshold=lock_threshold,
            patience=lock_patience,
            min_energy=lock_min_energy,
            at_step=lock_at_step,
            max_rank=min(shape),
        )

    @classmethod
    def attach(
        cls,
        name: str,
        W0_local: torch.Tensor,
        *,
        shape: tuple[int, int] | None = None,
        placement: str = "host",
        **kwargs,
    ) -> MatrixTracker:
        """Build the anchor from the current weight and the tracker on it."""
        shape = tuple(shape) if shape is not None else tuple(W0_local.shape)
        anchor = Anchor(
            W0_local,
            shape=shape,
            view=kwargs.get("view", "bf16"),
            placement=placement,
            alpha=kwargs.get("alpha", 0.5),
            mask_rank=kwargs.get("mask_rank", 64),
            rank=kwargs.get("rank", 16),
            oversample=kwargs.get("oversample", 16),
            spec=kwargs.get("spec"),
            seed=kwargs.get("seed", 0),
            name=name,
        )
        return cls(name, shape, anchor=anchor, **kwargs)

    # -- public ---------------------------------------------------------------------------

    @property
    def lock_step(self) -> int | None:
        return self.lock.lock_step

    @property
    def v_ref(self) -> torch.Tensor | None:
        """The locked channel V_ref (n, K) on the compute device, or None before the lock."""
        return self.lock.v_ref

    def restore_lock(self, lock_step: int, v_ref: torch.Tensor) -> None:
        """Adopt a lock reference sent back by the sidecar after a restart."""
        self.lock.restore(lock_step, v_ref.to(self.device, torch.float32))

    def baseline(self) -> Sketch:
        """W0's own sketch for the W_t tracker (sent once per incarnation)."""
        a = self.anchor
        return _to_wire(a.baseline_G, a.baseline_C, a.baseline_convergence, 1, a.exact)

    @torch.no_grad()
    def check(self, W_t_local: torch.Tensor, step: int) -> MatrixCheck:
        """One check of the current weight (the local shard) at training step `step`."""
        with highest_precision():
            return self._check(W_t_local.detach(), int(step))

    # -- the check ------------------------------------------------------------------------

    def _check(self, W: torch.Tensor, step: int) -> MatrixCheck:
        a = self.anchor
        if tuple(W.shape) != a.local_shape:
            raise ValueError(f"{self.name}: local shape {tuple(W.shape)} != {a.local_shape}")
        W = W.to(self.device)
        D = torch.empty(a.local_shape, dtype=torch.float32, device=self.device)
        stats = torch.zeros(4, dtype=torch.float64, device=self.device)
        for rows, W0 in a.row_chunks():
            Wv = W[rows].to(a.dtype)  # view(W_t): a bf16 copy in the default view
            Dr = D[rows]
            Dr.copy_(Wv).sub_(W0)  # ΔW = f32(view(W_t)) − f32(view(W0)), no temporaries
            Wb = Wv if a.dtype == torch.bfloat16 else W[rows].to(torch.bfloat16)
            W0b = W0 if W0.dtype == torch.bfloat16 else W0.to(torch.bfloat16)
            visible = Wb.view(torch.int16) != W0b.view(torch.int16)
            stats[0] += torch.linalg.vector_norm(Dr, dtype=torch.float64).square()
            stats[1] += visible.sum()
            stats[2] += (visible & a.low_mask(W0)).sum()
            stats[3] += (visible & a.principal_rows(rows)).sum()
        reduce_over_matrix(stats, self.spec)
        frobenius_sq = float(stats[0])
        counts = [int(round(float(c))) for c in stats[1:]]

        update = None
        V_K = energy = None
        converged = False
        # a non-finite weight (a diverged step) is reported as it is (the sidecar refuses it with a
        # clear error) without touching the bases, so the tracker recovers with the weights
        finite = math.isfinite(frobenius_sq)
        if frobenius_sq > 0 and finite:
            update, theta, Z, self.V, G = self._iterate(D, self.V, self.rank, frobenius_sq)
            self.fresh = False
            V_K = ritz_vectors(G, Z, self.rank).float()
            energy = float(theta[: self.rank].sum()) / frobenius_sq
            converged = update.convergence <= self.tolerance
        obs = self.lock.observe(step, V_K, energy, converged)
        channel = self._channel_energy(D) if self.lock.locked else None

        if update is None:  # W_t == W0 in this view (or not finite): W0's sketch
            weight = self.baseline()
        else:
            A = self._weight_view(W, D)
            weight, _, _, self.V_w, _ = self._iterate(A, self.V_w, self.rank, fresh=False)
        return MatrixCheck(
            matrix=self.name,
            step=step,
            shape=self.shape,
            numel=self.shape[0] * self.shape[1],
            frobenius_sq=frobenius_sq,
            visible_count=counts[0],
            visible_low_count=counts[1],
            visible_principal_count=counts[2],
            channel_energy_sq=channel,
            update=update,
            weight=weight,
            lock_step=self.lock.lock_step,
            locked_now=obs.locked_now,
            v_ref=self.lock.v_ref.float().cpu() if obs.locked_now else None,
        )

    def _iterate(
        self,
        A: torch.Tensor,
        V: torch.Tensor,
        k: int,
        frobenius_sq: float | None = None,
        fresh: bool | None = None,
    ) -> tuple[Sketch, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Power steps from V, Rayleigh–Ritz on the block Krylov space of all of them, until the
        error bound ≤ tolerance (or the budget). Returns the sketch of the top-r Ritz directions
        (on the CPU), the Ritz pairs (θ, Z) of the space, the next basis orth(G_w) and the
        space's G = [G_1 … G_s] on the device (V_K = ritz_vectors(G, Z, k)). `fresh` (default:
        the ΔW basis is still the seeded Gaussian) withholds the residual bound after one step.
        Every quantity the loop decides on comes from G and V, identical on every rank."""
        if self.exact:
            _, G, C = power_step(A, V, self.spec)
            theta, Z = rayleigh_ritz(G, C)
            return _to_wire(G, C, 0.0, 1, True), theta, Z, V, G
        fresh = self.fresh if fresh is None else fresh
        Vs: list[torch.Tensor] = []
        Gs: list[torch.Tensor] = []
        while True:
            _, G_j, _ = power_step(A, V, self.spec)
            Vs.append(V)
            Gs.append(G_j)
            G, H, M, N = krylov_products(Vs, Gs)
            theta, Z = generalized_eigh(H, M)
            residual = not (fresh and len(Vs) == 1)
            bound = error_bound(theta, H, M, N, k, frobenius_sq, residual)
            if bound <= self.tolerance or len(Vs) >= self.max_power_steps:
                break
            V = orth(G_j)
        G_w, C_w = compress(G, M, Z, self.r)
        return _to_wire(G_w, C_w, bound, len(Vs), False), theta, Z, orth(G_w), G

    def _channel_energy(self, D: torch.Tensor) -> float:
        """‖ΔW·V_ref‖_F²: Q = ΔW_local·V_ref[cols] summed over the column group, then Σ Q² over
        the local rows summed over the row group. O(m·K) collectives."""
        v_ref = self.lock.v_ref.to(self.device, torch.float32)
        cols = slice(None) if self.spec is None else self.spec.cols
        Q = D @ v_ref[cols]
        if self.spec is not None:
            all_reduce_sum(Q, self.spec.col_group)
        energy = Q.double().square().sum().reshape(1)
        if self.spec is not None:
            all_reduce_sum(energy, self.spec.row_group)
        return float(energy[0])

    def _weight_view(self, W: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        """view(W_t) as float32 on the device, reusing ΔW's buffer unless W is already it."""
        if W.dtype == torch.float32 and self.anchor.dtype == torch.float32:
            return W
        for rows, _ in self.anchor.row_chunks():
            D[rows] = W[rows].to(self.anchor.dtype).float()
        return D

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain tensors and ints: the bases and the lock state (the anchor is rebuilt from the
        original weights, `anchor_checkpoint`)."""
        state = {
            "V": self.V.detach().cpu(),
            "V_w": self.V_w.detach().cpu(),
            "fresh": int(self.fresh),
        }
        state.update({f"lock.{k}": v for k, v in self.lock.state_dict().items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.V = state["V"].to(self.device, torch.float32)
        self.V_w = state["V_w"].to(self.device, torch.float32)
        self.fresh = bool(state.get("fresh", 0))  # older states hold a basis that has seen ΔW
        lock = {k[len("lock.") :]: v for k, v in state.items() if k.startswith("lock.")}
        self.lock.load_state_dict(lock, self.device)

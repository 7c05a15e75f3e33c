"""The horizon lock rule of DESIGN §2 (pure and deterministic): `Horizon` keeps the snapshots and
gives Sim_K(t, h(t)) (the client's lock and the sidecar's `horizon_alignment` both use it);
`LockState` applies the rule on top (the client decides the lock; the sidecar only reads it).

Consecutive checks are no test of locking (a cumulative sum always changes little relative to its
size), so the test is the *horizon*: Sim_K between V_K now and V_K at the kept check whose step is
nearest to step_t / 2 (ties: the later check). V_K is kept at the log-spaced check indices
1, 2, 4, 8, …; a kept check older than the current horizon can never be the horizon again (the
target step_t / 2 only grows), so at most a few snapshots are held: O(log T) at worst.

A matrix locks at the first check where, on `patience` consecutive checks,
horizon_alignment ≥ `threshold` and topk_energy_ratio ≥ `min_energy`; or at the first check with
step ≥ `at_step` (when given). V_ref := V_K at that check. A check without a horizon (the first
check, ΔW = 0, a check whose estimate did not converge) breaks the streak.

A check observes on a `copy()`, which the tracker keeps only when every rank kept the check, so a
check dropped after a failure leaves the lock state as it was, on every rank.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .settings import LockSettings
from .sketch import sim_k


def is_snapshot_check(index: int) -> bool:
    """Check indices 1, 2, 4, 8, … keep their V_K."""
    return index >= 1 and (index & (index - 1)) == 0


def horizon_position(snapshot_steps: list[int], step: int) -> int | None:
    """Position of the kept check whose step is nearest to step / 2 (ties: the later one)."""
    best = None
    for i, s in enumerate(snapshot_steps):
        if best is None or abs(2 * s - step) <= abs(2 * snapshot_steps[best] - step):
            best = i
    return best


def pad_columns(V: torch.Tensor, k: int) -> torch.Tensor:
    """V with exactly k columns: extra ones cut, missing ones zero (a zero column adds nothing to
    ‖VaᵀVb‖_F², so a rank-deficient V_K scores honestly below 1)."""
    if V.shape[1] >= k:
        return V[:, :k]
    return torch.cat([V, V.new_zeros((V.shape[0], k - V.shape[1]))], dim=1)


@dataclass(frozen=True)
class LockObservation:
    horizon_alignment: float | None  # Sim_K(t, h(t)); None without a horizon or without V_K
    horizon_step: int | None
    locked_now: bool


class Horizon:
    """Log-spaced V_K snapshots of one matrix and Sim_K against the horizon h(t) (the client's
    lock rule and the sidecar's `horizon_alignment` both read it)."""

    def __init__(
        self,
        k: int,
        *,
        max_rank: int | None = None,
        matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.matmul,
    ) -> None:
        self.k = k
        self.matmul = matmul  # Sim_K's float64 product (`sim_k`)
        # Sim_K's denominator: K, or min(m, n) for a matrix too small to have K directions (V_K
        # is still padded to K columns, with zeros)
        self.k_sim = k if max_rank is None else max(1, min(k, max_rank))
        self.checks = 0
        self.snapshots: list[tuple[int, int, torch.Tensor]] = []  # (check index, step, V_K)
        self._positions: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # state's cache

    def observe(self, step: int, V_K: torch.Tensor | None) -> tuple[float | None, int | None]:
        """Record one check (V_K None when ΔW = 0): (Sim_K(t, h(t)), h(t)'s step), or
        (None, None) without V_K or without a kept check."""
        self.checks += 1
        if V_K is None:
            return None, None
        V_K = pad_columns(V_K, self.k)
        alignment = horizon_step = None
        pos = horizon_position([s for _, s, _ in self.snapshots], step)
        if pos is not None:
            _, horizon_step, V_h = self.snapshots[pos]
            alignment = sim_k(V_K, V_h, self.k_sim, self.matmul)
            del self.snapshots[:pos]  # older ones can never be the horizon again
        if is_snapshot_check(self.checks):  # contiguous, as a restored state holds it
            self.snapshots.append((self.checks, step, V_K.contiguous()))
        return alignment, horizon_step

    def state_dict(self, snapshots: bool = True) -> dict:
        """Plain tensors and ints (no pickle needed to store it); `snapshots=False` leaves out the
        stacked V_K snapshots (`snapshot_V`) for a caller that keeps them apart (the sidecar
        archives each once)."""
        n = self.snapshots[0][2].shape[0] if self.snapshots else 0
        index, step = self._snapshot_positions()
        state = {"k": self.k, "checks": self.checks, "snapshot_index": index, "snapshot_step": step}
        if snapshots:
            state["snapshot_V"] = (
                torch.stack([V.detach().float().cpu() for _, _, V in self.snapshots])
                if self.snapshots
                else torch.zeros((0, n, self.k))
            )
        return state

    def _snapshot_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The snapshots' check indices and steps as int64 tensors, the same tensor objects
        until the snapshots change (the sidecar writes a state tensor only when it changed)."""
        key = tuple((i, s) for i, s, _ in self.snapshots)
        if self._positions is None or self._positions[0] != key:
            index = torch.tensor([i for i, _ in key], dtype=torch.int64)
            self._positions = (key, index, torch.tensor([s for _, s in key], dtype=torch.int64))
        return self._positions[1], self._positions[2]

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        self.k = int(state["k"])
        self.checks = int(state["checks"])
        self.snapshots = [
            (int(i), int(s), V.to(device))
            for i, s, V in zip(
                state["snapshot_index"].tolist(),
                state["snapshot_step"].tolist(),
                state["snapshot_V"],
                strict=True,
            )
        ]


class LockState:
    """The lock rule of one matrix on its horizon: the streak and the lock reference."""

    def __init__(
        self,
        k: int,
        settings: LockSettings = LockSettings(),
        *,
        max_rank: int | None = None,
    ) -> None:
        self.horizon = Horizon(k, max_rank=max_rank)
        self.settings = settings
        self.streak = 0
        self.lock_step: int | None = None
        self.v_ref: torch.Tensor | None = None

    @property
    def locked(self) -> bool:
        return self.lock_step is not None

    def observe(
        self,
        step: int,
        V_K: torch.Tensor | None,
        energy: float | None,
        converged: bool = True,
    ) -> LockObservation:
        """Record one check (V_K None when ΔW = 0) and apply the lock rule."""
        alignment, horizon_step = self.horizon.observe(step, V_K)
        rule = self.settings
        passing = (
            alignment is not None
            and converged
            and energy is not None
            and alignment >= rule.threshold
            and energy >= rule.min_energy
        )
        self.streak = self.streak + 1 if passing else 0
        locked_now = False
        if not self.locked and V_K is not None:
            by_step = rule.at_step is not None and step >= rule.at_step
            if self.streak >= rule.patience or by_step:
                self.lock_step = step
                self.v_ref = pad_columns(V_K, self.horizon.k)
                locked_now = True
        return LockObservation(alignment, horizon_step, locked_now)

    def copy(self) -> LockState:
        """An independent copy to observe a check on before it is kept (the snapshot list is
        copied; its V_K tensors are never modified in place, so they are shared)."""
        other = copy.copy(self)
        other.horizon = copy.copy(self.horizon)
        other.horizon.snapshots = list(self.horizon.snapshots)
        return other

    def restore(self, lock_step: int, v_ref: torch.Tensor) -> None:
        """Adopt a lock reference (e.g. sent back by the sidecar after a trainer restart)."""
        self.lock_step = int(lock_step)
        self.v_ref = pad_columns(v_ref, self.horizon.k)

    def state_dict(self) -> dict:
        """Plain tensors and ints (no pickle needed to store it)."""
        state = self.horizon.state_dict()
        state["streak"] = self.streak
        state["lock_step"] = -1 if self.lock_step is None else self.lock_step
        if self.v_ref is not None:
            state["v_ref"] = self.v_ref.detach().float().cpu()
        return state

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        self.horizon.load_state_dict(state, device)
        self.streak = int(state["streak"])
        lock_step = int(state["lock_step"])
        self.lock_step = None if lock_step < 0 else lock_step
        self.v_ref = state["v_ref"].to(device) if "v_ref" in state else None

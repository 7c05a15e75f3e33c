"""The horizon lock rule (client/lock.py): log-spaced snapshots, the horizon, the streak."""

from __future__ import annotations

import torch
from deltawatch.client.lock import LockState, horizon_position, is_snapshot_check
from deltawatch.client.settings import LockSettings

N, K = 40, 4


def basis(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(N, K, generator=g))[0]


def test_snapshots_at_powers_of_two_and_horizon_nearest_half_ties_later() -> None:
    assert [i for i in range(1, 20) if is_snapshot_check(i)] == [1, 2, 4, 8, 16]
    assert horizon_position([], 10) is None
    assert horizon_position([1, 2], 3) == 1  # 1.5: tie between 1 and 2 -> the later
    assert horizon_position([2, 4], 10) == 1
    assert horizon_position([10, 20, 40], 50) == 1  # 25 is nearest to 20


def test_only_the_snapshots_still_needed_are_kept() -> None:
    lock = LockState(K)
    V = basis(0)
    for step in range(1, 101):
        lock.observe(step, V, 1.0)
    steps = [s for _, s, _ in lock.horizon.snapshots]
    assert steps == [64]  # at step 100 the horizon is 64: older ones can never be again
    assert len(lock.horizon.snapshots) <= 3


def test_locks_after_patience_checks_and_takes_v_ref_then() -> None:
    lock = LockState(K, LockSettings(threshold=0.9, patience=3, min_energy=0.5))
    V = basis(0)
    observed = [lock.observe(step, V, 0.8) for step in range(1, 8)]
    # check 1 has no horizon; checks 2, 3, 4 pass -> locks at check 4
    assert observed[0].horizon_alignment is None
    assert abs(observed[1].horizon_alignment - 1.0) < 1e-6
    assert [o.locked_now for o in observed] == [False, False, False, True, False, False, False]
    assert lock.lock_step == 4 and torch.equal(lock.v_ref, V)


def test_low_energy_or_a_null_horizon_breaks_the_streak() -> None:
    lock = LockState(K)
    V = basis(0)
    lock.observe(1, V, 0.9)
    lock.observe(2, V, 0.9)
    lock.observe(3, V, 0.9)
    lock.observe(4, None, None)  # ΔW = 0: breaks the streak
    lock.observe(5, V, 0.9)
    lock.observe(6, V, 0.3)  # top-K energy below lock_min_energy
    lock.observe(7, V, 0.9)
    lock.observe(8, V, 0.9, converged=False)  # estimate not converged
    assert not lock.locked
    for step in (9, 10, 11):
        lock.observe(step, V, 0.9)
    assert lock.lock_step == 11


def test_a_moving_subspace_never_locks_and_lock_at_step_forces_it() -> None:
    lock = LockState(K)
    for step in range(1, 60):
        obs = lock.observe(step, basis(step), 1.0)
        assert obs.horizon_alignment is None or obs.horizon_alignment < 0.9
    assert not lock.locked
    forced = LockState(K, LockSettings(at_step=30))
    for step in range(1, 40):
        forced.observe(step, basis(step), 1.0)
    assert forced.lock_step == 30 and torch.equal(forced.v_ref, basis(30))


def test_state_dict_round_trip_continues_identically() -> None:
    a, b = LockState(K), LockState(K)
    for step in range(1, 12):
        a.observe(step, basis(step % 3), 0.9)
    b.load_state_dict(a.state_dict())
    for step in range(12, 30):
        oa, ob = a.observe(step, basis(step % 3), 0.9), b.observe(step, basis(step % 3), 0.9)
        assert (oa.horizon_step, oa.locked_now) == (ob.horizon_step, ob.locked_now)
        assert abs(oa.horizon_alignment - ob.horizon_alignment) < 1e-12
    assert a.lock_step == b.lock_step


def test_a_matrix_with_fewer_than_k_directions_can_lock() -> None:
    """min(m, n) < K: Sim is taken over the min(m, n) directions there are (V_K padded with zero
    columns), so an update that keeps its subspace reads 1, not min(m, n)/K."""
    lock = LockState(K, max_rank=2)
    V = basis(0)[:, :2]
    observed = [lock.observe(step, V, 1.0) for step in range(1, 5)]
    assert abs(observed[1].horizon_alignment - 1.0) < 1e-6
    assert lock.lock_step == 4 and lock.v_ref.shape == (N, K)

"""The sharded reductions of client/collectives.py on a real gloo job (torchrun, 4 CPU processes):
rows split, columns split, and a 2×2 mesh (both), with uneven and empty blocks. Every check's
exact statistics, anchor thresholds, lock decision (the OPD-like run locks at check 4 of 5), the
channel energy and the sketch must equal the single-process tracker's, and G must be bitwise
identical on every rank (the lock depends on it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deltawatch.client.collectives import ShardSpec  # noqa: E402
from deltawatch.client.tracker import MatrixTracker  # noqa: E402
from test_core_trajectories import pretrained_like, trajectory  # noqa: E402

NAME = "model.layers.5.mlp.down_proj.weight"
M, N, STEPS = 96, 160, 5
# (row bounds per row block, column bounds per column block); 4 ranks = row blocks × col blocks
LAYOUTS = {
    "rows, one empty": ([0, 10, 50, 50, 96], [0, 160]),
    "columns, uneven": ([0, 96], [0, 60, 61, 100, 160]),
    "2x2 mesh, uneven": ([0, 30, 96], [0, 100, 160]),
    "2x2 mesh, empty row block": ([0, 96, 96], [0, 70, 160]),
}


def worker() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    W0 = pretrained_like(M, N, seed=31)
    steps = list(trajectory("opd", W0, STEPS))
    single = MatrixTracker.attach(NAME, W0)
    reference = [single.check(W, step) for step, W in steps]
    # every group is created on every rank, in the same order
    row_groups = {j: dist.new_group([j, 2 + j]) for j in range(2)}  # 2×2: same column block
    col_groups = {i: dist.new_group([2 * i, 2 * i + 1]) for i in range(2)}  # same row block
    for layout, (rows, cols) in LAYOUTS.items():
        n_row_blocks, n_col_blocks = len(rows) - 1, len(cols) - 1
        i, j = divmod(rank, n_col_blocks)
        if n_row_blocks == 4:
            row_group, col_group = dist.group.WORLD, None
        elif n_col_blocks == 4:
            row_group, col_group = None, dist.group.WORLD
        else:
            row_group, col_group = row_groups[j], col_groups[i]
        spec = ShardSpec(
            (M, N), rows[i], rows[i + 1] - rows[i], cols[j], cols[j + 1] - cols[j],
            row_group, col_group,
        )  # fmt: skip
        tracker = MatrixTracker.attach(NAME, W0[spec.rows, spec.cols], shape=(M, N), spec=spec)
        assert float(tracker.anchor.a) == float(single.anchor.a), layout
        assert abs(float(tracker.anchor.b) - float(single.anchor.b)) <= 1e-12, layout
        for (step, W), ref in zip(steps, reference, strict=True):
            check = tracker.check(W[spec.rows, spec.cols], step)
            where = f"{layout}, rank {rank}, step {step}"
            assert abs(check.frobenius_sq - ref.frobenius_sq) <= 1e-6 * ref.frobenius_sq, where
            assert check.visible_count == ref.visible_count, where
            assert check.visible_low_count == ref.visible_low_count, where
            assert check.visible_principal_count == ref.visible_principal_count, where
            assert check.lock_step == ref.lock_step and check.locked_now == ref.locked_now, where
            assert check.update.power_steps == ref.update.power_steps, where
            scale = float(ref.update.G.abs().max())
            assert torch.allclose(check.update.G, ref.update.G, atol=1e-4 * scale), where
            if ref.channel_energy_sq is not None:
                error = abs(check.channel_energy_sq - ref.channel_energy_sq)
                assert error <= 1e-5 * ref.channel_energy_sq, where
            everyone = [torch.empty_like(check.update.G) for _ in range(4)]
            dist.all_gather(everyone, check.update.G)
            assert all(torch.equal(g, everyone[0]) for g in everyone), where
    dist.destroy_process_group()
    print(f"rank {rank}: ok", flush=True)


@pytest.mark.timeout(300)
def test_sharded_checks_equal_the_single_process() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
        + [__file__],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    assert done.stdout.count(": ok") == 4


if __name__ == "__main__":
    worker()

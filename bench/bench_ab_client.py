"""Client check, before/after in one process: the default toy's 14 matrices (bench_hook.py's Qwen3
toy shapes, two blocks) as same-shape `MatrixGroup`s, checked by another checkout's client and by
this tree's, alternately, from the same state on the same synthetic weights.

The other checkout (`--base`, e.g. a `git worktree` of an earlier commit) is imported as the
package `dwbase` (its client's imports are relative, its protos are this tree's), so both run in
this process, on the same cores, interleaved check by check: the ratio is what to read on a noisy
machine. Prints each check's wall time, both clients' power steps (the same when the change keeps
the numerics) and the median ratio.

    git worktree add /tmp/base <commit>
    .venv/bin/python bench/bench_ab_client.py --base /tmp/base --threads 1 --checks 16
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from deltawatch.client import batch, collectives, tracker

# bench_hook.py's default toy (hidden 512, head_dim 64: 8 heads, 4 KV heads, MLP 1536)
SHAPES = {
    "self_attn.q_proj": (512, 512),
    "self_attn.k_proj": (256, 512),
    "self_attn.v_proj": (256, 512),
    "self_attn.o_proj": (512, 512),
    "mlp.gate_proj": (1536, 512),
    "mlp.up_proj": (1536, 512),
    "mlp.down_proj": (512, 1536),
}
LAYERS = 2


def base_client(path: Path):
    """(batch, tracker, collectives) of the checkout at `path`, imported as `dwbase.client`."""
    root = Path(tempfile.mkdtemp(prefix="deltawatch-ab-"))
    (root / "dwbase").mkdir()
    (root / "dwbase" / "__init__.py").write_text("")
    (root / "dwbase" / "client").symlink_to(path.resolve() / "client")
    sys.path.insert(0, str(root))
    return tuple(
        importlib.import_module(f"dwbase.client.{m}") for m in ("batch", "tracker", "collectives")
    )


def weights(seed: int = 0):
    """W0 and W(t) = W0 + a growing rank-4 channel + faint dense noise, per matrix."""
    g = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i}.{m}.weight" for m in SHAPES for i in range(LAYERS)]
    W0 = {
        n: 0.02 * torch.randn(*SHAPES[n.split(".", 3)[3][: -len(".weight")]], generator=g)
        for n in names
    }
    U = {
        n: (torch.randn(w.shape[0], 4, generator=g), torch.randn(4, w.shape[1], generator=g))
        for n, w in W0.items()
    }

    def at(t: int) -> dict[str, torch.Tensor]:
        noise = torch.Generator().manual_seed(seed + t)
        return {
            n: W0[n]
            + 3e-4 * t * (U[n][0] @ U[n][1])
            + 2e-4 * t**0.5 * torch.randn(W0[n].shape, generator=noise)
            for n in W0
        }

    return W0, at


def groups(T, B, W0: dict[str, torch.Tensor], current: dict[str, torch.Tensor]):
    """One MatrixGroup per shape (its LAYERS members), reading `current`'s weights."""
    out = []
    for module in SHAPES:
        names = [f"model.layers.{i}.{module}.weight" for i in range(LAYERS)]
        trackers = [T.MatrixTracker.attach(n, W0[n].clone()) for n in names]
        out.append(B.MatrixGroup(trackers, lambda names=names: [current[n] for n in names]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, required=True, help="the other checkout (its client/)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checks", type=int, default=16)
    ap.add_argument("--every", type=int, default=10, help="steps of movement between checks")
    ap.add_argument("--warmup", type=int, default=2, help="checks not timed")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    OB, OT, OC = base_client(a.base)
    W0, at = weights()
    current = dict(W0)
    clients = {
        "base": (groups(OT, OB, W0, current), OC),
        "this": (groups(tracker, batch, W0, current), collectives),
    }
    times: dict[str, list[float]] = {"base": [], "this": []}
    print(f"# {len(W0)} matrices in {len(SHAPES)} groups, {a.threads} threads; base {a.base}")
    print("| check | base ms | this ms | base power steps | this power steps |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for t in range(1, a.checks + 1):
        current.update(at(a.every * t))
        order = ("base", "this") if t % 2 else ("this", "base")  # alternate who goes first
        row: dict[str, tuple[float, int]] = {}
        for label in order:
            gs, C = clients[label]
            t0 = time.perf_counter()
            checks = [g.check(t, C.CheckSession(None, "cpu", step=t)) for g in gs]
            dt = 1e3 * (time.perf_counter() - t0)
            steps = sum(
                c.update.power_steps + (c.weight.power_steps if c.weight else 0)
                for cs in checks
                for c in cs
            )
            row[label] = (dt, steps)
            if t > a.warmup:
                times[label].append(dt)
        print(
            f"| {t} | {row['base'][0]:.0f} | {row['this'][0]:.0f} | {row['base'][1]} | {row['this'][1]} |"
        )
    base, this = statistics.median(times["base"]), statistics.median(times["this"])
    print()
    print(
        f"median over checks {a.warmup + 1}-{a.checks}: base {base:.0f} ms, this {this:.0f} ms, this / base {this / base:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

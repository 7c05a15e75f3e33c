"""Packed-experts benchmark: one check of a Qwen3-30B-A3B-shaped expert part (128 experts of
768×2048: `mlp.experts.gate_up_proj`'s gate half, [E, f = 768, d = 2048]) through the batched
`ExpertGroup` against a loop of per-expert `MatrixTracker`s, in the same process, on the same
weights, plus the flops-and-bytes bound measured on this machine.

The trajectory: W0 with random Gaussian entries (std 0.02, fp32); at check t, per expert,
W_t = W0 + t·2e-3·A_e·B_e/K (rank 4) + t^½·3e-4·N (fresh noise), so every expert moves. Checks
1..`--checks`, the two paths interleaved (batched, loop, loop, batched, ...) so machine noise hits
both alike; the table gives, per check, the median over repeats of each path's wall time and
their ratio, and the bound:

    bound = Σ power steps · t_step + 2 · t_pass

t_step is the measured time of one batched power step P = ΔW·V, G = ΔWᵀ·P on the whole [E, m, n]
stack (the flops: 4·m·n·r per expert), t_pass the measured time of one elementwise pass forming ΔW
(read W_t and W0, write ΔW: the bytes), counted twice (ΔW and view(W_t)); the power steps are
those the check actually ran (the sketches' `power_steps`, ΔW's and W_t's trackers). Attach
(anchors: exact Gram eigendecompositions, masks) is timed once per path.

    .venv/bin/python bench/bench_moe.py                      # 8 experts on the CPU (memory, time)
    .venv/bin/python bench/bench_moe.py --experts 128 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from deltawatch.client.collectives import CheckSession
from deltawatch.client.experts import ExpertGroup
from deltawatch.client.sketch import batched_power_step, highest_precision
from deltawatch.client.tracker import MatrixTracker


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str) -> tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def trajectory(E: int, m: int, n: int, device: str):
    """W0 and a function t -> W_t (module docstring)."""
    g = torch.Generator().manual_seed(0)
    W0 = (0.02 * torch.randn(E, m, n, generator=g)).to(device)
    A = torch.randn(E, m, 4, generator=g).to(device)
    B = torch.randn(E, 4, n, generator=g).to(device)

    def at(t: int) -> torch.Tensor:
        noise = torch.randn(E, m, n, generator=torch.Generator().manual_seed(t)).to(device)
        return W0 + t * 2e-3 * torch.bmm(A, B) / 16 + 3e-4 * t**0.5 * noise

    return W0, at


def bound_parts(E: int, m: int, n: int, r: int, device: str, repeats: int) -> tuple[float, float]:
    """(t_step, t_pass): one batched power step on [E, m, n], one pass forming ΔW (medians)."""
    A = torch.randn(E, m, n, device=device)
    V = torch.randn(E, n, r, device=device)
    W0 = A.to(torch.bfloat16)
    D = torch.empty_like(A)
    with highest_precision():
        steps = [_timed(lambda: batched_power_step(A, V), device)[0] for _ in range(repeats)]
    passes = [
        _timed(lambda: D.copy_(A.to(torch.bfloat16)).sub_(W0), device)[0] for _ in range(repeats)
    ]
    return statistics.median(steps), statistics.median(passes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rows", type=int, default=768)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--checks", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1, help="timed repeats of each check")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    E, m, n, dev = a.experts, a.rows, a.cols, a.device
    W0, at = trajectory(E, m, n, dev)
    param = torch.nn.Parameter(W0.clone())
    names = [f"model.layers.0.mlp.experts.{e}.gate_proj.weight" for e in range(E)]
    t_attach_b, group = _timed(lambda: ExpertGroup(param, None, list(range(E)), 0, names), dev)
    t_attach_l, loop = _timed(
        lambda: [MatrixTracker.attach(nm, W0[e].clone()) for e, nm in enumerate(names)], dev
    )
    r = group.trackers[0].r
    t_step, t_pass = bound_parts(E, m, n, r, dev, max(3, a.repeats))
    print(f"# {E} experts of {m}x{n} on {dev} ({a.threads} threads), r = {r}")
    print(f"attach: batched {t_attach_b:.2f} s, loop {t_attach_l:.2f} s")
    print(
        f"bound parts: one batched power step {t_step * 1e3:.1f} ms, one ΔW pass {t_pass * 1e3:.1f} ms"
    )
    print()
    print(
        "| check | power steps (ΔW + W_t, all experts) | batched s | loop s | loop / batched | batched / bound |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for t in range(1, a.checks + 1):
        with torch.no_grad():
            param.copy_(at(t))
        W = param.detach()
        times_b, times_l = [], []
        for rep in range(a.repeats):  # the last repeat's results move the bases on
            first_b = rep % 2 == 0
            for path in ("b", "l") if first_b else ("l", "b"):
                if path == "b":
                    # re-run from the same state: the group applies its state only at the end
                    saved = [(x.V, x.V_w, x.lock, x.fresh) for x in group.trackers]
                    dt, checks = _timed(
                        lambda t=t: group.check(t, CheckSession(None, dev, step=t)), dev
                    )
                    if rep < a.repeats - 1:
                        for x, s in zip(group.trackers, saved, strict=True):
                            x.V, x.V_w, x.lock, x.fresh = s
                    times_b.append(dt)
                else:
                    saved = [(x.V, x.V_w, x.lock, x.fresh) for x in loop]
                    dt, _ = _timed(
                        lambda W=W, t=t: [x.check(W[e], t) for e, x in enumerate(loop)], dev
                    )
                    if rep < a.repeats - 1:
                        for x, s in zip(loop, saved, strict=True):
                            x.V, x.V_w, x.lock, x.fresh = s
                    times_l.append(dt)
        steps = sum(c.update.power_steps + c.weight.power_steps for c in checks) / E
        bound = steps * t_step + 2 * t_pass
        tb, tl = statistics.median(times_b), statistics.median(times_l)
        print(
            f"| {t} | {steps:.2f} per expert | {tb:.2f} | {tl:.2f} | {tl / tb:.2f} | {tb / bound:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

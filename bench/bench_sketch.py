"""Accuracy and cost of deltawatch's warm-started sketch against the tools a user would otherwise
reach for: `torch.svd_lowrank` run from scratch every check, and a full SVD.

For each shape and each synthetic trajectory (bench/trajectories.py: OPD-, SFT- and RLVR-like
updates of a pretrained-like W0, checks every step) it runs, per check t = 1 … T:

(a) deltawatch: `MatrixTracker.check` (forming ΔW = f32(bf16(W_t)) − f32(bf16(W0)), the exact
    statistics with the bitwise comparison and both masks, the ΔW tracker and the W_t tracker),
    timed as a whole; and the sketch step alone — the same number of power steps
    (P = ΔW·V, G = ΔWᵀP, Krylov Rayleigh–Ritz, error bound, V ← orth(G)) replayed from the
    tracker's basis before the check on a ΔW formed beforehand. Estimates are the sidecar's
    (`MatrixGeometry.ingest`), so a null there (bound above tolerance) is reported as such;
(b) `torch.svd_lowrank(ΔW, q=K+p, niter)` for niter in 0, 1, 2, 4, from scratch;
(c) `torch.linalg.svdvals(ΔW)` in float32 on the device (a full SVD, singular values only).

Errors are relative, |estimate − exact| / exact, for the stable rank ‖ΔW‖_F²/σ1², σ1 and the
top-K energy Σ_{i≤K} σ_i² / ‖ΔW‖_F², against the exact float64 spectrum of the same ΔW: the
eigenvalues of the float64 Gram matrix of ΔW's smaller side (σ_i² to ~1e-16·σ1² absolute),
with ‖ΔW‖_F² summed in float64. The reference is not timed. The Frobenius norm is exact for every
method (every tool has ΔW at hand), so the stable-rank error is the σ1 error, doubled.

Flops (leading terms): a power step 4·m·n·r + 6·n·r² (r = K + p); `svd_lowrank`
4·m·n·q·(niter + 1) plus its QRs 4·q²·(m + n)·(niter + 1); `svdvals` 4·m·n² − 4n³/3 (m ≥ n,
Golub–Reinsch without vectors); a whole check adds the W_t tracker's power steps and ~10·m·n
for the elementwise passes.

Timing: matmuls in float32 with TF32 off for every method; warm-ups first; CUDA synchronised
around every timed region; the median of repeats. The whole check is repeated by saving and
restoring the tracker's state (`state_dict`), so each repeat does the same work.

    python bench/bench_sketch.py                       # 1024², 4096², 4096×12288 on the CPU
    python bench/bench_sketch.py --shapes 1024x1024 --json out.json
    python bench/bench_sketch.py --device cuda --shapes 4096x4096,12288x4096
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from deltawatch.client.anchor import Anchor
from deltawatch.client.records import MatrixCheck
from deltawatch.client.settings import VIEWS, AnchorSettings, SketchSettings
from deltawatch.client.sketch import (
    compress,
    error_bound,
    generalized_eigh,
    highest_precision,
    krylov_products,
    orth,
    power_step,
    rayleigh_ritz,
)
from deltawatch.client.tracker import MatrixTracker
from deltawatch.sidecar.geometry import MatrixGeometry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trajectories import KINDS, pretrained_like, trajectory  # noqa: E402

DEFAULT_SHAPES = "1024x1024,4096x4096,4096x12288"
ERROR_KEYS = ("stable_rank", "spectral_norm", "topk_energy_ratio")
# Relative errors at or below this are float32 rounding (the sums behind them are float32): they
# count as equal when accuracies are matched.
ERROR_FLOOR = 1e-5
SHORT = {"stable_rank": "sr", "spectral_norm": "σ1", "topk_energy_ratio": "E_K"}


# -- timing -------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timing(NamedTuple):
    """Seconds of wall time, and of this process's CPU time (all its threads): on a shared CPU
    the wall time also counts the time other processes held the cores, the CPU time does not."""

    wall: float
    cpu: float


def timed(fn: Callable[[], object], device: torch.device) -> tuple[Timing, object]:
    """(timing, result) of one call, synchronised on CUDA."""
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    sync(device)
    return Timing(time.perf_counter() - t0, time.process_time() - c0), out


def median_time(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int,
    warmups: int,
    setup: Callable[[], object] | None = None,
) -> tuple[Timing, object]:
    """Medians (wall and CPU separately) over `repeats` calls after `warmups` untimed ones; the
    last result. `setup` runs, untimed, before every call."""
    out = None
    times = []
    for i in range(warmups + max(1, repeats)):
        if setup is not None:
            setup()
        t, out = timed(fn, device)
        if i >= warmups:
            times.append(t)
    return median_timing(times), out


def median_timing(times: list[Timing]) -> Timing:
    return Timing(statistics.median(t.wall for t in times), statistics.median(t.cpu for t in times))


# -- flops --------------------------------------------------------------------------------------


def power_step_flops(m: int, n: int, r: int) -> float:
    """4·m·n·r (the two products with ΔW) + 6·n·r² (C, orth, Rayleigh–Ritz)."""
    return 4.0 * m * n * r + 6.0 * n * r * r


def lowrank_flops(m: int, n: int, q: int, niter: int) -> float:
    """torch.svd_lowrank: 4·m·n·q·(niter + 1) for the products, 4·q²·(m + n)·(niter + 1) QRs."""
    return 4.0 * m * n * q * (niter + 1) + 4.0 * q * q * (m + n) * (niter + 1)


def svdvals_flops(m: int, n: int) -> float:
    """Golub–Reinsch singular values only: 4·m·n² − 4n³/3 with m ≥ n."""
    m, n = max(m, n), min(m, n)
    return 4.0 * m * n * n - 4.0 * n**3 / 3.0


# -- the exact reference ------------------------------------------------------------------------


def exact_spectrum(D: torch.Tensor, k: int) -> dict[str, float]:
    """Stable rank, σ1 and top-K energy of D from the float64 Gram matrix of its smaller side."""
    D64 = D.double()
    frob_sq = float(D64.square().sum())
    gram = D64 @ D64.T if D.shape[0] <= D.shape[1] else D64.T @ D64
    lam = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
    s1_sq = float(lam[0])
    return {
        "frobenius_sq": frob_sq,
        "stable_rank": frob_sq / s1_sq,
        "spectral_norm": math.sqrt(s1_sq),
        "topk_energy_ratio": float(lam[:k].sum()) / frob_sq,
    }


def from_singular_values(S: torch.Tensor, frob_sq: float, k: int) -> dict[str, float]:
    """The three estimates from estimated singular values and the exact ‖ΔW‖_F²."""
    S = S.double()
    s1 = float(S[0])
    return {
        "stable_rank": frob_sq / (s1 * s1),
        "spectral_norm": s1,
        "topk_energy_ratio": float(S[:k].square().sum()) / frob_sq,
    }


def relative_errors(est: dict, exact: dict) -> dict[str, float | None]:
    return {
        key: None if est.get(key) is None else abs(est[key] - exact[key]) / abs(exact[key])
        for key in ERROR_KEYS
    }


# -- deltawatch ---------------------------------------------------------------------------------


def delta_view(W: torch.Tensor, W0_view: torch.Tensor) -> torch.Tensor:
    """ΔW exactly as the tracker forms it: f32(view(W_t)) − f32(view(W0))."""
    return W.to(W0_view.dtype).float() - W0_view.float()


def replay_sketch(D: torch.Tensor, V: torch.Tensor, steps: int, k: int) -> torch.Tensor:
    """The tracker's power loop (MatrixTracker._iterate) for a fixed number of steps (no early
    exit): power steps, Rayleigh–Ritz on their block Krylov space and the error bound after each,
    the compression to r directions and the next basis; its cost alone."""
    Vs, Gs = [], []
    frob_sq = float(torch.linalg.vector_norm(D, dtype=torch.float64).square())
    for step in range(1, steps + 1):
        _, G_j, _ = power_step(D, V)
        Vs.append(V)
        Gs.append(G_j)
        G, H, M, N = krylov_products(Vs, Gs)
        theta, Z = generalized_eigh(H, M)
        error_bound(theta, H, M, N, k, frob_sq)
        if step < steps:
            V = orth(G_j)
    G_w, _ = compress(G, M, Z, V.shape[1])
    return orth(G_w)


def tracker_estimates(keys: dict, check: MatrixCheck, k: int) -> tuple[dict, bool]:
    """(estimates, reported): the sidecar's keys; where it reports null (error bound above
    tolerance), the raw Ritz estimate instead, flagged by reported=False."""
    if keys.get("stable_rank") is not None:
        return {key: keys[key] for key in ERROR_KEYS}, True
    if check.update is None:
        return dict.fromkeys(ERROR_KEYS), False
    theta, _ = rayleigh_ritz(check.update.G, check.update.C)
    return from_singular_values(theta.clamp_min(0).sqrt(), check.frobenius_sq, k), False


# -- one shape ----------------------------------------------------------------------------------


def repeats_for(numel: int, device: torch.device, forced: int | None) -> int:
    if forced is not None:
        return forced
    if device.type == "cuda":
        return 5
    return 3 if numel <= 2_000_000 else 2 if numel <= 20_000_000 else 1


def run_shape(args: argparse.Namespace, m: int, n: int, device: torch.device) -> dict:
    K, r = args.channel_rank, args.channel_rank + args.oversample
    numel = m * n
    reps = repeats_for(numel, device, args.repeats)
    full_svd = args.skip_full_svd_above is None or numel <= args.skip_full_svd_above
    W0 = pretrained_like(m, n, seed=args.seed, device=device)
    settings = AnchorSettings(view=args.view, location=args.anchor)
    sketch = SketchSettings(
        channel_rank=K, oversample=args.oversample, max_power_steps=args.max_power_steps
    )
    attach, anchor = timed(
        lambda: Anchor(W0, settings=settings, sketch=sketch, name=f"bench.{m}x{n}"), device
    )
    W0_view = W0.to(anchor.dtype)
    t_attach = attach.wall
    log(f"{m}x{n}: anchor built in {t_attach:.2f} s ({reps} repeats)")

    def tracker(name: str) -> MatrixTracker:
        return MatrixTracker(name, anchor)

    # warm-ups at this size: a throwaway tracker check, the products, the full SVD
    Wt = W0 + 1e-3 * torch.ones_like(W0)
    for _ in range(max(1, args.warmups)):
        tracker("warmup").check(Wt, 1)
        torch.svd_lowrank(delta_view(Wt, W0_view), q=r, niter=1)
    if full_svd:
        small = min(m, n, 512)
        torch.linalg.svdvals(torch.randn(small, small, device=device))
        if device.type == "cuda":
            torch.linalg.svdvals(delta_view(Wt, W0_view))
    del Wt

    result = {"shape": [m, n], "numel": numel, "repeats": reps, "attach_seconds": t_attach}
    result["full_svd"] = full_svd
    kinds = {}
    for kind_index, kind in enumerate(args.kinds):
        with_svd = full_svd and kind in args.full_svd_kinds
        kinds[kind] = run_kind(args, kind, kind_index, W0, W0_view, tracker, device, reps, with_svd)
    result["kinds"] = kinds
    # the full SVD's cost does not depend on the trajectory: kinds it was not run on get the
    # median over the runs of the others
    runs = [Timing(*t) for data in kinds.values() for t in data["summary"]["full_svd_runs"]]
    if runs:
        shared = median_timing(runs)
        for data in kinds.values():
            summary = data["summary"]
            summary["full_svd_shared"] = not summary["full_svd_runs"]
            if not summary["full_svd_runs"]:
                summary["full_svd_seconds"], summary["full_svd_cpu_seconds"] = shared
    result["flops"] = {
        "power_step": power_step_flops(m, n, r),
        "svd_lowrank": {str(k): lowrank_flops(m, n, r, k) for k in args.niters},
        "svdvals": svdvals_flops(m, n),
    }
    return result


def run_kind(
    args: argparse.Namespace,
    kind: str,
    kind_index: int,
    W0: torch.Tensor,
    W0_view: torch.Tensor,
    tracker: Callable[[str], MatrixTracker],
    device: torch.device,
    reps: int,
    full_svd: bool,
) -> dict:
    m, n = W0.shape
    K, r = args.channel_rank, args.channel_rank + args.oversample
    tr = tracker(f"bench.{kind}")
    geometry = MatrixGeometry((m, n), channel_rank=K)
    geometry.baseline(tr.baseline())
    checks = []
    lowrank_times: dict[int, list[Timing]] = {k: [] for k in args.niters}
    full_times: list[Timing] = []
    at: dict[str, dict] = {}
    walk = trajectory(kind, W0, steps=args.checks, seed=args.seed + 1 + kind_index)
    for step, W in enumerate(walk, 1):
        state = tr.state_dict()

        t_check, check = median_time(
            lambda W=W, step=step: tr.check(W, step),
            device,
            reps,
            warmups=0,
            setup=lambda state=state: tr.load_state_dict(state),
        )
        keys = geometry.ingest(check)
        D = delta_view(W, W0_view)
        steps = check.update.power_steps if check.update is not None else 0
        weight_steps = 0 if check.update is None else check.weight.power_steps
        t_sketch = Timing(0.0, 0.0)
        if steps:
            V0 = state["V"].to(device)
            with highest_precision():
                t_sketch, _ = median_time(
                    lambda V0=V0, D=D, steps=steps: replay_sketch(D, V0, steps, K),
                    device,
                    reps,
                    warmups=0,
                )
        row = {
            "step": step,
            "check_seconds": t_check.wall,
            "check_cpu_seconds": t_check.cpu,
            "sketch_seconds": t_sketch.wall,
            "sketch_cpu_seconds": t_sketch.cpu,
            "power_steps": steps,
            "weight_power_steps": weight_steps,
            "convergence": None if check.update is None else check.update.convergence,
            "visible_ratio": check.visible_count / check.numel,
            "locked": check.lock_step is not None,
        }
        checks.append(row)
        if step in args.report_at:
            exact = exact_spectrum(D, K)
            est, reported = tracker_estimates(keys, check, K)
            bound = None if check.update is None else check.update.convergence
            point = {
                "exact": exact,
                "deltawatch": {
                    "errors": relative_errors(est, exact),
                    "reported": reported,
                    "bound": bound,
                },
            }
            with highest_precision():
                for niter in args.niters:
                    torch.manual_seed(args.seed + 1000 * step + niter)
                    t, (_, S, _) = median_time(
                        lambda niter=niter, D=D: torch.svd_lowrank(D, q=r, niter=niter),
                        device,
                        reps,
                        warmups=0,
                    )
                    lowrank_times[niter].append(t)
                    est = from_singular_values(S, exact["frobenius_sq"], K)
                    point[f"svd_lowrank_{niter}"] = {"errors": relative_errors(est, exact)}
                if full_svd and step in args.full_svd_at:
                    t, S = timed(lambda D=D: torch.linalg.svdvals(D), device)
                    full_times.append(t)
                    est = from_singular_values(S, exact["frobenius_sq"], K)
                    point["full_svd"] = {"errors": relative_errors(est, exact)}
            at[str(step)] = point
        log(
            f"  {kind} check {step}: {1e3 * t_check.wall:.1f} ms whole, {1e3 * t_sketch.wall:.1f} ms "
            f"sketch, {steps}+{weight_steps} steps, conv {row['convergence']}"
        )
        del D
    flops = power_step_flops(m, n, r)
    elementwise = 10.0 * m * n
    mean = statistics.fmean
    summary = {
        "check_seconds": mean(c["check_seconds"] for c in checks),
        "check_cpu_seconds": mean(c["check_cpu_seconds"] for c in checks),
        "sketch_seconds": mean(c["sketch_seconds"] for c in checks),
        "sketch_cpu_seconds": mean(c["sketch_cpu_seconds"] for c in checks),
        "power_steps": mean(c["power_steps"] for c in checks),
        "weight_power_steps": mean(c["weight_power_steps"] for c in checks),
        "sketch_flops": mean(c["power_steps"] * flops for c in checks),
        "check_flops": mean(
            (c["power_steps"] + c["weight_power_steps"]) * flops + elementwise for c in checks
        ),
        "sketch_seconds_median": statistics.median(c["sketch_seconds"] for c in checks),
        "power_steps_median": statistics.median(c["power_steps"] for c in checks),
        "svd_lowrank_seconds": {str(k): median_timing(v).wall for k, v in lowrank_times.items()},
        "svd_lowrank_cpu_seconds": {str(k): median_timing(v).cpu for k, v in lowrank_times.items()},
        "full_svd_seconds": median_timing(full_times).wall if full_times else None,
        "full_svd_cpu_seconds": median_timing(full_times).cpu if full_times else None,
        "full_svd_runs": [list(t) for t in full_times],
        "lock_step": next((c["step"] for c in checks if c["locked"]), None),
    }
    return {"checks": checks, "at": at, "summary": summary}


def profile_step(args: argparse.Namespace, m: int, n: int, device: torch.device) -> None:
    """Where one power step's time goes: torch.profiler over 5 replayed steps (after 3 warm-up
    steps) on an SFT-like ΔW, the top ops by self time on the device (CUDA) or the CPU."""
    from torch.profiler import ProfilerActivity, profile

    K, r = args.channel_rank, args.channel_rank + args.oversample
    W0 = pretrained_like(m, n, seed=args.seed, device=device)
    W = next(trajectory("sft", W0, steps=1, seed=args.seed + 2))
    D = delta_view(W, W0.to(torch.bfloat16))
    V = orth(torch.randn(n, r, device=device))
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with highest_precision():
        replay_sketch(D, V, 3, K)
        sync(device)
        with profile(activities=activities) as prof:
            replay_sketch(D, V, 5, K)
            sync(device)
    keys = ["self_cpu_time_total"]
    if device.type == "cuda":  # kernel time, then host time (launches, synchronisations)
        keys.insert(0, "self_cuda_time_total")
    for key in keys:
        print(f"== one power step at {m}x{n} on {device} (5 steps profiled), by {key} ==")
        print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=40))


# -- report -------------------------------------------------------------------------------------


def fmt_err(value: float | None, reported: bool = True) -> str:
    if value is None:
        return "null"
    return f"{value:.1e}" + ("" if reported else "*")


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "skipped"
    ms = 1e3 * seconds
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def table(results: dict) -> str:
    """The plain-text tables: cost and accuracy per shape and kind, then the ratios."""
    lines = []
    report_at = results["settings"]["report_at"]
    niters = results["settings"]["niters"]
    err_head = "  ".join(f"{SHORT[k] + '@' + str(t):>8}" for t in report_at for k in ERROR_KEYS)
    for shape in results["shapes"]:
        m, n = shape["shape"]
        lines.append("")
        lines.append(
            f"== {m}x{n}  ({shape['repeats']} repeats; anchor built in "
            f"{shape['attach_seconds']:.2f} s) =="
        )
        lines.append(
            f"{'kind':<5} {'method':<24} {'ms/check':>9} {'cpu ms':>9} {'GFLOP':>8}  {err_head}"
        )
        flops = shape["flops"]
        for kind, data in shape["kinds"].items():
            s = data["summary"]
            at = data["at"]
            ex = at.get(str(report_at[-1]), {}).get("exact")
            rows = [
                (
                    f"deltawatch sketch ({s['power_steps']:.1f} st)",
                    s["sketch_seconds"],
                    s.get("sketch_cpu_seconds"),
                    s["sketch_flops"],
                    "deltawatch",
                ),
                (
                    "deltawatch whole check",
                    s["check_seconds"],
                    s.get("check_cpu_seconds"),
                    s["check_flops"],
                    "deltawatch",
                ),
            ]
            for k in niters:
                rows.append(
                    (
                        f"svd_lowrank niter={k}",
                        s["svd_lowrank_seconds"][str(k)],
                        s.get("svd_lowrank_cpu_seconds", {}).get(str(k)),
                        flops["svd_lowrank"][str(k)],
                        f"svd_lowrank_{k}",
                    )
                )
            rows.append(
                (
                    "full SVD (svdvals f32)",
                    s["full_svd_seconds"],
                    s.get("full_svd_cpu_seconds"),
                    flops["svdvals"],
                    "full_svd",
                )
            )
            for label, seconds, cpu, fl, method in rows:
                errs = []
                for t in report_at:
                    point = at.get(str(t), {}).get(method)
                    for key in ERROR_KEYS:
                        if point is None:
                            errs.append(f"{'-':>8}")
                        else:
                            reported = point.get("reported", True)
                            errs.append(f"{fmt_err(point['errors'][key], reported):>8}")
                lines.append(
                    f"{kind:<5} {label:<24} {fmt_ms(seconds):>9} {fmt_ms(cpu):>9} {fl / 1e9:>8.3f}  "
                    + "  ".join(errs)
                )
            bounds = []
            for t in report_at:
                dw = at.get(str(t), {}).get("deltawatch")
                if dw is not None and dw.get("bound") is not None:
                    err = dw["errors"]
                    bounds.append(
                        f"check {t}: bound {dw['bound']:.1e} >= sr {err['stable_rank']:.1e}, "
                        f"σ1 {err['spectral_norm']:.1e}"
                        + ("" if dw["bound"] >= err["stable_rank"] else "  BELOW THE ERROR")
                    )
            if bounds:
                lines.append(f"{kind:<5} error bound (convergence) vs actual: " + "; ".join(bounds))
            vis = data["checks"][-1]["visible_ratio"]
            if ex is not None:
                lines.append(
                    f"{kind:<5} exact at check {report_at[-1]}: stable rank "
                    f"{ex['stable_rank']:.2f}, σ1 {ex['spectral_norm']:.4g}, top-K energy "
                    f"{ex['topk_energy_ratio']:.3f}; bf16-visible {100 * vis:.1f}%; lock step "
                    f"{s['lock_step']}"
                )
    lines.append("")
    lines.append(
        "* = the sidecar reports null (error bound above tolerance); raw Ritz estimate shown"
    )
    lines.append(
        "full SVD rows without errors: not run on that trajectory; its time is the median of the "
        "runs on the others (a full SVD costs the same whatever the spectrum)"
    )
    lines.append(
        "ms/check: wall time; cpu ms: this process's CPU time (all threads), which a shared "
        "machine inflates less (on CUDA it is host time only, and no CPU-time ratio is given); "
        "deltawatch rows are means "
        "over the checks, svd_lowrank and the full SVD medians over the reported checks"
    )
    lines.append("")
    lines.extend(ratio_lines(results))
    return "\n".join(lines)


def ratio_rows(results: dict) -> list[dict]:
    """Per shape and kind: the sketch step against svd_lowrank(niter=2) (wall time, mean and
    median per check, and flops), and against the cheapest svd_lowrank whose stable-rank error is
    at most the tracker's at every reported check (when no niter tried is that accurate, against
    the largest one, a lower bound); the whole check against the full SVD."""
    rows = []
    report_at = [str(t) for t in results["settings"]["report_at"]]
    niters = sorted(results["settings"]["niters"])
    on_cpu = results["machine"]["device"] == "cpu"  # on CUDA the CPU time is the host's only
    for shape in results["shapes"]:
        flops = shape["flops"]
        for kind, data in shape["kinds"].items():
            s, at = data["summary"], data["at"]

            def sr_err(method: str, at: dict = at) -> list[float | None]:
                return [at[t][method]["errors"]["stable_rank"] for t in report_at if t in at]

            ours = sr_err("deltawatch")
            reported = all(at[t]["deltawatch"]["reported"] for t in report_at if t in at)

            def at_least_as_good(a: list, b: list) -> bool:
                """a's errors ≤ b's at every reported check (errors below ERROR_FLOOR tie)."""
                return all(
                    x is not None and y is not None and x <= max(y, ERROR_FLOOR)
                    for x, y in zip(a, b, strict=True)
                )

            matched, bound = None, False
            for k in niters:
                if at_least_as_good(sr_err(f"svd_lowrank_{k}"), ours):
                    matched = k
                    break
            if matched is None and niters:
                matched, bound = niters[-1], True

            def ratio(num: float | None, den: float | None) -> float | None:
                return None if not num or not den else num / den

            lowrank = s["svd_lowrank_seconds"]
            rows.append(
                {
                    "shape": shape["shape"],
                    "kind": kind,
                    "sketch_vs_lowrank2": ratio(lowrank.get("2"), s["sketch_seconds"]),
                    "sketch_vs_lowrank2_median": ratio(
                        lowrank.get("2"), s["sketch_seconds_median"]
                    ),
                    "sketch_vs_lowrank2_flops": ratio(
                        flops["svd_lowrank"].get("2"), s["sketch_flops"]
                    ),
                    "accuracy_no_worse_than_lowrank2": reported
                    and "2" in lowrank
                    and at_least_as_good(ours, sr_err("svd_lowrank_2")),
                    "matched_niter": matched,
                    "matched_is_lower_bound": bound,
                    "sketch_vs_matched": None
                    if matched is None
                    else ratio(lowrank[str(matched)], s["sketch_seconds"]),
                    "sketch_vs_lowrank2_cpu": ratio(
                        s.get("svd_lowrank_cpu_seconds", {}).get("2"), s.get("sketch_cpu_seconds")
                    )
                    if on_cpu
                    else None,
                    "check_vs_full_svd": ratio(s["full_svd_seconds"], s["check_seconds"]),
                    "check_vs_full_svd_cpu": ratio(
                        s.get("full_svd_cpu_seconds"), s.get("check_cpu_seconds")
                    )
                    if on_cpu
                    else None,
                    "check_vs_full_svd_flops": ratio(flops["svdvals"], s["check_flops"]),
                }
            )
    return rows


def ratio_lines(results: dict) -> list[str]:
    lines = [
        "Cost ratios, how many times cheaper deltawatch is (wall: mean wall time per check over "
        "all checks; median: the median check; cpu: CPU time; flops: mean per check):",
        f"{'shape':<11} {'kind':<5} {'sketch/lowrank(2) wall':>22} {'median':>7} {'cpu':>7} "
        f"{'flops':>7} {'sr err <=':>9} {'matched niter':>13} {'sketch/matched':>14} "
        f"{'check/full SVD wall':>19} {'cpu':>7} {'flops':>7}",
    ]

    def x(v: float | None, prefix: str = "") -> str:
        return "-" if v is None else f"{prefix}{v:.1f}x"

    for row in results["ratios"]:
        m, n = row["shape"]
        matched = row["matched_niter"]
        bound = row["matched_is_lower_bound"]
        lines.append(
            f"{f'{m}x{n}':<11} {row['kind']:<5} {x(row['sketch_vs_lowrank2']):>22} "
            f"{x(row['sketch_vs_lowrank2_median']):>7} {x(row.get('sketch_vs_lowrank2_cpu')):>7} "
            f"{x(row['sketch_vs_lowrank2_flops']):>7} "
            f"{'yes' if row['accuracy_no_worse_than_lowrank2'] else 'no':>9} "
            f"{'-' if matched is None else ('>' if bound else '') + str(matched):>13} "
            f"{x(row['sketch_vs_matched'], '>=' if bound else ''):>14} "
            f"{x(row['check_vs_full_svd']):>19} {x(row.get('check_vs_full_svd_cpu')):>7} "
            f"{x(row['check_vs_full_svd_flops']):>7}"
        )
    lines += [
        "targets: the sketch >= 3x cheaper than svd_lowrank(niter=2) at equal or better "
        "stable-rank accuracy ('sr err <=': deltawatch's stable-rank error is at most "
        "lowrank(2)'s at every reported check, and reported, not null); the whole check >= 100x "
        "cheaper than a full SVD at 4096x4096",
        "matched niter: the smallest niter whose stable-rank error is at most deltawatch's at "
        f"every reported check (errors <= {ERROR_FLOOR:g} tie); '>N': none tried is, so the ratio against the largest, N, is a lower bound",
    ]
    return lines


# -- main ---------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine(device: torch.device) -> dict:
    info = {
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        info["cpu"] = platform.processor() or "unknown"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        m, _, n = part.strip().lower().partition("x")
        if not n:
            raise argparse.ArgumentTypeError(f"shape {part!r}: expected MxN, e.g. 4096x12288")
        shapes.append((int(m), int(n)))
    return shapes


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=parse_shapes, default=parse_shapes(DEFAULT_SHAPES))
    p.add_argument("--kinds", type=lambda s: s.split(","), default=list(KINDS))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--checks", type=int, default=10, help="checks per trajectory (every step)")
    p.add_argument("--report-at", type=parse_ints, default=[3, 10], help="checks to score")
    p.add_argument("--niters", type=parse_ints, default=[0, 1, 2, 4])
    p.add_argument("--channel-rank", type=int, default=16, help="K")
    p.add_argument("--oversample", type=int, default=16, help="p")
    p.add_argument("--max-power-steps", type=int, default=4)
    p.add_argument("--view", choices=VIEWS, default="bf16")
    p.add_argument("--anchor", choices=("host", "device"), default="host")
    p.add_argument(
        "--repeats", type=int, default=None, help="default: by size (3, 2, 1 on the CPU; 5 on CUDA)"
    )
    p.add_argument("--warmups", type=int, default=1)
    p.add_argument(
        "--skip-full-svd-above",
        type=float,
        default=None,
        help="skip the full SVD for matrices with more elements (default: 2e7 on the CPU, "
        "so 4096x12288 is skipped; never on CUDA); 0 skips it always",
    )
    p.add_argument(
        "--full-svd-at",
        type=parse_ints,
        default=None,
        help="reported checks at which to run the full SVD (default: all on CUDA, the last "
        "one on the CPU)",
    )
    p.add_argument(
        "--full-svd-kinds",
        type=lambda s: s.split(","),
        default=None,
        help="trajectories on which to run the full SVD (default: all on CUDA, the first on the "
        "CPU; the others are given the median time of those runs)",
    )
    p.add_argument(
        "--table-from", type=Path, default=None, help="print the table of a saved --json and exit"
    )
    p.add_argument(
        "--profile-step",
        action="store_true",
        help="only profile one power step (torch.profiler) at each shape and print the top ops",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    for kind in args.kinds:
        if kind not in KINDS:
            p.error(f"--kinds: {kind!r} is not one of {', '.join(KINDS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch build sees no CUDA device")
    if args.skip_full_svd_above is None and args.device == "cpu":
        args.skip_full_svd_above = 2e7
    if args.full_svd_at is None:  # the CPU's full SVD is slow: once per kind by default
        args.full_svd_at = list(args.report_at) if args.device == "cuda" else args.report_at[-1:]
    if args.full_svd_kinds is None:  # and on one kind only (its cost is the same for all)
        args.full_svd_kinds = list(args.kinds) if args.device == "cuda" else args.kinds[:1]
    bad = [t for t in args.report_at if not 1 <= t <= args.checks]
    if bad:
        p.error(f"--report-at {bad}: must lie in 1..--checks ({args.checks})")
    return args


def header(results: dict) -> str:
    info, st = results["machine"], results["settings"]
    return (
        f"deltawatch sketch benchmark: {info.get('gpu', info.get('cpu'))}, torch {info['torch']}, "
        f"{info['threads']} threads, device {info['device']}, load average at start "
        f"{info.get('load_average')}; K={st['channel_rank']}, p={st['oversample']}, view={st['view']}, "
        f"anchor={st['anchor']}, {st['checks']} checks; {results.get('seconds', 0):.0f} s in all"
        + (" (PARTIAL: stopped before the last shape)" if results.get("partial") else "")
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table_from is not None:
        results = json.loads(args.table_from.read_text())
        results["ratios"] = ratio_rows(results)
        print(header(results))
        print(table(results))
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.profile_step:
        for m, n in args.shapes:
            profile_step(args, m, n, device)
        return 0
    settings = {
        k: v for k, v in vars(args).items() if k not in ("shapes", "json", "table_from")
    } | {"shapes": [list(s) for s in args.shapes]}
    results = {"machine": machine(device), "settings": settings, "shapes": []}
    started = time.perf_counter()
    for i, (m, n) in enumerate(args.shapes):
        results["shapes"].append(run_shape(args, m, n, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results["ratios"] = ratio_rows(results)
        results["seconds"] = time.perf_counter() - started
        results["partial"] = i + 1 < len(args.shapes)
        if args.json is not None:  # after every shape, so a run cut short keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
    print(header(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

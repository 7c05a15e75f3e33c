"""Hook-overhead benchmark: the amortised cost of `deltawatch.client.Monitor` on a training loop,
as a ratio against the SAME loop without the monitor, measured in the same process.

The toy: a transformers Qwen3 (`Qwen3Config`, random init, nothing downloaded; hidden 512, 2
blocks, 14 monitored matrices by default), AdamW, `batch × seq` tokens per step (1024 by
default), fp32 on the CPU with `--threads` torch threads (default 2, set explicitly).

Interleaving: each configuration runs `--rounds` rounds; a round is one block of `block` steps
without the monitor and one block of `block` steps with it (order alternating ABBA between
rounds), so machine noise hits both alike. In a block with the monitor, `mon.step(k)` is called
after every optimizer step with the monitor's own count k of the steps it saw (as `attach` would
count them), so a block of `every` steps holds exactly one check. Per round, the with/without
ratio of the block totals (wall and CPU time); the table gives the medians over rounds.

Rows: every=10 with a real sidecar (`deltawatch serve --threads 1` subprocess, ephemeral ports,
ready file), every=10 again with each check run at 1 torch thread (`torch.set_num_threads(1)`
around `mon.step` on check steps: the trainer-side workaround for small float64 eigensolves under
thread oversubscription, measured), every=1 (every step a check), every=10 with the sidecar
absent (the endpoint is a closed port: the client pays the sketch only; connecting happens on the
sender thread), and every=100, derived from the every=10 row's check time (a measured every=100
row needs 100-step blocks: `--rounds-100 N`).

Overhead columns:
  block ratio  = median over rounds of (Σ step time with monitor) / (Σ step time without) − 1
  direct       = median over rounds of (Σ time inside mon.step in the block with the monitor)
                 / (Σ step time of the block without): the hook's own cost, less exposed to
                 noise in the training steps, blind to indirect costs (the sender thread)
  amortised    = (median hook time on non-check steps·(every−1) + median check time)
                 / (every · median step time without monitor)
  CPU          = the same block ratio on this process's CPU time (all threads: training,
                 the sender thread, gRPC); the sidecar's own CPU (another process) is reported
                 per check beside it.

The check split (instrumented by wrapping the tracker's functions on the every=10 row; each
wrapper costs ~1 µs): power steps, Rayleigh–Ritz + eigh (the Krylov products and generalized eigenproblems, the
error bound, the compression to r directions, ritz_vectors), orth (QR), forming ΔW + exact statistics + masks (the rest
of the pass over ΔW, with the two mask reads split out), the W_t view, lock, channel energy,
copies to the wire format, queueing (`submit_report`). Monitor construction (attach) time is
timed per monitor.

    .venv/bin/python bench/bench_hook.py                   # the default table (< ~5 min, 2 cores)
    .venv/bin/python bench/bench_hook.py --hidden 1024 --intermediate 3072
    .venv/bin/python bench/bench_hook.py --rounds 1 --block 2 --hidden 64 --intermediate 128 \
        --seq 16 --batch 1 --vocab 128 --rounds-1 1 --rounds-absent 1   # the smoke test's size
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import re
import socket
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from deltawatch.sidecar.process import SidecarProcess

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# -- the sidecar --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time (/proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return float("nan")


def closed_port() -> str:
    """An endpoint nobody listens on (a port the OS gave us, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


# -- the flops-and-bytes bound ------------------------------------------------------------------


def machine_rates(repeats: int = 3) -> dict[str, float]:
    """This process's float32 matmul rate (GFLOP/s: a 2048² product, full IEEE precision) and
    memory bandwidth (GB/s: a 128 MiB copy, bytes read + written), the best of `repeats`, at the
    current torch thread count."""
    from deltawatch.client.sketch import highest_precision

    n = 2048
    A, B = torch.randn(n, n), torch.randn(n, n)
    src, dst = torch.randn(32 * 2**20), torch.empty(32 * 2**20)
    with highest_precision():
        A @ B
        matmul = min(_seconds(lambda: A @ B) for _ in range(repeats))
    dst.copy_(src)
    copy = min(_seconds(lambda: dst.copy_(src)) for _ in range(repeats))
    return {"matmul_gflops": 2 * n**3 / matmul / 1e9, "memory_gbps": 2 * src.nbytes / copy / 1e9}


def _seconds(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def check_bound_s(
    shape: tuple[int, int], r: int, steps: int, weight_steps: int, rates: dict[str, float],
    param_bytes: int = 4, anchor_bytes: int = 2,
) -> float:  # fmt: skip
    """The flops-and-bytes bound of one matrix's check (docs/overhead.md "The bound"): the power
    steps' products, 4·m·n·r flops each (ΔW's and W_t's), at the measured matmul rate, plus the
    bytes a check cannot avoid at the measured bandwidth: one pass reading W_t, W0's copy and the
    packed principal mask (1 bit), and one read of the float32 operator per power step."""
    m, n = shape
    flops = 4 * m * n * r * (steps + weight_steps)
    bytes_ = m * n * (param_bytes + anchor_bytes + 0.125 + 4 * (steps + weight_steps))
    return flops / (rates["matmul_gflops"] * 1e9) + bytes_ / (rates["memory_gbps"] * 1e9)


@contextmanager
def recording_bounds(out: list[list[float]], rates: dict[str, float]):
    """Each `mon.step` call's reports' summed bound (`check_bound_s`) appended to `out` (one list
    per step that queued reports), by wrapping `Transport.submit_report` at class level (the
    check split's instance-level wrapper calls through it)."""
    from deltawatch.client.transport import Transport

    original = Transport.submit_report

    def submit(self, check) -> None:
        weight = check.weight.power_steps if check.weight is not None else 0
        steps = check.update.power_steps if check.update is not None else 0
        r = (check.update or check.weight).G.shape[1] if (check.update or check.weight) else 0
        out[-1].append(check_bound_s(check.shape, r, steps, weight, rates))
        original(self, check)

    Transport.submit_report = submit
    try:
        yield
    finally:
        Transport.submit_report = original


# -- the toy trainer ----------------------------------------------------------------------------


class Trainer:
    """A random-init Qwen3 (transformers) with AdamW, one batch of random tokens per step."""

    def __init__(self, args: argparse.Namespace) -> None:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        torch.manual_seed(args.seed)
        heads = max(1, args.hidden // args.head_dim)
        cfg = Qwen3Config(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            head_dim=args.head_dim,
            max_position_embeddings=max(args.seq, 64),
            tie_word_embeddings=True,
        )
        self.model = Qwen3ForCausalLM(cfg)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr)
        self.gen = torch.Generator().manual_seed(args.seed + 1)
        self.shape = (args.batch, args.seq)
        self.vocab = args.vocab
        self.steps = 0

    def step(self) -> None:
        x = torch.randint(0, self.vocab, self.shape, generator=self.gen)
        loss = self.model(input_ids=x, labels=x).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1


# -- the check split ------------------------------------------------------------------------------

SPLIT = (
    "power steps",
    "Rayleigh-Ritz + eigh",
    "orth (QR)",
    "dW + exact stats",
    "masks (low, principal)",
    "W_t view",
    "lock",
    "channel energy",
    "to wire (copies)",
    "queueing",
)


class Split:
    """Inclusive wall time per category, by wrapping the client's functions (nested time is
    subtracted from the enclosing category, so categories add up to the check)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list[float]] = []

    def wrap(self, fn, category: str):
        def timed(*a, **kw):
            self.stack.append([0.0])
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t0
                inner = self.stack.pop()[0]
                self.totals[category] += dt - inner
                self.calls[category] += 1
                if self.stack:
                    self.stack[-1][0] += dt

        return timed

    def take(self) -> dict[str, float]:
        out = dict(self.totals)
        out["power_step_calls"] = self.calls["power steps"]
        self.totals.clear()
        self.calls.clear()
        return out


@contextmanager
def instrumented(split: Split, monitor):
    """Wrap the tracker's and anchor's functions and this monitor's queue for the duration."""
    from deltawatch.client import anchor as anchor_mod
    from deltawatch.client import batch as batch_mod
    from deltawatch.client import lock as lock_mod
    from deltawatch.client import sketch as sketch_mod
    from deltawatch.client import tracker as tracker_mod

    saved: list[tuple[object, str, object]] = []

    def patch(obj, name, category):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, split.wrap(getattr(obj, name), category))

    # inside sketch.subspace_iteration (it calls its own module's functions)
    patch(sketch_mod, "power_step", "power steps")
    patch(sketch_mod, "gram_matrix", "Rayleigh-Ritz + eigh")
    patch(sketch_mod, "generalized_eigh", "Rayleigh-Ritz + eigh")
    patch(sketch_mod, "batched_generalized_eigh", "Rayleigh-Ritz + eigh")
    patch(sketch_mod, "krylov_products", "Rayleigh-Ritz + eigh")
    patch(sketch_mod, "orth", "orth (QR)")
    # what the tracker calls itself
    patch(tracker_mod, "error_bound", "Rayleigh-Ritz + eigh")
    patch(tracker_mod, "compress", "Rayleigh-Ritz + eigh")
    patch(tracker_mod, "ritz_vectors", "Rayleigh-Ritz + eigh")
    patch(tracker_mod, "orth", "orth (QR)")
    patch(tracker_mod, "_to_wire", "to wire (copies)")
    patch(tracker_mod.MatrixTracker, "_check", "dW + exact stats")
    patch(tracker_mod.MatrixTracker, "_weight_view", "W_t view")
    patch(tracker_mod.MatrixTracker, "_channel_energy", "channel energy")
    # what a batch of same-shape matrices calls itself (client/batch.py)
    for name in ("compress", "ritz_vectors"):
        patch(batch_mod, name, "Rayleigh-Ritz + eigh")
    patch(batch_mod, "orth", "orth (QR)")
    patch(batch_mod, "_to_wire", "to wire (copies)")
    patch(batch_mod.MatrixGroup, "_check", "dW + exact stats")
    patch(batch_mod.MatrixGroup, "_channel_energy", "channel energy")
    patch(anchor_mod.Anchor, "low_mask", "masks (low, principal)")
    patch(anchor_mod.Anchor, "principal_rows", "masks (low, principal)")
    patch(lock_mod.LockState, "observe", "lock")
    patch(monitor._transport, "submit_report", "queueing")
    try:
        yield
    finally:
        for obj, name, old in reversed(saved):
            if isinstance(obj, type) or obj in (tracker_mod, sketch_mod, batch_mod):
                setattr(obj, name, old)
            else:  # an instance attribute shadowing the class's method
                delattr(obj, name)


# -- one configuration -------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run_config(
    trainer: Trainer,
    *,
    label: str,
    every: int,
    endpoint: str,
    rounds: int,
    block: int,
    sidecar: SidecarProcess | None,
    split: Split | None,
    exact_matrix: str | None,
    profile_last: bool = False,
    check_threads: int | None = None,
    settings: dict | None = None,
    rates: dict[str, float] | None = None,
) -> dict:
    """Interleaved rounds of `block` steps without and with a Monitor(every=every, **settings);
    with `rates`, each check's flops-and-bytes bound (`check_bound_s`) beside its time."""
    from deltawatch.client import Monitor

    settings = settings or {}
    spread = settings.get("schedule") == "spread"  # every step checks a slice
    run = "bench-" + re.sub(r"[^A-Za-z0-9._-]+", "-", label)
    t0, c0 = time.perf_counter(), time.process_time()
    mon = Monitor(
        trainer.model, run=run, endpoint=endpoint, every=every, close_timeout=60.0, **settings
    )
    attach_wall, attach_cpu = time.perf_counter() - t0, time.process_time() - c0

    params = dict(trainer.model.named_parameters())
    exact_w0 = None
    if exact_matrix is not None:  # the exact float64 reference of one matrix's ‖ΔW‖_F
        exact_w0 = params[exact_matrix].detach().to(torch.bfloat16).double().clone()
    exact_fro: dict[int, float] = {}

    off_wall, off_cpu, on_wall, on_cpu = [], [], [], []  # per step
    hook_noop, check_wall, check_cpu, splits = [], [], [], []
    ratio_wall, ratio_cpu, ratio_direct = [], [], []
    count = 0  # the steps the monitor saw
    side0 = cpu_seconds(sidecar.pid) if sidecar else float("nan")
    profile_text = None
    bounds: list[list[float]] = []  # per check: its reports' bounds

    def block_of(with_monitor: bool) -> tuple[float, float, float]:
        nonlocal count, profile_text
        bw = bc = bh = 0.0
        for _ in range(block):
            checked = False
            w0, p0 = time.perf_counter(), time.process_time()
            trainer.step()
            if with_monitor:
                count += 1
                is_check = spread or count % every == 0
                if is_check:
                    bounds.append([])
                h0, hc0 = time.perf_counter(), time.process_time()
                profiler = None
                if is_check and profile_last and len(check_wall) == rounds * block // every - 1:
                    profiler = cProfile.Profile()
                    profiler.enable()
                threads = torch.get_num_threads()
                if is_check and check_threads:  # the trainer-side workaround, measured
                    torch.set_num_threads(check_threads)
                if is_check and split is not None:
                    with instrumented(split, mon):
                        mon.step(count)
                    splits.append(split.take())
                else:
                    mon.step(count)
                if is_check and check_threads:
                    torch.set_num_threads(threads)
                if profiler is not None:
                    profiler.disable()
                    s = io.StringIO()
                    pstats.Stats(profiler, stream=s).sort_stats("tottime").print_stats(14)
                    profile_text = s.getvalue()
                hw, hc = time.perf_counter() - h0, time.process_time() - hc0
                bh += hw
                checked = is_check
                if is_check:
                    check_wall.append(hw)
                    check_cpu.append(hc)
                else:
                    hook_noop.append(hw)
            dw, dc = time.perf_counter() - w0, time.process_time() - p0
            if checked and spread:  # the exact matrix only on the steps of its slot
                slot = mon._slots[(count - 1) % every]
                names = [n for u in slot for n in getattr(u, "names", [getattr(u, "name", None)])]
                checked = exact_matrix in names  # a matrix, or a member of a batch
            if checked and exact_w0 is not None:  # outside the timed region
                W = params[exact_matrix].detach().to(torch.bfloat16).double()
                exact_fro[count] = float(torch.linalg.norm(W - exact_w0))
            (on_wall if with_monitor else off_wall).append(dw)
            (on_cpu if with_monitor else off_cpu).append(dc)
            bw += dw
            bc += dc
        return bw, bc, bh

    with recording_bounds(bounds, rates) if rates else contextlib.nullcontext():
        for i in range(rounds):
            order = (False, True) if i % 2 == 0 else (True, False)
            res = {flag: block_of(flag) for flag in order}
            ratio_wall.append(res[True][0] / res[False][0])
            ratio_cpu.append(res[True][1] / res[False][1])
            ratio_direct.append(res[True][2] / res[False][0])

    c1 = time.perf_counter()
    flushed = mon.close(timeout=60.0 if sidecar else 0.5)
    close_wall = time.perf_counter() - c1
    stats = mon.stats()
    side_cpu = (cpu_seconds(sidecar.pid) - side0) if sidecar else float("nan")

    delivered = None
    if sidecar is not None and exact_matrix is not None and exact_fro:
        hist = sidecar.get(f"/api/v1/runs/{run}/history", matrix=exact_matrix)["points"]
        got = {p["step"]: p["frobenius_norm"] for p in hist}
        errs = [
            abs(got[s] - v) / v if v > 0 else abs(got[s] or 0.0)
            for s, v in exact_fro.items()
            if s in got and got[s] is not None
        ]
        delivered = {
            "checks": len(exact_fro),
            "in_store": sum(s in got for s in exact_fro),
            "max_rel_err_frobenius": max(errs) if errs else None,
            "exact_frobenius": exact_fro,
            "stored_frobenius": {s: got.get(s) for s in exact_fro},
        }

    print(f"row {label!r} done: {len(check_wall)} checks", file=sys.stderr, flush=True)
    step_off = median(off_wall)
    noop = median(hook_noop) if hook_noop else 0.0
    chk = median(check_wall)
    amortised = chk / step_off if spread else (noop * (every - 1) + chk) / (every * step_off)
    bound = median([sum(b) for b in bounds if b]) if rates else float("nan")
    split_med = {k: median([s.get(k, 0.0) for s in splits]) for k in SPLIT} if splits else None
    power_steps = [s["power_step_calls"] for s in splits]
    return {
        "label": label,
        "every": every,
        "sidecar": sidecar is not None,
        "rounds": rounds,
        "block": block,
        "matrices": len(mon.matrices),
        "attach_wall_s": attach_wall,
        "attach_cpu_s": attach_cpu,
        "step_off_s": step_off,
        "step_on_s": median(on_wall),
        "step_off_cpu_s": median(off_cpu),
        "step_on_cpu_s": median(on_cpu),
        "hook_noop_s": noop,
        "check_s": chk,
        "check_cpu_s": median(check_cpu),
        "checks": len(check_wall),
        "hook_max_s": max(check_wall, default=float("nan")),
        "settings": settings,
        "bound_s": bound,
        "check_over_bound": chk / bound if bound > 0 else float("nan"),
        "overhead_block": median(ratio_wall) - 1,
        "overhead_block_cpu": median(ratio_cpu) - 1,
        "overhead_direct": median(ratio_direct),
        "check_threads": check_threads,
        "overhead_amortised": amortised,
        "ratios_wall": ratio_wall,
        "sidecar_cpu_per_check_s": side_cpu / max(len(check_wall), 1),
        "close_s": close_wall,
        "flushed": flushed,
        "client_stats": stats,
        "split": split_med,
        "power_steps_per_check": power_steps,
        "delivered": delivered,
        "profile": profile_text,
    }


WANDB_MISSING = (
    "wandb.watch row skipped: wandb is not installed (pip install -c constraints.txt -e '.[bench]')"
)


def run_wandb(trainer: Trainer, *, rounds: int, block: int, log_freq: int, directory: str):
    """The peer baseline (issue 14 item 5): the same interleaved blocks, with
    `wandb.watch(model, log="parameters", log_freq=log_freq)` in offline mode (WANDB_MODE=offline:
    nothing leaves the machine; the run is written under `directory`) against no watch; both
    blocks call `run.log` once per step (what a trainer logging its loss does), so the ratio is
    what watch adds. The row, or `WANDB_MISSING` when wandb is not installed."""
    try:
        import wandb
    except ImportError:
        return WANDB_MISSING
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    t0 = time.perf_counter()
    run = wandb.init(
        project="deltawatch-bench", dir=directory, mode="offline",
        settings=wandb.Settings(console="off", x_disable_stats=True),
    )  # fmt: skip
    init_wall = time.perf_counter() - t0
    ratios, off, on = [], [], []
    for i in range(rounds):
        totals = {}
        for watched in (False, True) if i % 2 == 0 else (True, False):
            if watched:
                wandb.watch(trainer.model, log="parameters", log_freq=log_freq)
            times = []
            for _ in range(block):
                w0 = time.perf_counter()
                trainer.step()
                run.log({"step": trainer.steps})
                times.append(time.perf_counter() - w0)
            if watched:
                wandb.unwatch(trainer.model)
            (on if watched else off).extend(times)
            totals[watched] = sum(times)
        ratios.append(totals[True] / totals[False])
    run.finish()
    return {
        "label": f"wandb.watch(log='parameters', log_freq={log_freq})",
        "rounds": rounds,
        "block": block,
        "init_wall_s": init_wall,
        "step_off_s": median(off),
        "step_on_s": median(on),
        "overhead_block": median(ratios) - 1,
        "ratios_wall": ratios,
    }


def derived_row(base: dict, every: int) -> dict:
    """every=N from a measured row's check and hook times (no blocks of N steps run)."""
    row = {k: base[k] for k in ("step_off_s", "hook_noop_s", "check_s", "matrices", "sidecar")}
    row.update(label=f"e{every} (derived)", every=every, derived=True)
    row["overhead_amortised"] = (row["hook_noop_s"] * (every - 1) + row["check_s"]) / (
        every * row["step_off_s"]
    )
    return row


# -- output ---------------------------------------------------------------------------------------


def pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.2f}%"


def ratio(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}×"


def ms(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{1000 * x:.1f}"


def print_tables(result: dict) -> None:
    s = result["settings"]
    print(
        f"\nQwen3 toy: hidden {s['hidden']}, {s['layers']} blocks, MLP {s['intermediate']}, "
        f"vocab {s['vocab']}, {s['batch']}x{s['seq']} = {s['batch'] * s['seq']} tokens/step, "
        f"AdamW fp32, torch threads {s['threads']} (set explicitly), "
        f"{result['rows'][0]['matrices']} monitored matrices ({s['params_monitored']:,} params)"
    )
    print(f"machine: {result['machine']}")
    print(
        "\n| config | every | rounds×block | step w/o ms | step with ms | check ms | check CPU ms "
        "| hook no-op µs | overhead (blocks) | overhead (CPU) | direct | amortised "
        "| sidecar CPU/check ms | largest hook ms | bound ms | check / bound |"
    )
    print("|" + "---|" * 16)
    for r in result["rows"]:
        if r.get("derived"):
            print(
                f"| {r['label']} | {r['every']} | — | {ms(r['step_off_s'])} | — | "
                f"{ms(r['check_s'])} | — | {1e6 * r['hook_noop_s']:.1f} | — | — | — | "
                f"{pct(r['overhead_amortised'])} | — | — | — | — |"
            )
            continue
        print(
            f"| {r['label']} | {r['every']} | {r['rounds']}×{r['block']} | {ms(r['step_off_s'])} | "
            f"{ms(r['step_on_s'])} | {ms(r['check_s'])} | {ms(r['check_cpu_s'])} | "
            f"{1e6 * r['hook_noop_s']:.1f} | {pct(r['overhead_block'])} | "
            f"{pct(r['overhead_block_cpu'])} | {pct(r['overhead_direct'])} | "
            f"{pct(r['overhead_amortised'])} | "
            f"{ms(r['sidecar_cpu_per_check_s'])} | {ms(r['hook_max_s'])} | {ms(r['bound_s'])} | "
            f"{ratio(r['check_over_bound'])} |"
        )
    rates = result["rates"]
    print(
        f"\nMeasured in this process at {s['threads']} torch thread(s): float32 matmul "
        f"{rates['matmul_gflops']:.1f} GFLOP/s (2048² product), memory {rates['memory_gbps']:.1f} "
        f"GB/s (128 MiB copy, read + write). Bound = Σ over the check's reports of 4·m·n·r flops "
        f"per power step at that rate + (one pass over W_t, W0, M_princ + one float32 read of "
        f"the operator per power step) bytes at that bandwidth (docs/overhead.md)."
    )
    w = result.get("wandb")
    if isinstance(w, str):
        print(f"\n{w}")
    elif w:
        print(
            f"\n{w['label']}, offline, {w['rounds']}×{w['block']} steps interleaved: step "
            f"{ms(w['step_off_s'])} ms without, {ms(w['step_on_s'])} ms with; overhead (blocks) "
            f"{pct(w['overhead_block'])}; wandb.init {ms(w['init_wall_s'])} ms"
        )
    if result.get("bound"):
        print("\nOne matrix's settled check against its bound (min over repeats):")
        print(
            "| shape | kind | W_t | check ms | power steps (ΔW, W_t) | bound ms | check / bound |"
        )
        print("|---|---|---|---|---|---|---|")
        for b in result["bound"]:
            for label in ("with W_t", "without W_t"):
                x = b[label]
                print(
                    f"| {b['shape'][0]}×{b['shape'][1]} | {b['kind']} | {label} | "
                    f"{ms(x['check_s'])} | {x['power_steps'][0]}, {x['power_steps'][1]} | "
                    f"{ms(x['bound_s'])} | {ratio(x['ratio'])} |"
                )
    if result.get("batched"):
        print(
            "\nThe monitored shapes' settled checks, each matrix alone vs same-shape matrices as "
            "one batch (same state, min over repeats):"
        )
        print("| W_t | matrices (batches) | alone ms | batched ms | batched / alone | bound ms "
              "| alone / bound | batched / bound |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for b in result["batched"]:
            a, t, bd = b["alone_s"], b["batched_s"], b["bound_s"]
            print(
                f"| {b['W_t']} | {b['matrices']} ({b['groups']}) | {ms(a)} | {ms(t)} | "
                f"{t / a:.2f} | {ms(bd)} | {ratio(a / bd)} | {ratio(t / bd)} |"
            )
    print("\nMonitor construction (attach):")
    for r in result["rows"]:
        if not r.get("derived"):
            print(
                f"  {r['label']}: {ms(r['attach_wall_s'])} ms wall, {ms(r['attach_cpu_s'])} ms "
                f"CPU; close {ms(r['close_s'])} ms (all acknowledged: {r['flushed']}); "
                f"client {r['client_stats']['acknowledged']} acked, "
                f"{r['client_stats']['dropped_reports']} dropped, "
                f"errors {r['client_stats']['errors']}"
            )
    for r in result["rows"]:
        if r.get("split"):
            total = sum(r["split"].values())
            print(f"\nCheck split on the training thread ({r['label']}, median per check, ms):")
            print("| part | ms | share |\n|---|---|---|")
            for k in SPLIT:
                v = r["split"][k]
                print(f"| {k} | {ms(v)} | {100 * v / total if total else 0:.1f}% |")
            print(f"| sum | {ms(total)} | |")
            print(
                f"power steps per check (ΔW and W_t trackers, {r['matrices']} matrices): "
                f"{r['power_steps_per_check']}"
            )
    for r in result["rows"]:
        d = r.get("delivered")
        if d:
            err = d["max_rel_err_frobenius"]
            print(
                f"\n{r['label']}: {d['in_store']}/{d['checks']} checks of "
                f"{result['exact_matrix']} in the sidecar's store; frobenius_norm vs the exact "
                f"float64 ‖bf16(W_t) − bf16(W0)‖_F: max rel. error "
                f"{'—' if err is None else f'{err:.2e}'}"
            )
    for name, text in result.get("micro", {}).items():
        print(f"\n{name}: {text}")
    for r in result["rows"]:
        if r.get("profile"):
            print(f"\ncProfile of one check ({r['label']}), top by own time:")
            lines = [ln for ln in r["profile"].splitlines() if ln.strip()]
            print("\n".join(lines[-16:]))


def _ms_per_call(f, repeats: int) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(repeats):
        f()
    return 1000 * (time.perf_counter() - t0) / repeats


def dominates_micro(shapes: list[tuple[int, int]], repeats: int = 5) -> dict[str, str]:
    """What a check is made of, in isolation, on synthetic weights of the monitored shapes: whole
    checks of settled trackers, the exact-statistics pass (as MatrixTracker._check runs it), the
    two masks it rebuilds, and the parts of one power step at each distinct n."""
    from deltawatch.client.sketch import (
        error_bound,
        krylov_products,
        orth,
        power_step,
        rayleigh_ritz,
        ritz_vectors,
    )
    from deltawatch.client.tracker import MatrixTracker

    g = torch.Generator().manual_seed(0)
    trackers, weights = [], []
    for i, (m, n) in enumerate(shapes):
        W0 = torch.randn(m, n, generator=g) * 0.02
        trackers.append(MatrixTracker.attach(f"model.layers.{i}.w", W0))
        weights.append(W0 + 1e-3 * torch.randn(m, n, generator=g))
    for tr, W in zip(trackers, weights, strict=True):
        tr.check(W, 1)
        tr.check(W, 2)
    states = [tr.state_dict() for tr in trackers]

    def checks() -> None:
        for tr, W, sd in zip(trackers, weights, states, strict=True):
            tr.load_state_dict(sd)
            tr.check(W, 3)

    def exact_pass() -> None:  # the loop of MatrixTracker._check at commit cabd531
        for tr, W in zip(trackers, weights, strict=True):
            a = tr.anchor
            D = torch.empty(a.local_shape)
            st = torch.zeros(4, dtype=torch.float64)
            for rows, W0 in a.row_chunks():
                Wv = W[rows].to(a.dtype)
                Dr = D[rows]
                Dr.copy_(Wv).sub_(W0)
                vis = Wv.view(torch.int16) != W0.view(torch.int16)
                st[0] += torch.linalg.vector_norm(Dr).double().square()
                st[1] += vis.sum()
                st[2] += (vis & a.low_mask(W0)).sum()
                st[3] += (vis & a.principal_rows(rows)).sum()

    def masks() -> None:
        for tr in trackers:
            for rows, W0 in tr.anchor.row_chunks():
                tr.anchor.low_mask(W0)
                tr.anchor.principal_rows(rows)

    out = {
        "settled checks": f"{len(shapes)} checks of settled trackers (1 power step each): "
        f"{_ms_per_call(checks, repeats):.1f} ms",
        "exact pass": f"the exact-statistics pass over ΔW: {_ms_per_call(exact_pass, repeats):.1f}"
        f" ms, of which rebuilding the two masks {_ms_per_call(masks, repeats):.1f} ms",
    }
    with torch.no_grad():
        for m, n in sorted(set(shapes), key=lambda s: s[1]):
            if f"n={n}" in out or min(m, n) <= 32:
                continue
            A = torch.randn(m, n, generator=g)
            V = orth(torch.randn(n, 32, generator=g))
            _, G, C = power_step(A, V)
            theta, Z = rayleigh_ritz(G, C)
            _, H, M, N = krylov_products([V], [G])
            C64 = C.double()
            parts = {
                "power_step": lambda A=A, V=V: power_step(A, V),
                "rayleigh_ritz": lambda G=G, C=C: rayleigh_ritz(G, C),
                "krylov_products": lambda V=V, G=G: krylov_products([V], [G]),
                "error_bound": lambda t=theta, H=H, M=M, N=N: error_bound(t, H, M, N, 16),
                "(its eigvalsh)": lambda C64=C64: torch.linalg.eigvalsh(C64),
                "orth": lambda G=G: orth(G),
                "ritz_vectors": lambda G=G, Z=Z: ritz_vectors(G, Z, 16),
            }
            out[f"n={n}"] = f"one power step at {m}×{n}, ms: " + ", ".join(
                f"{k} {_ms_per_call(f, 10 * repeats):.3f}" for k, f in parts.items()
            )
    return out


def bound_micro(
    shapes: list[tuple[int, int]], rates: dict[str, float], repeats: int, kind: str = "sft"
) -> list[dict]:
    """One matrix's settled check at each shape against its flops-and-bytes bound: a tracker on
    a pretrained-like W0 (bench/trajectories.py) after `kind`'s first 3 steps, checked twice to
    settle; then the same third check timed from that state, `repeats` times (best), with the
    W_t tracker and without it (`weight=False`, a check `weight_every` skips)."""
    from deltawatch.client.tracker import MatrixTracker

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from trajectories import pretrained_like, trajectory

    out = []
    for m, n in shapes:
        W0 = pretrained_like(m, n, seed=0)
        tr = MatrixTracker.attach("model.layers.0.w", W0)
        Ws = list(trajectory(kind, W0, steps=3))
        tr.check(Ws[0], 1)
        tr.check(Ws[1], 2)
        state = tr.state_dict()
        row = {"shape": [m, n], "kind": kind}
        for label, weight in (("with W_t", True), ("without W_t", False)):

            def check(tr=tr, state=state, W=Ws[2], weight=weight):
                tr.load_state_dict(state)
                return tr.check(W, 3, weight=weight)

            c = check()
            times = [_seconds(check) for _ in range(repeats)]
            steps = c.update.power_steps
            w_steps = c.weight.power_steps if c.weight is not None else 0
            bound = check_bound_s((m, n), tr.r, steps, w_steps, rates)
            row[label] = {
                "check_s": min(times),
                "power_steps": [steps, w_steps],
                "bound_s": bound,
                "ratio": min(times) / bound,
            }
        out.append(row)
    return out


def batched_micro(
    shapes: list[tuple[int, int]], rates: dict[str, float], repeats: int, kind: str = "sft"
) -> list[dict]:
    """The monitored matrices' settled checks, each matrix alone against the same-shape matrices
    as one batch (client/batch.py `MatrixGroup`, what `Monitor(batch_matrices=True)` runs), from
    the same state in the same process: one tracker per shape on a pretrained-like W0
    (bench/trajectories.py) after `kind`'s first 3 steps, checked twice to settle; then the
    third check of every matrix timed (best of `repeats`, the two ways interleaved), with the
    W_t tracker and without it. The bound is Σ `check_bound_s` over the matrices."""
    from deltawatch.client.batch import MatrixGroup
    from deltawatch.client.collectives import CheckSession
    from deltawatch.client.tracker import MatrixTracker

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from trajectories import pretrained_like, trajectory

    trackers, weights = [], []
    for i, (m, n) in enumerate(shapes):
        W0 = pretrained_like(m, n, seed=i)
        tr = MatrixTracker.attach(f"model.layers.{i}.w", W0)
        Ws = list(trajectory(kind, W0, steps=3))
        tr.check(Ws[0], 1)
        tr.check(Ws[1], 2)
        trackers.append(tr)
        weights.append(Ws[2])
    states = [tr.state_dict() for tr in trackers]
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, shape in enumerate(shapes):
        by_shape.setdefault(tuple(shape), []).append(i)
    groups = [
        MatrixGroup([trackers[i] for i in idx], lambda idx=idx: [weights[i] for i in idx])
        for idx in by_shape.values()
    ]
    rows = []
    for label, weight in (("with W_t", True), ("without W_t", False)):

        def restore() -> None:
            for tr, sd in zip(trackers, states, strict=True):
                tr.load_state_dict(sd)

        def alone(weight=weight) -> list:
            restore()
            return [tr.check(W, 3, weight=weight) for tr, W in zip(trackers, weights, strict=True)]

        def batched(weight=weight) -> list:
            restore()
            return [
                c for g in groups for c in g.check(3, CheckSession(None, "cpu", step=3), weight)
            ]

        checks = alone()
        batched()
        t_alone, t_batched = [], []
        for _ in range(repeats):
            t_alone.append(_seconds(alone))
            t_batched.append(_seconds(batched))
        bound = sum(
            check_bound_s(
                c.shape, trackers[0].r, c.update.power_steps,
                c.weight.power_steps if c.weight is not None else 0, rates,
            )
            for c in checks
        )  # fmt: skip
        rows.append({
            "W_t": label, "matrices": len(shapes), "groups": len(groups),
            "alone_s": min(t_alone), "batched_s": min(t_batched), "bound_s": bound,
        })  # fmt: skip
    restore()
    return rows


def eigh_threads_micro(threads: int, r: int = 32, repeats: int = 200) -> str:
    """The r×r float64 Rayleigh–Ritz of one power step, with 1 thread and with `threads`."""
    from deltawatch.client.sketch import error_bound, krylov_products, rayleigh_ritz

    g = torch.Generator().manual_seed(0)
    G = torch.randn(512, r, generator=g)
    C = G.T @ G
    V = torch.linalg.qr(torch.randn(512, r, generator=g))[0]
    out = []
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        rayleigh_ritz(G, C)
        t0 = time.perf_counter()
        for _ in range(repeats):
            theta, _ = rayleigh_ritz(G, C)
            _, H, M, N = krylov_products([V], [G])
            error_bound(theta, H, M, N, 16)
        out.append(f"{t} thread(s) {1e6 * (time.perf_counter() - t0) / repeats:.0f} µs")
    torch.set_num_threads(threads)
    return "rayleigh_ritz + error bound on a 512×32 G: " + ", ".join(out)


# -- main -----------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads of the trainer")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--every", type=int, default=10, help="the main row's every")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the every=10 row")
    p.add_argument("--block", type=int, default=None, help="steps per block (default: every)")
    p.add_argument(
        "--rounds-1t", type=int, default=0,
        help="rounds of the every=10 row whose checks run at 1 torch thread (0: skip)",
    )  # fmt: skip
    p.add_argument("--rounds-1", type=int, default=2, help="rounds of the every=1 row (0: skip)")
    p.add_argument("--block-1", type=int, default=2)
    p.add_argument("--rounds-absent", type=int, default=1, help="rounds without a sidecar")
    p.add_argument("--rounds-100", type=int, default=0, help="measure every=100 (100-step blocks)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the first row")
    p.add_argument("--no-split", action="store_true", help="skip the instrumented split")
    p.add_argument("--no-profile", action="store_true", help="skip cProfile of one check")
    p.add_argument("--no-micro", action="store_true", help="skip the isolated check parts")
    p.add_argument(
        "--bound-shapes", default="256x256,256x768,4096x4096",
        help="shapes of the single-matrix check against its bound ('' to skip)",
    )  # fmt: skip
    p.add_argument("--bound-repeats", type=int, default=3)
    p.add_argument("--no-batched", action="store_true",
                   help="skip the monitored shapes' checks alone vs batched")  # fmt: skip
    p.add_argument(
        "--weight-every", type=int, default=4,
        help="the weight_every of the e10 weight_every row (0: skip the row)",
    )  # fmt: skip
    p.add_argument("--no-unbatched", action="store_true",
                   help="skip the e10 batch_matrices=False row (every matrix checked alone)")  # fmt: skip
    p.add_argument("--rounds-variants", type=int, default=2,
                   help="rounds of the batch_matrices=False, weight_every and spread rows (0: skip them)")  # fmt: skip
    p.add_argument("--rounds-wandb", type=int, default=2,
                   help="rounds of the wandb.watch row (0: skip; needs wandb)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def machine() -> str:
    try:
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} cores visible, load average {load:.1f} at start, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    block = args.block or args.every
    result: dict = {"settings": vars(args) | {"json": None}, "machine": machine(), "rows": []}
    trainer = Trainer(args)
    for _ in range(args.warmup):
        trainer.step()
    names = [n for n, p in trainer.model.named_parameters() if ".layers." in n and p.dim() == 2]
    result["exact_matrix"] = names[0]
    result["settings"]["params_monitored"] = sum(
        p.numel() for n, p in trainer.model.named_parameters() if n in set(names)
    )
    split = None if args.no_split else Split()
    rates = result["rates"] = machine_rates()
    with tempfile.TemporaryDirectory(prefix="deltawatch-bench-hook-") as tmp:
        sidecar = SidecarProcess(Path(tmp)).start()  # --threads 1, OMP_NUM_THREADS=1
        try:
            main_row = run_config(
                trainer, label=f"e{args.every} sidecar", every=args.every,
                endpoint=sidecar.endpoint, rounds=args.rounds, block=block, sidecar=sidecar,
                split=split, exact_matrix=names[0], rates=rates,
            )  # fmt: skip
            result["rows"].append(main_row)
            variants = [{"schedule": "spread"}]
            if args.weight_every > 1:
                variants.insert(0, {"weight_every": args.weight_every})
            if not args.no_unbatched:  # the same checks, each matrix on its own
                variants.insert(0, {"batch_matrices": False})
            for settings in variants if args.rounds_variants else ():
                label = f"e{args.every} sidecar " + ", ".join(
                    f"{k}={v}" for k, v in settings.items()
                )
                on = {"endpoint": sidecar.endpoint, "sidecar": sidecar, "rates": rates}
                row = run_config(
                    trainer, label=label, every=args.every, rounds=args.rounds_variants,
                    block=block, split=None, exact_matrix=names[0], settings=settings, **on,
                )  # fmt: skip
                result["rows"].append(row)
            if args.rounds_1t and args.threads > 1:
                result["rows"].append(
                    run_config(
                        trainer,
                        label=f"e{args.every} sidecar check@1t",
                        every=args.every,
                        endpoint=sidecar.endpoint,
                        rounds=args.rounds_1t,
                        block=block,
                        sidecar=sidecar,
                        split=Split() if split else None,
                        exact_matrix=None,
                        check_threads=1,
                    )  # fmt: skip
                )
            if args.rounds_1:
                result["rows"].append(
                    run_config(
                        trainer,
                        label="e1 sidecar",
                        every=1,
                        endpoint=sidecar.endpoint,
                        rounds=args.rounds_1,
                        block=args.block_1,
                        sidecar=sidecar,
                        split=None,
                        exact_matrix=names[0],
                        profile_last=not args.no_profile,
                    )  # fmt: skip
                )
            if args.rounds_100:
                result["rows"].append(
                    run_config(
                        trainer,
                        label="e100 sidecar",
                        every=100,
                        endpoint=sidecar.endpoint,
                        rounds=args.rounds_100,
                        block=100,
                        sidecar=sidecar,
                        split=None,
                        exact_matrix=None,
                    )  # fmt: skip
                )
            else:
                result["rows"].append(derived_row(main_row, 100))
        finally:
            sidecar.stop()
        if args.rounds_absent:
            result["rows"].append(
                run_config(
                    trainer,
                    label=f"e{args.every} no sidecar",
                    every=args.every,
                    endpoint=closed_port(),
                    rounds=args.rounds_absent,
                    block=block,
                    sidecar=None,
                    split=None,
                    exact_matrix=None,
                )  # fmt: skip
            )
        if args.rounds_wandb:
            result["wandb"] = run_wandb(
                trainer, rounds=args.rounds_wandb, block=block, log_freq=10, directory=tmp
            )
    result["micro"] = {"eigh threads": eigh_threads_micro(args.threads)}
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.bound_shapes.split(",") if s]
    result["bound"] = bound_micro(shapes, rates, args.bound_repeats)
    if not args.no_batched:
        shapes = [tuple(p.shape) for n, p in trainer.model.named_parameters() if n in set(names)]
        result["batched"] = batched_micro(shapes, rates, args.bound_repeats)
    if not args.no_micro:
        shapes = [tuple(p.shape) for n, p in trainer.model.named_parameters() if n in set(names)]
        result["micro"].update(dominates_micro(shapes))
    print_tables(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

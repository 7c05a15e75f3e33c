"""Sidecar ingest benchmark: the ingest rate with and without group commit, and a Qwen3-8B-shaped
check through `Engine.ingest` (geometry + store).

**Ingest rate** (always, a few seconds): reports of small matrices (128×128, K = 16, p = 16) through
the engine, in the same process and on the same data-dir disk: one transaction and one fsync per
report (`Engine.ingest` one by one, the commit of every report before this change) against group
commit (`Engine.ingest_many`, batches of 16 / 64 / 256 sharing one COMMIT), and the same for the
store alone (`Store.commit_check` with precomputed keys: the persistence floor without the
geometry). Printed as reports/s and the ratio to the per-report commit.

**Qwen3-8B check** (`--layers N`, N > 0; 36 is the real model):

Qwen3-8B: 36 layers × 7 matrices, hidden 4096, intermediate 12288, [out, in] shapes
q 4096×4096, k/v 1024×4096, o 4096×4096, gate/up 12288×4096, down 4096×12288; K = 16, p = 16,
r = 32. A report carries G (n×r) and C (r×r) for the update and for the weight tracker, so a check
is Σ n·r·4·2 ≈ 340 MB of float32.

The reports are made without forming any m×n matrix: for a synthetic low-rank A = U·diag(s)·Wᵀ
(rank q = 48, decaying s), G = AᵀA·V = W·diag(s²)·(Wᵀ·V) and C = Vᵀ·G — exactly what a tracker
would send for that A, at O(n·q·r) cost. The ΔW channel is fixed across checks (OPD-like), so the
run locks on the 4th check and the later checks carry the channel statistics.

Printed: seconds per check and MB/s for `Engine.ingest` on every matrix of a check (store with
synchronous=FULL, and NORMAL), the geometry alone (no store), and baselines measured in the same
process on the same bytes: a plain copy of the report tensors (`clone`), and one SQLite commit
per matrix with a 1 KB row (the persistence floor). Ratios are against the copy. Resident memory
(RSS) after start-up, after the checks, and its growth.

    .venv/bin/python bench/bench_sidecar.py               # the ingest-rate table only
    .venv/bin/python bench/bench_sidecar.py --layers 36   # and the Qwen3-8B check, 6 checks
    .venv/bin/python bench/bench_sidecar.py --layers 4    # quicker
    .venv/bin/python bench/bench_sidecar.py --device cuda
    .venv/bin/python bench/bench_sidecar.py --rate-steps 0 --hello-lag 3   # the event loop
    .venv/bin/python bench/bench_sidecar.py --rate-steps 0 --idle 10      # an idle sidecar's CPU
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import sqlite3
import sys
import tempfile
import time
import zlib
from pathlib import Path

import grpc
import psutil
import torch
from deltawatch.client import wire
from deltawatch.client.records import ManifestEntry, MatrixCheck, Sketch
from deltawatch.sidecar.engine import Engine
from deltawatch.sidecar.geometry import MatrixGeometry, ingest_batch, set_threads
from deltawatch.sidecar.ingest import MAX_BATCH
from deltawatch.sidecar.metrics import EngineCollector
from deltawatch.sidecar.process import SidecarProcess
from deltawatch.sidecar.store import CheckCounts, Store
from deltawatch.v1 import deltawatch_pb2_grpc as pb_grpc
from prometheus_client import CollectorRegistry

HIDDEN, INTERMEDIATE, KV = 4096, 12288, 1024
MODULES = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
K, P = 16, 16
R = K + P
Q = 48  # rank of the synthetic matrices behind the sketches


def _gen(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def _orth(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=g))[0]


class SyntheticMatrix:
    """A low-rank A = U·diag(s)·Wᵀ standing in for ΔW (fixed channel W) and for W_t."""

    def __init__(self, name: str, shape: tuple[int, int]) -> None:
        m, n = shape
        self.name, self.shape = name, shape
        g = _gen(name)
        self.W_update = _orth(n, Q, g)  # the update's right singular vectors (fixed channel)
        self.W_weight = _orth(n, Q, g)
        self.s = torch.logspace(0, -2, Q)
        self.V = _orth(n, R, g)  # the tracker's basis

    def sketch(self, W: torch.Tensor, s: torch.Tensor) -> Sketch:
        """G = AᵀA·V = W·diag(s²)·WᵀV and C = VᵀG, as the tracker sends them."""
        G = W @ ((s * s)[:, None] * (W.T @ self.V))
        C = self.V.T @ G
        return Sketch(G.contiguous(), C.contiguous(), 1e-4, 1, False)

    def check(self, step: int, lock_step: int) -> MatrixCheck:
        m, n = self.shape
        scale = 1e-3 * step
        s_update = self.s * scale
        frob_sq = float((s_update * s_update).sum())
        locked_now = step == lock_step
        locked = step >= lock_step
        return MatrixCheck(
            matrix=self.name,
            step=step,
            shape=self.shape,
            numel=m * n,
            frobenius_sq=frob_sq,
            visible_count=m * n // 2,
            visible_low_count=m * n // 4,
            visible_principal_count=m * n // 5,
            channel_energy_sq=0.99 * frob_sq if locked else None,
            update=self.sketch(self.W_update, s_update),
            weight=self.sketch(self.W_weight, self.s * (1 + 1e-4 * step)),
            lock_step=lock_step if locked else None,
            locked_now=locked_now,
            v_ref=self.W_update[:, :K].contiguous() if locked_now else None,
        )


def manifest(layers: int) -> list[ManifestEntry]:
    out = []
    for layer in range(layers):
        for module, (m, n) in MODULES.items():
            name = f"model.layers.{layer}.{module}.weight"
            out.append(
                ManifestEntry(name, (m, n), m * n, "bfloat16", layer, module, "replicated", 0)
            )
    return out


def report_bytes(check: MatrixCheck) -> int:
    t = [check.update.G, check.update.C, check.weight.G, check.weight.C]
    if check.v_ref is not None:
        t.append(check.v_ref)
    return sum(x.numel() * x.element_size() for x in t)


def rss_mb() -> float:
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def dir_mb(d: str) -> float:
    """The data dir's size on disk (the SQLite file, its WAL and shared memory)."""
    return sum(f.stat().st_blocks * 512 for f in Path(d).iterdir() if f.is_file()) / 2**20


def run_engine(entries, mats, checks: int, sync: str, device: str) -> tuple[list[float], int]:
    """Seconds per check of Engine.ingest over every matrix, and the bytes of one check."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        engine = Engine(Store(d, synchronous=sync), channel_rank=K, device=device)
        engine.hello("bench", 1, None, entries, {"channel_rank": K, "oversample": P})
        for mat in mats:
            engine.baseline("bench", 1, mat.name, mat.sketch(mat.W_weight, mat.s))
        times, nbytes = [], 0
        for step in range(1, checks + 1):
            reports = [mat.check(step, lock_step=4) for mat in mats]
            nbytes = sum(report_bytes(c) for c in reports)
            t0 = time.perf_counter()
            for c in reports:
                engine.ingest("bench", 1, c)
            times.append(time.perf_counter() - t0)
            del reports
        engine.store.close()
    return times, nbytes


def run_geometry(mats, checks: int, device: str) -> list[float]:
    geoms = {m.name: MatrixGeometry(m.shape, channel_rank=K, device=device) for m in mats}
    for m in mats:
        geoms[m.name].baseline(m.sketch(m.W_weight, m.s))
    times = []
    for step in range(1, checks + 1):
        reports = [m.check(step, lock_step=4) for m in mats]
        t0 = time.perf_counter()
        for c in reports:
            geoms[c.matrix].ingest(c)
        times.append(time.perf_counter() - t0)
    return times


def run_copy(mats, checks: int) -> list[float]:
    times = []
    for step in range(1, checks + 1):
        reports = [m.check(step, lock_step=4) for m in mats]
        t0 = time.perf_counter()
        for c in reports:
            for t in (c.update.G, c.update.C, c.weight.G, c.weight.C):
                t.clone()
        times.append(time.perf_counter() - t0)
    return times


def run_sqlite(n_matrices: int, checks: int, sync: str) -> list[float]:
    times = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        con = sqlite3.connect(os.path.join(d, "floor.sqlite3"), isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute(f"PRAGMA synchronous={sync}")
        con.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT)")
        row = "x" * 1024
        for step in range(checks):
            t0 = time.perf_counter()
            for i in range(n_matrices):
                con.execute("BEGIN IMMEDIATE")
                con.execute("INSERT INTO t VALUES (?, ?)", (f"{step}.{i}", row))
                con.execute("COMMIT")
            times.append(time.perf_counter() - t0)
        con.close()
    return times


RATE_SHAPE = (128, 128)
RATE_MATRICES = 64


def _rate_run(d: str, mats: list[SyntheticMatrix]) -> Engine:
    entries = [ManifestEntry(m.name, m.shape, m.shape[0] * m.shape[1], "float32", i, "w",
                             "replicated", 0) for i, m in enumerate(mats)]  # fmt: skip
    engine = Engine(Store(d), channel_rank=K, device="cpu")
    engine.hello("rate", 1, None, entries, {"channel_rank": K, "oversample": P})
    for m in mats:
        engine.baseline("rate", 1, m.name, m.sketch(m.W_weight, m.s))
    return engine


def _rate_items(steps: int) -> tuple[list[SyntheticMatrix], list[tuple]]:
    mats = [
        SyntheticMatrix(f"model.layers.{i}.rate.weight", RATE_SHAPE) for i in range(RATE_MATRICES)
    ]
    items = [("rate", 1, m.check(t, lock_step=4), 0) for t in range(1, steps + 1) for m in mats]
    return mats, items


def run_rate(steps: int, batch: int) -> tuple[float, float]:
    """(reports per wall second, reports per CPU second) through the engine: batch 1 = one
    commit and one geometry per report (`Engine.ingest`, the path before group commit), else
    `Engine.ingest_many` of `batch` reports per commit, the geometry batched over them."""
    mats, items = _rate_items(steps)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        engine = _rate_run(d, mats)
        t0, c0 = time.perf_counter(), time.process_time()
        if batch == 1:
            for run, inc, check, _ in items:
                engine.ingest(run, inc, check)
        else:
            for i in range(0, len(items), batch):
                engine.ingest_many(items[i : i + batch])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        engine.store.close()
    return len(items) / wall, len(items) / cpu


def run_geometry_rate(steps: int, batch: int) -> tuple[float, float]:
    """(reports per wall second, per CPU second) of the geometry alone: batch 1 =
    `MatrixGeometry.ingest` report by report (the path before this change), else
    `ingest_batch` over the `batch` reports of one step's matrices at a time."""
    mats, items = _rate_items(steps)
    geoms = {m.name: MatrixGeometry(m.shape, channel_rank=K) for m in mats}
    for m in mats:
        geoms[m.name].baseline(m.sketch(m.W_weight, m.s))
    t0, c0 = time.perf_counter(), time.process_time()
    if batch == 1:
        for _, _, c, _ in items:
            geoms[c.matrix].ingest(c)
    else:
        for i in range(0, len(items), batch):
            ingest_batch([(geoms[c.matrix], c) for _, _, c, _ in items[i : i + batch]])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return len(items) / wall, len(items) / cpu


def run_store_rate(n: int, batch: int) -> tuple[float, float]:
    """(reports per wall second, per CPU second) of `Store.commit_check` alone (1 KB of keys per
    report, no state tensors)."""
    keys = {f"key_{i}": 0.125 * i for i in range(40)}
    counts = CheckCounts(16384, 10, 5, 2)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        store = Store(d)
        store.save_hello("rate", 1, None, {}, [])
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, n, batch):
            with store.transaction():
                for j in range(i, min(n, i + batch)):
                    store.commit_check("rate", f"m{j % 64}", j, 1, keys, counts, None)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        store.close()
    return n / wall, n / cpu


def print_rate_table(steps: int) -> None:
    n = steps * RATE_MATRICES
    print(f"# ingest rate: {n} reports of {RATE_MATRICES} matrices {RATE_SHAPE}, K={K}, r={R}, "
          f"store synchronous=FULL, torch threads {torch.get_num_threads()}")  # fmt: skip
    print()
    print("| path | reports per batch | reports/s | × old path | reports per CPU-s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    paths = (
        ("Engine (geometry + store)", run_rate, steps, (1, 16, 64, 256)),
        ("geometry alone", run_geometry_rate, steps, (1, 64)),
        ("Store.commit_check alone", run_store_rate, 4 * n, (1, 256)),
    )
    for name, fn, count, batches in paths:
        base = None
        for batch in batches:
            rate, per_cpu = fn(count, batch)
            base = base or rate
            print(f"| {name} | {batch} | {rate:,.0f} | {rate / base:.1f} | {per_cpu:,.0f} |")
    print()


# Qwen3-30B-A3B: 48 layers, hidden 2048, 32 query / 4 key-value heads of 128, 128 experts of
# intermediate 768 per layer (gate, up [768, 2048], down [2048, 768]), the router [128, 2048].
MOE_HIDDEN, MOE_INTERMEDIATE, MOE_EXPERTS = 2048, 768, 128
MOE_DENSE = {
    "self_attn.q_proj": (4096, MOE_HIDDEN),
    "self_attn.k_proj": (512, MOE_HIDDEN),
    "self_attn.v_proj": (512, MOE_HIDDEN),
    "self_attn.o_proj": (MOE_HIDDEN, 4096),
    "mlp.gate": (MOE_EXPERTS, MOE_HIDDEN),
}
MOE_EXPERT_MODULES = {
    "gate_proj": (MOE_INTERMEDIATE, MOE_HIDDEN),
    "up_proj": (MOE_INTERMEDIATE, MOE_HIDDEN),
    "down_proj": (MOE_HIDDEN, MOE_INTERMEDIATE),
}
MOE_POOL = 4  # distinct synthetic matrices per shape; the experts share their sketches


def moe_manifest(layers: int, experts: int) -> list[ManifestEntry]:
    """The Qwen3-30B-A3B matrices as a hello declares them (expert names as DESIGN's MoE
    contract spells them)."""
    out = []
    for layer in range(layers):
        for module, (m, n) in MOE_DENSE.items():
            name = f"model.layers.{layer}.{module}.weight"
            out.append(ManifestEntry(name, (m, n), m * n, "bfloat16", layer, module,
                                     "replicated", 0))  # fmt: skip
        for proj, (m, n) in MOE_EXPERT_MODULES.items():
            for e in range(experts):
                name = f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
                out.append(ManifestEntry(name, (m, n), m * n, "bfloat16", layer,
                                         f"mlp.experts.{proj}", "replicated", 0, e))  # fmt: skip
    return out


def run_moe(layers: int, experts: int, checks: int) -> None:
    """A Qwen3-30B-A3B-shaped run through `Engine.ingest_many` in the ingest's batches
    (MAX_BATCH): the hello, the baselines, then `checks` checks timed one by one; the last check
    also through `Engine.ingest` report by report (the path before this change) on a sample,
    in the same engine; the Prometheus series the default and the per-expert detail export."""
    entries = moe_manifest(layers, experts)
    pool: dict[tuple[int, int], list[SyntheticMatrix]] = {}
    for shape in {e.shape for e in entries}:
        pool[shape] = [SyntheticMatrix(f"pool.{shape}.{i}", shape) for i in range(MOE_POOL)]
    source = {e.matrix: pool[e.shape][i % MOE_POOL] for i, e in enumerate(entries)}
    print(f"# Qwen3-30B-A3B-shaped run: {layers} layers, {len(entries)} matrices "
          f"({layers * experts * 3} expert matrices), K={K}, r={R}, store synchronous=FULL, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    print()
    rss0 = rss_mb()
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        engine = Engine(Store(d), channel_rank=K, device="cpu")
        t0 = time.perf_counter()
        engine.hello("moe", 1, None, entries, {"channel_rank": K, "oversample": P})
        rows.append(("hello (manifest)", time.perf_counter() - t0, len(entries), dir_mb(d)))
        t0 = time.perf_counter()
        sketches = {id(m): m.sketch(m.W_weight, m.s) for ms in pool.values() for m in ms}
        baselines = [("moe", 1, e.matrix, sketches[id(source[e.matrix])]) for e in entries]
        for i in range(0, len(baselines), MAX_BATCH):
            engine.baseline_many(baselines[i : i + MAX_BATCH])
        rows.append(("baselines, Engine.baseline_many", time.perf_counter() - t0, len(entries),
                     dir_mb(d)))  # fmt: skip
        sample = min(len(entries) // 2, 512)
        for step in range(1, checks + 1):
            made = {id(m): m.check(step, lock_step=4) for ms in pool.values() for m in ms}
            items = [
                ("moe", 1, dataclasses.replace(made[id(source[e.matrix])], matrix=e.matrix), 0)
                for e in entries
            ]
            last = step == checks
            new, old = (items[sample:], items[:sample]) if last else (items, [])
            t0 = time.perf_counter()
            for i in range(0, len(new), MAX_BATCH):
                engine.ingest_many(new[i : i + MAX_BATCH])
            rows.append((f"check {step}, Engine.ingest_many", time.perf_counter() - t0, len(new),
                         dir_mb(d)))  # fmt: skip
            if old:
                t0 = time.perf_counter()
                for run, inc, check, _ in old:
                    engine.ingest(run, inc, check)
                rows.append((f"check {step}, Engine.ingest one by one (old path)",
                             time.perf_counter() - t0, len(old), dir_mb(d)))  # fmt: skip
        rss1 = rss_mb()
        series = {}
        for detail in ("matrix", "expert"):
            registry = CollectorRegistry(auto_describe=False)
            registry.register(EngineCollector(engine, detail=detail))
            series[detail] = sum(len(f.samples) for f in registry.collect())
        engine.store.close()
    print("| what | reports | wall s | reports/s | s per 18,432 reports at this rate "
          "| data dir MB after |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, wall, n, mb in rows:
        print(f"| {name} | {n:,} | {wall:.2f} | {n / wall:,.0f} | {18432 * wall / n:,.1f} "
              f"| {mb:,.0f} |")  # fmt: skip
    print()
    print(f"Prometheus series (engine collector): {series['matrix']:,} with --metrics-detail "
          f"matrix (the default), {series['expert']:,} with --metrics-detail expert")  # fmt: skip
    print(f"RSS: {rss0:.0f} MB before the engine, {rss1:.0f} MB after {checks} checks "
          f"(+{rss1 - rss0:.0f} MB: the engine's per-matrix state and SQLite cache)")  # fmt: skip
    print()


HELLO_MATRICES = 100_000  # the largest manifest a hello may carry


def _loop_lag_max(side: SidecarProcess) -> float:
    """The sidecar's own probe of its event loop's longest stall since start (seconds)."""
    return side.metric("deltawatch_event_loop_lag_max_seconds", timeout=60)


def run_hello_lag(repeats: int) -> None:
    """A real `deltawatch serve` (one thread) takes a 100,000-matrix hello from this process,
    `repeats` times, each into a fresh sidecar: how long the hello took to be answered, and the
    event loop's longest stall over it (`deltawatch_event_loop_lag_max_seconds`: the selector's
    timed polls, `server.probe_loop_lag`)."""
    manifest = [
        {"matrix": f"l.{i}", "shape": [4, 4], "numel": 16, "dtype": "float32", "layer": None,
         "module": "m"}
        for i in range(HELLO_MATRICES)
    ]  # fmt: skip
    hello = wire.encode_hello(
        1, run="big", incarnation=1, resume_step=None, client_version="bench",
        config={"channel_rank": 2, "oversample": 2}, manifest=manifest,
    )  # fmt: skip
    print(f"# a {HELLO_MATRICES:,}-matrix hello ({hello[0].ByteSize() / 1e6:.1f} MB) into "
          f"`deltawatch serve --threads 1`, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print()
    print("| try | answered in s | loop's longest stall ms | stall before the hello ms |")
    print("| ---: | ---: | ---: | ---: |")
    for i in range(repeats):
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
            side = SidecarProcess(d).start()
            try:
                time.sleep(1.0)  # the probe's first samples
                before = _loop_lag_max(side)
                t0 = time.perf_counter()
                with grpc.insecure_channel(side.endpoint) as ch:
                    out = list(pb_grpc.IngestStub(ch).Stream(iter(hello), timeout=300))
                answered = time.perf_counter() - t0
                if [m.WhichOneof("body") for m in out] != ["ack"]:
                    raise RuntimeError(f"the hello was not acknowledged: {out}")
                time.sleep(0.3)
                lag = _loop_lag_max(side)
            finally:
                side.kill()
        print(f"| {i + 1} | {answered:.2f} | {lag * 1e3:.0f} | {before * 1e3:.0f} |")
    print()


def _bare_loop_cpu(seconds: float, period: float) -> float:
    """CPU seconds per second of a bare asyncio loop in this process that only sleeps `period`
    again and again (the lag probe's cost before it timed the selector: period 10 ms)."""

    async def main() -> float:
        async def sleeper() -> None:
            while True:
                await asyncio.sleep(period)

        task = asyncio.get_running_loop().create_task(sleeper())
        c0 = time.process_time()
        await asyncio.sleep(seconds)
        task.cancel()
        return (time.process_time() - c0) / seconds

    return asyncio.run(main())


def run_idle_cpu(seconds: float) -> None:
    """The CPU an idle `deltawatch serve --threads 1` takes (no stream, no scrape) beside what a
    bare asyncio loop waking every 10 ms and every 100 ms takes in this process."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        side = SidecarProcess(d).start()
        try:
            time.sleep(2.0)  # start-up done
            proc = psutil.Process(side.pid)
            c0 = sum(proc.cpu_times()[:2])  # user + system
            time.sleep(seconds)
            idle = (sum(proc.cpu_times()[:2]) - c0) / seconds
        finally:
            side.kill()
    bare_10, bare_100 = _bare_loop_cpu(seconds, 0.01), _bare_loop_cpu(seconds, 0.1)
    print(f"# idle CPU over {seconds:.0f} s, load average {os.getloadavg()[0]:.1f}")
    print()
    print("| what | ms CPU per s | × bare loop waking every 10 ms |")
    print("| --- | ---: | ---: |")
    for name, v in (
        ("bare asyncio loop, a 10 ms sleep again and again (baseline)", bare_10),
        ("bare asyncio loop, a 100 ms sleep again and again", bare_100),
        ("idle `deltawatch serve --threads 1`", idle),
    ):
        print(f"| {name} | {v * 1e3:.1f} | {v / bare_10:.2f} |")
    print()


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=0, help="Qwen3-8B layers (0: rate table only)")
    ap.add_argument("--rate-steps", type=int, default=4, help="checks in the ingest-rate table")
    ap.add_argument(
        "--moe-layers",
        type=int,
        default=0,
        help="Qwen3-30B-A3B layers in the MoE check (48 is the real model; 0: none)",
    )
    ap.add_argument("--moe-experts", type=int, default=MOE_EXPERTS)
    ap.add_argument("--moe-checks", type=int, default=3)
    ap.add_argument(
        "--hello-lag", type=int, default=0, help="tries of the 100k-matrix hello (0: none)"
    )
    ap.add_argument(
        "--idle", type=float, default=0, help="seconds of an idle sidecar's CPU (0: none)"
    )
    ap.add_argument("--checks", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch and BLAS threads (0: their defaults)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        set_threads(args.threads)
    torch.manual_seed(0)
    if args.rate_steps > 0:
        print_rate_table(args.rate_steps)
    if args.moe_layers > 0:
        run_moe(args.moe_layers, args.moe_experts, args.moe_checks)
    if args.hello_lag > 0:
        run_hello_lag(args.hello_lag)
    if args.idle > 0:
        run_idle_cpu(args.idle)
    if args.layers <= 0:
        return
    rss0 = rss_mb()
    entries = manifest(args.layers)
    mats = [SyntheticMatrix(e.matrix, e.shape) for e in entries]
    rss_setup = rss_mb()
    print(
        f"# {args.layers} layers × {len(MODULES)} matrices = {len(mats)} matrices, K={K}, r={R}, "
        f"{args.checks} checks, device {args.device}, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs"
    )
    copy = run_copy(mats, args.checks)
    floor = run_sqlite(len(mats), args.checks, "FULL")
    geometry = run_geometry(mats, args.checks, args.device)
    rss_before = rss_mb()
    full, nbytes = run_engine(entries, mats, args.checks, "FULL", args.device)
    rss_after = rss_mb()
    normal, _ = run_engine(entries, mats, args.checks, "NORMAL", args.device)
    mb = nbytes / 1e6
    base = median(copy)
    rows = [
        ("copy of the report tensors (baseline)", copy),
        ("SQLite: one 1 KB commit per matrix, FULL", floor),
        ("geometry only (MatrixGeometry.ingest)", geometry),
        ("Engine.ingest, store synchronous=FULL", full),
        ("Engine.ingest, store synchronous=NORMAL", normal),
    ]
    print(f"# one check = {mb:.1f} MB of report tensors (G, C of both trackers)")
    print()
    print(f"| {'what':<42} | s/check (median) | first check s | MB/s | × copy |")
    print(f"| {'-' * 42} | ---: | ---: | ---: | ---: |")
    for name, t in rows:
        med = median(t)
        print(
            f"| {name:<42} | {med:.3f} | {t[0]:.3f} | {mb / med:,.0f} | "
            f"{med / base if base > 0 else math.nan:,.1f} |"
        )
    print()
    print(
        f"RSS: {rss0:.0f} MB at start, {rss_setup:.0f} MB with the synthetic matrices, "
        f"{rss_before:.0f} MB before the engine, {rss_after:.0f} MB after {args.checks} checks "
        f"(+{rss_after - rss_before:.0f} MB: the engine's per-matrix state and SQLite cache)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])

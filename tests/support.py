"""Shared pieces of the tests (no tests here).

The sidecar process is the product's own (`deltawatch.sidecar.process.SidecarProcess`); the
Prometheus server is the tests' (`servers.PrometheusServer`). Here: `wait_for` and
`get_json`; a synthetic monitored run whose reports are real `MatrixCheck`s from the core's
`MatrixTracker`; a real aiohttp server on a loopback port in a background thread; the engine's
comparison against the exact float64 reference; a tiny torch model and rank-16 channels for runs
that drift (`TinyModel`, `channel`), a webhook receiver (`WebhookReceiver`) and a real
Alertmanager (`AlertmanagerServer`); the batched checks' comparisons (`packed_trajectory`,
`assert_same_check`, `assert_check_is_exact`).

The synthetic run, per matrix (m×n, float32): W0 = U·diag(σ)·Vᵀ with a pretrained-like decaying
spectrum σ_i = 10^(−2·i/min(m,n)) · 0.5; OPD-like update W_t = W0 + s·t·A·B / K + ε·√t·N_t with a
fixed rank-K channel A (m×K), B (K×n) Gaussian, s = 2e-3, ε = 2e-5, N_t a fresh Gaussian per step
(faint dense noise): the channel dominates, so the update's subspace is stable and locks.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from aiohttp import web
from deltawatch.client.naming import parse_name
from deltawatch.client.records import ManifestEntry, MatrixCheck, Sketch
from deltawatch.client.settings import LockSettings, SketchSettings
from deltawatch.client.tracker import MatrixTracker
from deltawatch.sidecar.exact import exact_counts, exact_keys
from deltawatch.sidecar.keys import MATRIX_KEYS
from deltawatch.sidecar.process import SidecarProcess, free_port
from servers import AlertmanagerServer, PrometheusServer, get_json, wait_for

__all__ = [
    "AlertmanagerServer",
    "PrometheusServer",
    "SidecarProcess",
    "free_port",
    "get_json",
    "wait_for",
]


SHAPES: dict[str, tuple[int, int]] = {
    "model.layers.0.self_attn.q_proj.weight": (96, 64),
    "model.layers.0.mlp.down_proj.weight": (64, 128),
    "model.layers.1.self_attn.k_proj.weight": (24, 64),  # min(m, n) <= r: the exact path
}
CHANNEL_RANK = 8
OVERSAMPLE = 8


def sidecar_fixture(*flags: str, **kwargs: Any) -> Callable[..., Any]:
    """A module-scoped fixture: one real `deltawatch serve` (`SidecarProcess` with `flags` and
    `kwargs`) for the tests of a module, its data directory (and log) in a fresh temporary
    directory; stopped after them. In a test module: `sidecar = sidecar_fixture()`."""

    @pytest.fixture(scope="module")
    def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
        with SidecarProcess(tmp_path_factory.mktemp("sidecar") / "data", *flags, **kwargs) as side:
            yield side

    return sidecar


def assert_agrees(va: Any, vb: Any, where: str, rel: float, slack: float = 0.0) -> bool:
    """One key of two runs' points: nulls and flags equal, numbers within `rel` of the larger
    plus `slack`. Returns whether two numbers were compared."""
    if va is None or vb is None or isinstance(va, bool):
        assert va == vb, where
        return False
    assert abs(va - vb) <= rel * max(abs(va), abs(vb)) + slack, where
    return True


def one_thread_fixture(scope: str = "module", autouse: bool = True) -> Callable[..., Any]:
    """A fixture running torch on one intra-op thread (the count before restored after): for a
    module-scoped one, the module's fixtures too. Tiny matrices on a shared 2-core box spend more
    time synchronising two threads than computing, and a small host eigendecomposition runs ~50x
    slower beside a busy sidecar child (which runs its own single thread)."""

    @pytest.fixture(scope=scope, autouse=autouse)
    def one_thread() -> Iterator[None]:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(before)

    return one_thread


def _gen(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def decaying_weight(m: int, n: int, seed: object) -> torch.Tensor:
    """W0 = U·diag(σ)·Vᵀ, σ_i = 0.5·10^(−2i/min(m, n)) (float32)."""
    g = _gen("w0", seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = min(m, n)
    sigma = 0.5 * torch.logspace(0, -2, k, dtype=torch.float64)
    return ((U[:, :k] * sigma) @ V[:, :k].T).float()


@dataclass
class SyntheticRun:
    """A monitored OPD-like run over SHAPES, checked every step with real trackers."""

    run: str = "toy-opd"
    shapes: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(SHAPES))
    channel_rank: int = CHANNEL_RANK
    oversample: int = OVERSAMPLE
    scale: float = 2e-3
    noise: float = 2e-5
    lock_at_step: int | None = None

    def __post_init__(self) -> None:
        self.W0 = {name: decaying_weight(m, n, name) for name, (m, n) in self.shapes.items()}
        self.channel = {
            name: (
                torch.randn(m, self.channel_rank, generator=_gen("A", name)),
                torch.randn(self.channel_rank, n, generator=_gen("B", name)),
            )
            for name, (m, n) in self.shapes.items()
        }
        self.trackers = self.new_trackers()

    def new_trackers(self) -> dict[str, MatrixTracker]:
        return {
            name: MatrixTracker.attach(
                name,
                W0.clone(),
                sketch=SketchSettings(channel_rank=self.channel_rank, oversample=self.oversample),
                lock=LockSettings(at_step=self.lock_at_step),
            )
            for name, W0 in self.W0.items()
        }

    def weight(self, name: str, step: int) -> torch.Tensor:
        A, B = self.channel[name]
        m, n = self.shapes[name]
        N = torch.randn(m, n, generator=_gen("N", name, step))
        return (
            self.W0[name]
            + self.scale * step * (A @ B) / self.channel_rank
            + self.noise * step**0.5 * N
        )

    def checks(self, step: int) -> list[MatrixCheck]:
        return [tr.check(self.weight(name, step), step) for name, tr in self.trackers.items()]

    def baselines(self) -> dict[str, Sketch]:
        return {name: tr.baseline() for name, tr in self.trackers.items()}

    def manifest(self) -> list[ManifestEntry]:
        out = []
        for name, (m, n) in self.shapes.items():
            layer, module = parse_name(name)
            out.append(
                ManifestEntry(name, (m, n), m * n, "float32", layer, module, "replicated", 0)
            )
        return out

    def config(self) -> dict:
        return {"channel_rank": self.channel_rank, "oversample": self.oversample, "view": "bf16"}

    def start(self, engine, incarnation: int = 1, resume_step: int | None = None):
        """hello + baselines, as the ingest would call them."""
        result = engine.hello(self.run, incarnation, resume_step, self.manifest(), self.config())
        for name, sketch in self.baselines().items():
            engine.baseline(self.run, incarnation, name, sketch)
        return result


def stream_run(
    endpoint: str,
    run: SyntheticRun,
    manifest: list[dict],
    steps: list[int],
    *,
    incarnation: int = 1,
    config: dict | None = None,
) -> dict[int, dict[str, MatrixCheck]]:
    """Send `run` over one real gRPC stream, as a trainer would: a hello with `manifest` (wire
    dicts, e.g. with `expert`), every baseline, the checks of `steps`; every message must be
    acknowledged. Returns the checks sent, by step and matrix."""
    import grpc
    from deltawatch.client import wire
    from deltawatch.v1 import deltawatch_pb2_grpc as pb_grpc

    frames = wire.encode_hello(
        1, run=run.run, incarnation=incarnation, resume_step=None, client_version="test",
        config=run.config() if config is None else config, manifest=manifest,
    )  # fmt: skip
    msg_id = 2
    for name, sketch in run.baselines().items():
        frames += wire.encode_baseline(
            msg_id, run=run.run, incarnation=incarnation, matrix=name, sketch=sketch
        )
        msg_id += 1
    checks = {}
    for step in steps:
        checks[step] = {c.matrix: c for c in run.checks(step)}
        for check in checks[step].values():
            frames += wire.encode_report(msg_id, run=run.run, incarnation=incarnation, check=check)
            msg_id += 1
    with grpc.insecure_channel(endpoint) as ch:
        out = list(pb_grpc.IngestStub(ch).Stream(iter(frames), timeout=120))
    errors = [m.error for m in out if m.WhichOneof("body") == "error"]
    acked = sorted(i for m in out if m.WhichOneof("body") == "ack" for i in m.ack.ids)
    assert not errors and acked == list(range(1, msg_id)), errors
    return checks


def expert_manifest(
    layers: int, experts: int, shapes: dict[str, tuple[int, int]], dense: dict[str, tuple]
) -> list[dict]:
    """Wire manifest dicts of `layers` blocks: the `dense` modules (module -> shape), then
    `experts` experts of every `shapes` projection (proj -> shape), named as DESIGN's MoE
    contract spells them (model.layers.L.mlp.experts.E.PROJ.weight: module mlp.experts.PROJ)."""
    out = []
    for layer in range(layers):
        for module, (m, n) in dense.items():
            out.append({"matrix": f"model.layers.{layer}.{module}.weight", "shape": [m, n],
                        "layer": layer, "module": module, "expert": None})  # fmt: skip
        for proj, (m, n) in shapes.items():
            for e in range(experts):
                out.append({"matrix": f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight",
                            "shape": [m, n], "layer": layer, "module": f"mlp.experts.{proj}",
                            "expert": e})  # fmt: skip
    for item in out:
        item.update(numel=item["shape"][0] * item["shape"][1], dtype="float32")
    return out


TINY_M, TINY_N = 64, 128
TINY_LAYERS = 2


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = torch.nn.Module()
        self.mlp.up_proj = torch.nn.Linear(TINY_N, TINY_M, bias=False)


class TinyModel(torch.nn.Module):
    """model.layers.{i}.mlp.up_proj.weight, [TINY_M, TINY_N], with a pretrained-like spectrum."""

    def __init__(self, g: torch.Generator) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(Block() for _ in range(TINY_LAYERS))
        with torch.no_grad():
            for block in self.model.layers:
                U, _ = torch.linalg.qr(torch.randn(TINY_M, TINY_M, generator=g))
                V, _ = torch.linalg.qr(torch.randn(TINY_N, TINY_N, generator=g))
                s = torch.arange(1, TINY_M + 1, dtype=torch.float32) ** -0.7
                block.mlp.up_proj.weight.copy_((U * s) @ V[:, :TINY_M].T)


class AttentionMlpBlock(torch.nn.Module):
    """A block with two [m, n] matrices: self_attn.o_proj and mlp.up_proj."""

    def __init__(self, m: int, n: int) -> None:
        super().__init__()
        self.self_attn = torch.nn.Module()
        self.self_attn.o_proj = torch.nn.Linear(n, m, bias=False)
        self.mlp = torch.nn.Module()
        self.mlp.up_proj = torch.nn.Linear(n, m, bias=False)


def channel(g: torch.Generator, k: int = 16) -> torch.Tensor:
    U, _ = torch.linalg.qr(torch.randn(TINY_M, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(TINY_N, k, generator=g))
    return U @ torch.diag(torch.linspace(1.0, 0.5, k)) @ V.T


class WebhookReceiver:
    """A real aiohttp server on its own thread and loop, recording POSTed JSON bodies."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def handle(request: web.Request) -> web.Response:
            self.bodies.append(await request.json())
            return web.Response(text="ok")

        async def start() -> None:
            app = web.Application()
            app.router.add_post("/alertmanager", handle)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", 0).start()
            self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/alertmanager"
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


class ServerThread:
    """A real aiohttp server for an app factory on 127.0.0.1:<ephemeral>, in its own loop/thread."""

    def __init__(self, make_app) -> None:
        self._make_app = make_app
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self.port = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._make_app())
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(30)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def get_json(self, path: str) -> tuple[int, object]:
        status, _, body = self.get(path)
        return status, json.loads(body)


def assert_rotation_within_bound(got: dict, ref: dict) -> None:
    """The live rotation keys are null (their bound does not show them within the stated
    accuracy, sketch.rotation_within_accuracy) or within 10% or 0.05° of the float64 value."""
    for key in ("rotation_mean_degrees", "rotation_max_degrees"):
        if got[key] is not None:
            assert abs(got[key] - ref[key]) <= max(0.1 * ref[key], 0.05), (key, got[key], ref[key])


def assert_matches_reference(run: SyntheticRun, matrices: list[dict], checks: dict, step: int):
    """The API's matrices at `step` against the exact float64 reference, with the issue-2 bounds
    for an OPD-like run after >= 3 checks: ‖ΔW‖_F relative 1e-4; visible count and both overlaps
    exactly the reference's; stable rank 2%; σ1 1%; top-K energy, Sim_K against V_ref and channel
    energy 0.02; rotation null or within 10% or 0.05°."""
    by_name = {m["matrix"]: m for m in matrices}
    v_refs = {c.matrix: c.v_ref for s in checks for c in checks[s] if c.locked_now}
    lock_steps = {c.matrix: c.step for s in checks for c in checks[s] if c.locked_now}
    assert set(v_refs) == set(run.shapes), "every OPD-like matrix locks within the run"
    for name, (m, n) in run.shapes.items():
        got = by_name[name]
        assert got["step"] == step
        W0, Wt = run.W0[name], run.weight(name, step)
        ref = exact_keys(
            W0, Wt, channel_rank=run.channel_rank, k_rotation=run.channel_rank, v_ref=v_refs[name]
        )
        counts = exact_counts(W0, Wt)
        assert abs(got["frobenius_norm"] - ref["frobenius_norm"]) <= 1e-4 * ref["frobenius_norm"]
        assert got["bf16_visible_ratio"] == counts["visible"] / (m * n)
        assert got["low_magnitude_overlap"] == counts["visible_low"] / counts["visible"]
        assert got["principal_overlap"] == counts["visible_principal"] / counts["visible"]
        assert abs(got["stable_rank"] / ref["stable_rank"] - 1) <= 0.02
        assert abs(got["spectral_norm"] / ref["spectral_norm"] - 1) <= 0.01
        assert abs(got["topk_energy_ratio"] - ref["topk_energy_ratio"]) <= 0.02
        assert abs(got["subspace_alignment"] - ref["subspace_alignment"]) <= 0.02
        assert abs(got["channel_energy_ratio"] - ref["channel_energy_ratio"]) <= 0.02
        assert_rotation_within_bound(got, ref)
        assert got["locked"] is True and got["lock_step"] == lock_steps[name]
        assert set(got) == {"matrix", "layer", "module", "expert", "shape", "step", *MATRIX_KEYS}
        assert got["shape"] == [m, n]


CHROMIUM = "/usr/bin/chromium"


def chromium(url: str, *args: str, budget_ms: int = 5000, timeout: float = 120.0) -> str:
    """Run the real headless Chromium (Debian package `chromium`) on `url` with a fresh profile:
    `args` e.g. "--dump-dom" (its stdout, the DOM after the page's scripts ran for `budget_ms` of
    virtual time) or "--screenshot=PATH". No network but loopback is used."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="deltawatch-chromium-") as profile:
        job = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--virtual-time-budget={budget_ms}",
                *args,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if job.returncode != 0:
        raise AssertionError(f"chromium failed ({job.returncode}): {job.stderr[-3000:]}")
    return job.stdout


@dataclass(eq=False)
class Element:
    """One element of a parsed DOM: tag, attributes, and its text (descendants' text included)."""

    tag: str
    attrs: dict[str, str]
    text: str = ""


def parse_dom(html: str) -> list[Element]:
    """Every element of an HTML document in document order (stdlib html.parser)."""
    from html.parser import HTMLParser

    void = {"meta", "link", "br", "img", "input", "hr", "area", "base", "col", "source", "wbr"}
    out: list[Element] = []
    stack: list[Element] = []

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            e = Element(tag, {k: v or "" for k, v in attrs})
            out.append(e)
            if tag not in void:
                stack.append(e)

        def handle_startendtag(self, tag, attrs):
            out.append(Element(tag, {k: v or "" for k, v in attrs}))

        def handle_endtag(self, tag):
            while stack:
                e = stack.pop()
                if e.tag == tag:
                    break

        def handle_data(self, data):
            for e in stack:
                e.text += data

    Parser().feed(html)
    return out


def drifting_run(
    endpoint: str,
    run: str,
    *,
    layers: int = 4,
    steps: int = 40,
    move_at: int = 22,
    token_file: str | None = None,
    pause: float = 0.0,
) -> dict[str, Any]:
    """A real Monitor (every=1) on a torch model of `layers` blocks × 2 matrices (64×128) whose
    weights follow a scripted trajectory: each matrix moves inside its own fixed rank-16 channel
    (OPD-like, so it locks), and after `move_at` the matrices of the upper half of the layers move
    along a new channel three times as fast, so they drift after their lock (SubspaceDrift).
    `pause` seconds between steps (so a scraper sees the run unfold). Returns the Monitor's stats
    after close(). Runs on one intra-op thread (on a shared 2-core
    machine the default pool made the same checks ~20× slower)."""
    from deltawatch.client import Monitor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _drifting_run(endpoint, run, layers, steps, move_at, token_file, pause, Monitor)
    finally:
        torch.set_num_threads(threads)


def _drifting_run(
    endpoint, run, layers, steps, move_at, token_file, pause, Monitor
) -> dict[str, Any]:
    m, n = 64, 128
    g = torch.Generator().manual_seed(7)

    def pretrained_like() -> torch.Tensor:
        U, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
        V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
        return (U * torch.arange(1, m + 1, dtype=torch.float32) ** -0.7) @ V[:, :m].T

    def channel() -> torch.Tensor:
        U, _ = torch.linalg.qr(torch.randn(m, 16, generator=g))
        V, _ = torch.linalg.qr(torch.randn(n, 16, generator=g))
        return U @ torch.diag(torch.linspace(1.0, 0.5, 16)) @ V.T

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList(AttentionMlpBlock(m, n) for _ in range(layers))
    named = sorted(model.named_parameters())
    with torch.no_grad():
        for _, p in named:
            p.copy_(pretrained_like())
    first = [channel() for _ in named]
    second = [channel() for _ in named]
    mon = Monitor(model, run=run, endpoint=endpoint, every=1, token_file=token_file)
    with torch.no_grad():
        for step in range(1, steps + 1):
            for (name, p), a, b in zip(named, first, second, strict=True):
                moved = step > move_at and int(name.split(".")[2]) >= layers // 2
                p.add_(3e-4 * (3.0 * b if moved else a) + 3e-6 * torch.randn(m, n, generator=g))
            mon.step(step)
            time.sleep(pause)
    mon.close(timeout=120)
    return mon.stats()


# --------------------------------------------------------------------------------------------
# Batched checks (client/batch.py): tests/test_moe.py, tests/test_batch.py


def packed_trajectory(E: int, m: int, n: int, steps: int, still: int):
    """A packed [E, m, n] float32 weight and its trajectory: W0 random, per expert a rank-2
    update growing with the step plus faint noise; expert `still` never moves."""
    g = torch.Generator().manual_seed(3)
    W0 = 0.05 * torch.randn(E, m, n, generator=g)
    A, B = torch.randn(E, m, 2, generator=g), torch.randn(E, 2, n, generator=g)
    out = []
    for t in range(1, steps + 1):
        noise = torch.randn(E, m, n, generator=g)
        W = W0 + t * 2e-3 * torch.bmm(A, B) + 3e-4 * t**0.5 * noise
        W[still] = W0[still]
        out.append(W)
    return W0, out


def assert_same_check(got, ref, where: str) -> None:
    """A batched check equals its own tracker's: counts exactly, norms and sketches to float32
    rounding of the reordered products."""
    assert got.matrix == ref.matrix and got.step == ref.step, where
    assert (got.visible_count, got.visible_low_count, got.visible_principal_count) == (
        ref.visible_count,
        ref.visible_low_count,
        ref.visible_principal_count,
    ), where
    assert got.frobenius_sq == pytest.approx(ref.frobenius_sq, rel=1e-12), where
    assert got.lock_step == ref.lock_step and got.locked_now == ref.locked_now, where
    for a, b in ((got.update, ref.update), (got.weight, ref.weight)):
        assert (a is None) == (b is None), where
        if a is None:
            continue
        assert (a.power_steps, a.exact) == (b.power_steps, b.exact), where
        # each column up to its sign: an eigenvector's sign is LAPACK's choice (batched and
        # single calls differ), and the sidecar's Rayleigh–Ritz on (G, C) does not depend on it
        sign = torch.where((a.G * b.G).sum(0) < 0, -1.0, 1.0)
        scale = float(b.G.norm())
        assert float((a.G * sign - b.G).norm()) <= 1e-4 * scale, where
        C = a.C * sign * sign[:, None]
        assert float((C - b.C).norm()) <= 1e-4 * float(b.C.norm()), where
        assert a.convergence == pytest.approx(b.convergence, rel=1e-3, abs=1e-6), where
    assert (got.channel_energy_sq is None) == (ref.channel_energy_sq is None), where
    if ref.channel_energy_sq is not None:
        assert got.channel_energy_sq == pytest.approx(ref.channel_energy_sq, rel=1e-4), where


def assert_check_is_exact(got, W0: torch.Tensor, Wt: torch.Tensor, channel_rank: int) -> None:
    """A check of W_t against the float64 reference (sidecar/exact.py): ‖ΔW‖_F to 1e-5, σ1 to
    1e-2 from the converged sketch, the counts exactly; ΔW = 0: no sketch, the degenerate
    values."""
    from deltawatch.client.sketch import rayleigh_ritz

    ref = exact_keys(W0, Wt, channel_rank=channel_rank)
    frob = ref["frobenius_norm"]
    assert got.frobenius_sq**0.5 == pytest.approx(frob, rel=1e-5)
    if frob == 0:
        assert got.update is None and got.visible_count == 0
        return
    assert got.update.convergence <= 5e-2
    theta, _ = rayleigh_ritz(got.update.G, got.update.C)
    assert float(theta[0]) ** 0.5 == pytest.approx(ref["spectral_norm"], rel=1e-2)
    counts = exact_counts(W0, Wt)
    assert got.visible_count == counts["visible"]
    assert got.visible_low_count == counts["visible_low"]
    assert got.visible_principal_count == counts["visible_principal"]

"""One event loop: the grpc.aio ingest server and the aiohttp HTTP app, graceful on SIGTERM.

    store -> engine (linear algebra on the ingest's worker thread)
          -> alert engine (listener on the engine) -> webhook / Alertmanager / gRPC streams
    IngestService (gRPC, with health and reflection)   make_app (HTTP: API, /metrics, probes)

`Sidecar(config)` builds the parts; `await sidecar.start()` binds both ports (port 0 picks a free
one: `grpc_port` / `http_port`, logged, and written to `--ready-file` as JSON); `await
sidecar.stop()` shuts down in order (health NOT_SERVING, streams closed, gRPC drained within
`grace_seconds`, alerts flushed, HTTP closed, store closed). `serve(config)` runs until SIGTERM or
SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import tempfile
import time

import grpc
from aiohttp import web
from deltawatch.client.wire import MAX_FRAME_BYTES
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import auth, ingest
from .alerts.config import load_alert_config
from .alerts.engine import AlertEngine, AlertService, StoreAlertState
from .config import ServeConfig
from .engine import Engine
from .geometry import set_threads
from .http_api import make_app
from .ingest import IngestLimits, IngestService
from .metrics import make_registry
from .store import Store

log = logging.getLogger("deltawatch.sidecar")

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_FRAME_BYTES),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class Sidecar:
    """The assembled service (see the module docstring)."""

    def __init__(self, config: ServeConfig):
        self.config = config
        os.makedirs(config.data_dir, exist_ok=True)
        if config.threads:
            set_threads(config.threads)
        self.store = Store(config.data_dir)
        self.engine = Engine(self.store, channel_rank=config.channel_rank, device=config.device)
        alert_config = load_alert_config(config.alert_config) if config.alert_config else None
        self.alert_engine = AlertEngine(
            alert_config,
            StoreAlertState(self.store),
            run_matrices=lambda run: len(self.engine.manifest(run) or []) or None,
        )
        self.engine.subscribe(self.alert_engine.observe)
        self.engine.audit.subscribe(self.alert_engine.observe)
        self.ingest = IngestService(
            self.engine,
            limits=IngestLimits(
                max_stream_bytes=config.max_stream_bytes,
                max_inflight_bytes=config.max_inflight_bytes,
                commit_window_s=config.commit_window_ms / 1000,
            ),
        )
        self.ingest.run_finished_listeners.append(self.alert_engine.finish_run)
        self.alerts = AlertService(
            self.alert_engine,
            webhook_url=config.alert_webhook,
            publish=self.ingest.publish_alert,
            alertmanager_urls=config.alertmanager_url,
            external_url=lambda: self.external_url,
        )
        self.registry, self.service_metrics = make_registry(
            self.engine,
            detail=config.metrics_detail,
            ingest_stats=self.ingest.stats,
            alerts_firing=self.alert_engine.firing_counts,
        )
        self.health = health.aio.HealthServicer()
        self.grpc_server: grpc.aio.Server | None = None
        self.runner: web.AppRunner | None = None
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self._serving = False
        self._lag_probe: asyncio.Task | None = None

    @property
    def external_url(self) -> str:
        """``--external-url``, else http(s)://<HTTP host>:<bound port> (a wildcard host becomes
        this machine's name): where Alertmanager's links to a run's page point."""
        c = self.config
        if c.external_url:
            return c.external_url.rstrip("/")
        host, port = _split(c.http_address)
        if host in ("", "0.0.0.0", "::"):
            host = socket.getfqdn()
        elif ":" in host:
            host = f"[{host}]"
        scheme = "https" if c.tls_cert else "http"
        return f"{scheme}://{host}:{self.http_port or port}"

    async def start(self) -> None:
        c = self.config
        auth.warn_if_exposed(c)
        interceptors = auth.grpc_interceptors(c, on_reject=self._count_rejected)
        server = grpc.aio.server(interceptors=interceptors, options=GRPC_OPTIONS)
        ingest.add_to_server(self.ingest, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (ingest.SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            server,
        )  # fmt: skip
        credentials = auth.grpc_server_credentials(c)
        if credentials is None:
            self.grpc_port = server.add_insecure_port(c.grpc_address)
        else:
            self.grpc_port = server.add_secure_port(c.grpc_address, credentials)
        if not self.grpc_port:
            raise OSError(f"could not bind the gRPC address {c.grpc_address}")

        app = make_app(
            self.engine,
            registry=self.registry,
            alerts=self.alert_engine,
            middlewares=auth.http_middlewares(c),
            ready=lambda: self._serving,
        )
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        host, port = _split(c.http_address)
        site = web.TCPSite(self.runner, host, port, ssl_context=auth.http_ssl_context(c))
        await site.start()
        self.http_port = int(self.runner.addresses[0][1])
        # Alerts start once the HTTP port (their links' address) is known, before any report.
        await self.alerts.start()
        await server.start()
        self.grpc_server = server

        for name in ("", ingest.SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._lag_probe = asyncio.create_task(probe_loop_lag(self.ingest.stats))
        self._serving = True
        log.info(
            "deltawatch serving gRPC on %s:%d, HTTP on %s:%d, data in %s",
            _split(c.grpc_address)[0],
            self.grpc_port,
            host,
            self.http_port,
            os.path.abspath(c.data_dir),
        )
        if c.ready_file:
            write_ready_file(c.ready_file, self.grpc_port, self.http_port)

    def _count_rejected(self, reason: str) -> None:
        """A call refused by auth.py's token check: deltawatch_ingest_errors_total{reason}."""
        with self.ingest.stats.lock:
            self.ingest.stats.errors[reason] += 1

    async def stop(self) -> None:
        self._serving = False
        if self._lag_probe is not None:
            self._lag_probe.cancel()
        await self.health.enter_graceful_shutdown()
        self.ingest.close()
        if self.grpc_server is not None:
            await self.grpc_server.stop(self.config.grace_seconds)
        await self.alerts.close()
        if self.runner is not None:
            await self.runner.cleanup()
        self.engine.audit.close()  # an audit still being computed is lost (docs/audit.md)
        self.store.close()
        log.info("deltawatch stopped")


LAG_PROBE_SECONDS = 0.1  # the probe's period: the longest a poll of the selector waits


async def probe_loop_lag(stats, period: float = LAG_PROBE_SECONDS) -> None:
    """The event loop's longest stall since start, `stats.loop_lag_max_seconds`
    (`deltawatch_event_loop_lag_max_seconds`), without waking the loop for it more than once
    per `period`.

    `time_selector` times what the loop does between two polls of its selector (the callbacks
    of one iteration, which ran without yielding: exactly), and how much later than its timeout
    a poll came back (the loop thread waiting for the GIL, e.g. while another thread's garbage
    collection holds it; this task's sleep keeps every timeout ≤ `period`, so such a wait is
    seen to within `period`). This task also keeps its own sleep's overshoot, which is all there
    is where the loop has no selector to time (not asyncio's selector loop): stalls shorter than
    `period` may then go unseen. Before, a 10 ms sleep's overshoot was the whole probe: its 100
    wake-ups a second cost an idle sidecar 29–33 ms of CPU per second on the 2-core box (3% of a
    core beside the trainer), against 3–5 ms at 10 wake-ups a second (docs/sidecar.md)."""
    loop = asyncio.get_running_loop()
    time_selector(loop, stats)
    while True:
        t0 = loop.time()
        await asyncio.sleep(period)
        _observe_lag(stats, loop.time() - t0 - period)


def time_selector(loop: asyncio.AbstractEventLoop, stats) -> None:
    """Wrap the loop's selector so each poll records the loop's work since the previous poll and
    how late the poll itself came back (`probe_loop_lag`); nothing where there is no selector."""
    selector = getattr(loop, "_selector", None)
    select = getattr(selector, "select", None)
    if select is None:
        return
    returned = time.perf_counter()

    def timed_select(timeout: float | None = None):
        nonlocal returned
        start = time.perf_counter()
        _observe_lag(stats, start - returned)  # the callbacks run since the last poll
        try:
            return select(timeout)
        finally:
            returned = time.perf_counter()
            if timeout is not None:
                _observe_lag(stats, returned - start - timeout)

    selector.select = timed_select


def _observe_lag(stats, lag: float) -> None:
    if lag > stats.loop_lag_max_seconds:
        stats.loop_lag_max_seconds = lag


def write_ready_file(path: str, grpc_port: int, http_port: int) -> None:
    """Atomically write {"grpc_port": .., "http_port": ..} (a reader never sees half a file)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ready-")
    with os.fdopen(fd, "w") as f:
        json.dump({"grpc_port": grpc_port, "http_port": http_port, "pid": os.getpid()}, f)
    os.replace(tmp, path)


async def serve(config: ServeConfig) -> None:
    """Run the sidecar until SIGTERM or SIGINT, then shut down gracefully."""
    sidecar = Sidecar(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await sidecar.start()
    try:
        await stop.wait()
        log.info("deltawatch: signal received, shutting down")
    finally:
        await sidecar.stop()

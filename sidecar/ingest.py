"""The grpc.aio servicer of `Ingest.Stream`: validation, persist-then-ack, fan-out of alerts.

Each stream has one reader task (frames -> `wire.Assembler` -> complete messages -> engine) and
one writer (the servicer's async generator draining an asyncio.Queue of ServerMessages). Engine
calls run on a single worker thread, so the event loop never runs linear algebra or SQLite writes.

What is refused and how:
* stream-level faults end the stream with a status: a report or baseline before the hello
  (FAILED_PRECONDITION), malformed chunking, bad run or matrix names, a malformed manifest
  (INVALID_ARGUMENT), a frame over the receive limit (gRPC's own RESOURCE_EXHAUSTED);
* a complete report or baseline the sidecar cannot take (unknown matrix, shape or dtype not
  matching the manifest, non-finite values, another run or incarnation than the hello's) is
  answered with an `Error` frame naming it; nothing changes and the stream goes on.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from deltawatch.client import wire
from deltawatch.client.config import RUN_NAME
from deltawatch.client.records import ManifestEntry
from deltawatch.sidecar.errors import ValidationError
from deltawatch.sidecar.progress import CheckProgress
from deltawatch.v1 import deltawatch_pb2 as pb
from deltawatch.v1 import deltawatch_pb2_grpc as pb_grpc
from google.protobuf.message import DecodeError

log = logging.getLogger("deltawatch.sidecar.ingest")

MATRIX_NAME = re.compile(r"[A-Za-z0-9_.:/\-\[\]]{1,512}")
MAX_MANIFEST = 1_000_000  # matrices in one hello
MAX_COLUMNS = 4096  # r = K + p columns of a sketch, at most
_SHARD_LAYOUTS = ("replicated", "rows", "cols", "rows+cols")


class StreamAbort(Exception):
    """Ends the stream with a gRPC status (`code` is a grpc.StatusCode name)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class IngestStats:
    """Counters the metrics collector reads (deltawatch_ingest_*)."""

    messages: collections.Counter = field(default_factory=collections.Counter)  # by kind
    bytes_total: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)  # by reason
    dropped: collections.Counter = field(default_factory=collections.Counter)  # by run
    last_lag_seconds: float = 0.0  # receipt of a report's last frame -> its ack
    streams_open: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass
class _StreamState:
    run: str | None = None
    incarnation: int = 0
    manifest: dict[str, dict] = field(default_factory=dict)
    r_max: int = MAX_COLUMNS
    rank_k: int = 16
    said_goodbye: bool = False


def _abort(code: str, message: str) -> StreamAbort:
    return StreamAbort(code, message)


class IngestService(pb_grpc.IngestServicer):
    """`Ingest.Stream` over an `Engine` (sidecar/engine.py, the seam of docs/architecture.md)."""

    def __init__(self, engine: Any, *, executor: concurrent.futures.Executor | None = None):
        self.engine = engine
        self.stats = IngestStats()
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="deltawatch-engine"
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: dict[str, set[asyncio.Queue]] = {}  # run -> its streams' queues
        self._streams: set[asyncio.Queue] = set()  # every open stream's queue
        self._closing = False
        self._created_runs: set[str] = set()  # runs this process created (new, or store lost)
        self._hellos_seen: set[tuple[str, int, int]] = set()  # (run, incarnation, rank)
        self._progress = CheckProgress()  # when a run's check of a step is complete
        # Called with the run name when the last open stream of a run ended with a Goodbye (the
        # trainer closed its Monitors): the alert engine stops watching it for RunStalled.
        self.run_finished_listeners: list[Callable[[str], object]] = []

    # -- alerts: any thread -> every stream of the run ---------------------------------------

    def publish_alert(self, run: str, alert: dict) -> None:
        """Send an /api/v1/alerts item to every connected stream of `run` (thread-safe)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            frame = wire.encode_alert(alert)
        except Exception:
            log.exception("alert %r could not be encoded", alert)
            return
        loop.call_soon_threadsafe(self._fan_out, run, frame)

    def alert_sink(self, item: dict, matrices: list[str]) -> None:
        """`AlertEngine.add_sink` adapter."""
        self.publish_alert(item.get("run", ""), item)

    def _fan_out(self, run: str, frame: pb.ServerMessage) -> None:
        for queue in list(self._subscribers.get(run, ())):
            queue.put_nowait(frame)

    def _run_finished(self, run: str) -> None:
        for listener in self.run_finished_listeners:
            try:
                listener(run)
            except Exception:
                log.exception("run-finished listener failed for run %r", run)

    def close(self) -> None:
        """End every open stream (shutdown)."""
        self._closing = True
        for q in list(self._streams):
            q.put_nowait(None)

    # -- the stream --------------------------------------------------------------------------

    async def Stream(
        self, request_iterator: AsyncIterator[pb.ClientMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerMessage]:
        self._loop = asyncio.get_running_loop()
        if self._closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the sidecar is shutting down")
        out: asyncio.Queue = asyncio.Queue()
        self._streams.add(out)
        state = _StreamState()
        reader = asyncio.create_task(self._read(request_iterator, state, out))
        with self.stats.lock:
            self.stats.streams_open += 1
        try:
            while True:
                item = await out.get()
                if item is None:
                    return
                if isinstance(item, StreamAbort):
                    await context.abort(getattr(grpc.StatusCode, item.code), item.message)
                yield item
        finally:
            reader.cancel()
            self._streams.discard(out)
            if state.run is not None:
                self._subscribers.get(state.run, set()).discard(out)
                if state.said_goodbye and not self._subscribers.get(state.run):
                    self._run_finished(state.run)
            with self.stats.lock:
                self.stats.streams_open -= 1

    async def _read(self, frames, state: _StreamState, out: asyncio.Queue) -> None:
        assembler = wire.Assembler(on_declare=lambda kind, body: self._declared(state, body))
        try:
            async for frame in frames:
                nbytes = frame.ByteSize()
                with self.stats.lock:
                    self.stats.bytes_total += nbytes
                    self.stats.messages[frame.WhichOneof("body") or "empty"] += 1
                msg = assembler.feed(frame)
                if msg is None:
                    continue
                if msg.kind == "goodbye":
                    state.said_goodbye = True
                    break
                if msg.kind == "hello":
                    await self._hello(msg, state, out)
                    continue
                if state.run is None:
                    raise _abort(
                        "FAILED_PRECONDITION",
                        f"{msg.kind} {msg.id} arrived before the hello; expected a hello first",
                    )
                received = time.monotonic()
                try:
                    if msg.kind == "baseline":
                        await self._baseline(msg, state)
                    else:
                        await self._report(msg, state)
                except (ValidationError, wire.WireError) as exc:
                    self._count_error(exc.code.lower())
                    out.put_nowait(
                        pb.ServerMessage(
                            error=pb.Error(id=msg.id, code=exc.code, message=exc.message)
                        )
                    )
                    continue
                except Exception as exc:
                    # A report the engine cannot digest is refused alone: ending the stream would
                    # make the client resend it forever, blocking everything behind it.
                    log.exception("ingest of %s %d failed", msg.kind, msg.id)
                    self._count_error("internal")
                    text = f"{msg.kind} {msg.id}: the sidecar failed on it ({exc!r})"
                    out.put_nowait(
                        pb.ServerMessage(error=pb.Error(id=msg.id, code="INTERNAL", message=text))
                    )
                    continue
                with self.stats.lock:
                    self.stats.last_lag_seconds = time.monotonic() - received
                out.put_nowait(pb.ServerMessage(ack=pb.Ack(ids=[msg.id])))
            out.put_nowait(None)
        except wire.WireError as exc:
            self._count_error("malformed")
            out.put_nowait(StreamAbort(exc.code, exc.message))
        except DecodeError as exc:
            self._count_error("malformed")
            out.put_nowait(
                StreamAbort(
                    "INVALID_ARGUMENT",
                    f"frame: not a deltawatch.v1.ClientMessage ({exc}); expected protobuf frames",
                )
            )
        except StreamAbort as exc:
            self._count_error(exc.code.lower())
            out.put_nowait(exc)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError:
            out.put_nowait(None)
        except Exception as exc:  # the process never dies of input
            log.exception("ingest stream failed")
            self._count_error("internal")
            out.put_nowait(StreamAbort("INTERNAL", f"the sidecar failed on this stream: {exc!r}"))

    def _count_error(self, reason: str) -> None:
        with self.stats.lock:
            self.stats.errors[reason] += 1

    async def _call(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- messages ----------------------------------------------------------------------------

    async def _hello(self, msg: wire.Assembled, state: _StreamState, out: asyncio.Queue) -> None:
        hello: pb.Hello = msg.body
        if state.run is not None:
            raise _abort(
                "FAILED_PRECONDITION",
                f"hello.run: a second hello ({hello.run!r}) on a stream of run {state.run!r}; "
                f"expected one hello per stream",
            )
        manifest, config = validate_hello(hello)

        entries = [ManifestEntry(**e) for e in manifest]
        resume = int(hello.resume_step) if hello.HasField("resume_step") else None
        try:
            result = await self._call(
                self.engine.hello, hello.run, int(hello.incarnation), resume, entries, config
            )
        except ValidationError as exc:
            raise _abort(exc.code, exc.message) from None
        state.run = hello.run
        state.incarnation = int(hello.incarnation)
        state.manifest = {e["matrix"]: e for e in manifest}
        k = int(config.get("rank", 16))
        state.rank_k = k
        state.r_max = min(MAX_COLUMNS, k + int(config.get("oversample", 16)))
        self._subscribers.setdefault(hello.run, set()).add(out)
        for matrix, (lock_step, v_ref) in sorted(getattr(result, "lock_references", {}).items()):
            out.put_nowait(wire.encode_lock_reference(hello.run, matrix, lock_step, v_ref))
        # Baselines are asked for again from every rank's first hello to this process once the
        # run was (re)created here: a new run (nothing to resend yet) or a lost store.
        if getattr(result, "created", False):
            self._created_runs.add(hello.run)
        key = (hello.run, int(hello.incarnation), int(hello.rank))
        resend = hello.run in self._created_runs and key not in self._hellos_seen
        self._hellos_seen.add(key)
        out.put_nowait(pb.ServerMessage(ack=pb.Ack(ids=[msg.id], resend_baselines=resend)))

    def _declared(self, state: _StreamState, body) -> None:
        """Check a report's declared tensor shapes against the manifest before any chunk is
        buffered (a hostile declaration must not make the sidecar hold a gigabyte)."""
        if state.run is None:
            kind = "baseline" if isinstance(body, pb.Baseline) else "report"
            raise _abort(
                "FAILED_PRECONDITION", f"{kind} arrived before the hello; expected a hello first"
            )
        entry = state.manifest.get(body.matrix)
        # An unknown matrix is refused once complete; until then bound it by the largest one.
        n = entry["shape"][1] if entry else max(e["shape"][1] for e in state.manifest.values())
        for fname, t in wire.declared_tensors(body):
            shape = list(t.shape)
            rows_ok = shape[0] == n if entry else shape[0] <= n
            if len(shape) != 2 or shape[1] > state.r_max:
                ok = False
            elif fname.endswith(".C"):
                ok = shape[0] == shape[1]
            else:
                ok = rows_ok
            if not ok:
                expected = (
                    f"[c, c] with c <= {state.r_max}"
                    if fname.endswith(".C")
                    else (f"[{n}, <= {state.r_max}]")
                )
                raise wire.WireError(
                    "INVALID_ARGUMENT",
                    f"matrix {body.matrix[:200]}: {fname} declared with shape {shape}, expected "
                    f"{expected} (manifest and the hello's rank + oversample)",
                )

    def _check_identity(self, what: str, body, state: _StreamState) -> dict:
        if body.run != state.run:
            raise ValidationError(
                "FAILED_PRECONDITION",
                f"{what}.run: {body.run!r}, expected {state.run!r} (the run of this stream's hello)",
            )
        if int(body.incarnation) != state.incarnation:
            raise ValidationError(
                "FAILED_PRECONDITION",
                f"{what}.incarnation: {body.incarnation}, expected {state.incarnation} (the "
                f"hello's); a restarted trainer opens a new stream with a new hello",
            )
        entry = state.manifest.get(body.matrix)
        if entry is None:
            raise ValidationError(
                "INVALID_ARGUMENT",
                f"{what}.matrix: {body.matrix[:200]!r} is not in the manifest of run "
                f"{state.run!r} ({len(state.manifest)} matrices)",
            )
        return entry

    def _check_sketch(self, matrix: str, prefix: str, sketch, n: int) -> None:
        G, C = sketch.G, sketch.C
        c = G.shape[1] if G.dim() == 2 else -1
        if G.dim() != 2 or G.shape[0] != n:
            raise ValidationError(
                "INVALID_ARGUMENT",
                f"matrix {matrix}: {prefix}.G has shape {list(G.shape)}, manifest says [{n}, r]",
            )
        if C.dim() != 2 or list(C.shape) != [c, c]:
            raise ValidationError(
                "INVALID_ARGUMENT",
                f"matrix {matrix}: {prefix}.C has shape {list(C.shape)}, expected [{c}, {c}]",
            )

    async def _baseline(self, msg: wire.Assembled, state: _StreamState) -> None:
        body: pb.Baseline = msg.body
        entry = self._check_identity("baseline", body, state)
        if not body.HasField("weight"):
            raise ValidationError(
                "INVALID_ARGUMENT", "baseline.weight: missing, expected W0's sketch"
            )
        sketch = wire.sketch_from(msg, "weight", body.weight)
        self._check_sketch(body.matrix, "weight", sketch, entry["shape"][1])
        await self._call(self.engine.baseline, state.run, state.incarnation, body.matrix, sketch)

    async def _report(self, msg: wire.Assembled, state: _StreamState) -> None:
        body: pb.MatrixReport = msg.body
        entry = self._check_identity("report", body, state)
        if tuple(body.shape) != tuple(entry["shape"]):
            raise ValidationError(
                "INVALID_ARGUMENT",
                f"matrix {body.matrix}: report.shape {list(body.shape)}, manifest says "
                f"{list(entry['shape'])}",
            )
        if int(body.numel) != entry["numel"]:
            raise ValidationError(
                "INVALID_ARGUMENT",
                f"matrix {body.matrix}: report.numel {body.numel}, manifest says {entry['numel']}",
            )
        if body.step < 0:
            raise ValidationError(
                "INVALID_ARGUMENT", f"matrix {body.matrix}: report.step {body.step}, expected >= 0"
            )
        for name in ("visible_count", "visible_low_count", "visible_principal_count"):
            if getattr(body, name) > entry["numel"]:
                raise ValidationError(
                    "INVALID_ARGUMENT",
                    f"matrix {body.matrix}: report.{name} {getattr(body, name)}, expected at "
                    f"most numel {entry['numel']}",
                )
        check = wire.check_from(msg)
        n = entry["shape"][1]
        if check.update is not None:
            self._check_sketch(body.matrix, "update", check.update, n)
        self._check_sketch(body.matrix, "weight", check.weight, n)
        if check.v_ref is not None and (check.v_ref.dim() != 2 or check.v_ref.shape[0] != n):
            raise ValidationError(
                "INVALID_ARGUMENT",
                f"matrix {body.matrix}: v_ref has shape {list(check.v_ref.shape)}, expected "
                f"[{n}, {state.rank_k}]",
            )
        fresh, aggregate = await self._call(self._ingest, state, check)
        if aggregate is not None:
            self._fan_out(state.run, aggregate)
        if fresh and body.dropped_reports:
            with self.stats.lock:
                self.stats.dropped[state.run] += int(body.dropped_reports)
            await self._call(self.engine.record_dropped, state.run, int(body.dropped_reports))

    def _ingest(self, state: _StreamState, check) -> tuple[bool, pb.ServerMessage | None]:
        """On the engine thread: store the check; when it completed the run's check of its step,
        also the run's aggregate as a frame (read before any other report can be stored). A
        failure after the store is logged and sends no aggregate: the check stays acknowledged."""
        fresh = self.engine.ingest(state.run, state.incarnation, check)
        if not fresh:
            return False, None
        try:
            matrices = len(self.engine.manifest(state.run) or ())
            run, step = state.run, check.step
            if not self._progress.stored(run, state.incarnation, matrices, check.matrix, step):
                return True, None
            return True, wire.encode_aggregate(run, step, self.engine.aggregate(run))
        except Exception:
            log.exception("the aggregate of run %s step %d was not sent", state.run, check.step)
            return True, None


def validate_hello(hello: pb.Hello) -> tuple[list[dict], dict]:
    """The hello's manifest (plain dicts) and config, or StreamAbort naming what is wrong."""
    if not RUN_NAME.fullmatch(hello.run):
        raise _abort(
            "INVALID_ARGUMENT",
            f"hello.run: {hello.run[:200]!r}, expected a name matching [A-Za-z0-9._-]{{1,128}}",
        )
    if hello.incarnation <= 0:
        raise _abort("INVALID_ARGUMENT", f"hello.incarnation: {hello.incarnation}, expected > 0")
    if hello.HasField("resume_step") and hello.resume_step < 0:
        raise _abort("INVALID_ARGUMENT", f"hello.resume_step: {hello.resume_step}, expected >= 0")
    if not 0 < len(hello.manifest) <= MAX_MANIFEST:
        raise _abort(
            "INVALID_ARGUMENT",
            f"hello.manifest: {len(hello.manifest)} matrices, expected 1 to {MAX_MANIFEST}",
        )
    try:
        config = json.loads(hello.config_json) if hello.config_json else {}
    except ValueError as exc:
        raise _abort("INVALID_ARGUMENT", f"hello.config_json: not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise _abort("INVALID_ARGUMENT", "hello.config_json: expected a JSON object")
    for key in ("rank", "oversample"):
        value = config.get(key, 16)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_COLUMNS:
            raise _abort(
                "INVALID_ARGUMENT",
                f"hello.config_json.{key}: {value!r}, expected an int in 1..4096",
            )
    manifest = wire.manifest_from(hello)
    seen = set()
    for i, e in enumerate(manifest):
        where = f"hello.manifest[{i}]"
        if not MATRIX_NAME.fullmatch(e["matrix"]):
            raise _abort(
                "INVALID_ARGUMENT",
                f"{where}.matrix: {e['matrix'][:200]!r}, expected 1-512 characters of "
                f"[A-Za-z0-9_.:/-[]]",
            )
        if e["matrix"] in seen:
            raise _abort("INVALID_ARGUMENT", f"{where}.matrix: {e['matrix']!r} appears twice")
        seen.add(e["matrix"])
        shape = e["shape"]
        if len(shape) != 2 or any(s <= 0 for s in shape):
            raise _abort(
                "INVALID_ARGUMENT", f"{where}.shape: {list(shape)}, expected [m, n] with m, n > 0"
            )
        if e["numel"] != math.prod(shape):
            raise _abort(
                "INVALID_ARGUMENT",
                f"{where}.numel: {e['numel']}, expected {math.prod(shape)} for shape {list(shape)}",
            )
        if e["shard_layout"] not in _SHARD_LAYOUTS:
            raise _abort(
                "INVALID_ARGUMENT",
                f"{where}.shard_layout: {e['shard_layout']!r}, expected one of {_SHARD_LAYOUTS}",
            )
        if not e["module"] or len(e["module"]) > 512:
            raise _abort("INVALID_ARGUMENT", f"{where}.module: expected 1-512 characters")
        if not re.fullmatch(r"[a-z0-9_]{1,32}", e["dtype"]):
            raise _abort(
                "INVALID_ARGUMENT", f"{where}.dtype: {e['dtype'][:40]!r}, expected e.g. 'bfloat16'"
            )
        if e["layer"] is not None and e["layer"] < 0:
            raise _abort("INVALID_ARGUMENT", f"{where}.layer: {e['layer']}, expected >= 0")
    return manifest, config

"""The grpc.aio servicer of `Ingest.Stream`: the stream's own questions, group commit, acks.

Each stream has one reader task (frames -> `wire.Assembler` -> complete messages) and one writer
(the servicer's async generator draining an asyncio.Queue of ServerMessages). Complete reports
and baselines of every stream go to one commit queue; one task takes what is queued (waiting at
most `commit_window_s` for more) and hands the batch to the engine's worker thread, which decodes
them (`wire.check_from`: ranges, finiteness) and stores them with one COMMIT
(`Engine.ingest_many`, and `Engine.baseline_many` for baselines); the acks follow the commit, in
order. The event loop runs no linear
algebra, no SQLite, no manifest check.

Who asks what (each question once): `client/wire.py` the framing, every field's range and
finiteness; this module whether a message belongs to its stream (after the hello, its run and
incarnation, a matrix of the manifest, declared tensor shapes that fit the manifest and r, the
in-flight byte budgets; for an AuditBlock, a float32 block inside the manifest's shape); the
engine what it means against the run's state (an AuditBlock: its auditor, sidecar/audit.py,
whether it fits the blocks already held).

What is refused and how:
* stream-level faults end the stream with a status: a report or baseline before the hello or a
  second hello (FAILED_PRECONDITION), a bad hello (INVALID_ARGUMENT, or the engine's status), a
  frame that belongs to no message or is not a ClientMessage (INVALID_ARGUMENT), a frame over the
  receive limit (gRPC's own RESOURCE_EXHAUSTED);
* one message's faults (a declaration that does not fit the manifest, lying chunks, an unknown
  matrix, another run or incarnation than the hello's, non-finite values, a message over a byte
  budget, a store that cannot write now) are answered with an `Error` frame naming it; its
  remaining chunks are skipped unread, nothing changes and the stream goes on. RESOURCE_EXHAUSTED
  and UNAVAILABLE are retryable: the client keeps the message and sends it again.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import gc
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from deltawatch.client import wire
from deltawatch.client.records import ManifestEntry
from deltawatch.v1 import deltawatch_pb2 as pb
from deltawatch.v1 import deltawatch_pb2_grpc as pb_grpc
from google.protobuf.message import DecodeError

from .audit import AuditError, check_block
from .errors import RESOURCE_EXHAUSTED, ValidationError
from .progress import CheckProgress

log = logging.getLogger("deltawatch.sidecar.ingest")

MAX_BATCH = 512  # reports in one group commit
SERVICE = pb.DESCRIPTOR.services_by_name["Ingest"].full_name  # deltawatch.v1.Ingest


@dataclass(frozen=True)
class IngestLimits:
    """The stream's budgets (`deltawatch serve --max-stream-bytes / --max-inflight-bytes /
    --commit-window-ms`). A stream stops reading while its received-but-unacknowledged messages
    hold `max_stream_bytes`; one message larger than that, or one that would take every stream's
    total over `max_inflight_bytes`, is refused RESOURCE_EXHAUSTED."""

    max_stream_bytes: int = 256 << 20
    max_inflight_bytes: int = 1 << 30
    commit_window_s: float = 0.002


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
    inflight_bytes: int = 0  # every stream's received, unanswered message bytes (the loop's)
    loop_lag_max_seconds: float = 0.0  # the event loop's largest delay seen (server.py's probe)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass
class _StreamState:
    run: str | None = None
    incarnation: int = 0
    manifest: dict[str, ManifestEntry] = field(default_factory=dict)
    r_max: int = wire.MAX_COLUMNS
    channel_rank: int = 16
    said_goodbye: bool = False
    reserving: int = 0  # declared bytes of the message being assembled
    inflight: int = 0  # bytes of this stream's messages not yet answered (incl. `reserving`)
    outstanding: set = field(default_factory=set)  # futures of the queued messages
    room: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Job:
    """A complete report or baseline waiting for the group commit."""

    msg: wire.Assembled
    state: _StreamState
    out: asyncio.Queue
    nbytes: int
    received: float
    done: asyncio.Future


GC_PAUSE_MATRICES = 10_000  # a hello with this many matrices builds its run with `gc_paused`
_gc_lock = threading.Lock()
_gc_pauses = 0  # calls of `gc_paused` running now (any thread)


def gc_paused(fn: Callable, *args: Any) -> Any:
    """fn(*args) with CPython's cyclic garbage collector off, then every object alive moved to
    its permanent generation (`gc.freeze`). A 100,000-matrix hello builds ~10⁶ objects; the
    collections that growth triggers each hold the GIL for the whole heap walk, which stalled
    the event loop (another thread) for 0.3–1 s and made the hello ~3× slower. Frozen, the
    run's long-lived state is not walked by later collections either (refcounting still frees
    it; only a reference cycle unreachable by then would stay, which is why only hellos of
    `GC_PAUSE_MATRICES` or more use it). The collector is process-wide: the last of concurrent
    calls turns it back on."""
    global _gc_pauses
    with _gc_lock:
        _gc_pauses += 1
        gc.disable()
    try:
        return fn(*args)
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0:
                gc.freeze()
                gc.enable()


def _unpaused(fn: Callable, *args: Any) -> Any:
    return fn(*args)


OFF_LOOP_FRAME_BYTES = 256 << 10  # a frame this large is decoded in a thread


async def _decode(data: bytes) -> pb.ClientMessage:
    """One received frame (the stream's raw bytes, `add_to_server`) as a ClientMessage. A big
    one is decoded in a thread: protobuf's decoding of a 100,000-matrix hello (4 MB) is one C
    call of 20-40 ms, which on the loop added to everything else the loop had to wait for."""
    if len(data) < OFF_LOOP_FRAME_BYTES:
        return pb.ClientMessage.FromString(data)
    return await asyncio.to_thread(pb.ClientMessage.FromString, data)


def add_to_server(service: IngestService, server: grpc.aio.Server) -> None:
    """Register `Ingest.Stream` with the frames handed over as bytes (no request
    deserializer): the stream decodes them itself (`_decode`), so a big frame is decoded off
    the event loop and its size is its length, not a second walk of the message."""
    handler = grpc.stream_stream_rpc_method_handler(
        service.Stream,
        request_deserializer=None,
        response_serializer=pb.ServerMessage.SerializeToString,
    )
    handlers = {"Stream": handler}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _abort(code: str, message: str) -> StreamAbort:
    return StreamAbort(code, message)


def _error(msg_id: int, code: str, message: str) -> pb.ServerMessage:
    return pb.ServerMessage(error=pb.Error(id=msg_id, code=code, message=message))


class IngestService(pb_grpc.IngestServicer):
    """`Ingest.Stream` over an `Engine` (sidecar/engine.py, the seam of docs/architecture.md)."""

    def __init__(
        self,
        engine: Any,
        *,
        executor: concurrent.futures.Executor | None = None,
        limits: IngestLimits | None = None,
    ):
        self.engine = engine
        self.limits = limits or IngestLimits()
        self.stats = IngestStats()
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="deltawatch-engine"
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: dict[str, set[asyncio.Queue]] = {}  # run -> its streams' queues
        self._said_goodbye: set[str] = set()  # runs a stream said goodbye for since their hello
        self._streams: set[asyncio.Queue] = set()  # every open stream's queue
        self._closing = False
        self._created_runs: set[str] = set()  # runs this process created (new, or store lost)
        self._hellos_seen: set[tuple[str, int, int]] = set()  # (run, incarnation, rank)
        self._jobs: asyncio.Queue | None = None  # the group commit's queue of _Job
        self._committer: asyncio.Task | None = None
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
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerMessage]:
        self._loop = asyncio.get_running_loop()
        if self._closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the sidecar is shutting down")
        if self._committer is None:
            self._jobs = asyncio.Queue()
            self._committer = asyncio.create_task(self._commit_loop())
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
            reserved, state.reserving = state.reserving, 0
            self._release(state, reserved)
            self._streams.discard(out)
            if state.run is not None:
                self._subscribers.get(state.run, set()).discard(out)
                if state.said_goodbye:
                    self._said_goodbye.add(state.run)
                # the run's last stream ended and one of them said goodbye (an older stream of
                # a reconnected trainer may end after the one that said it)
                if state.run in self._said_goodbye and not self._subscribers.get(state.run):
                    self._said_goodbye.discard(state.run)
                    self._run_finished(state.run)
            with self.stats.lock:
                self.stats.streams_open -= 1

    async def _read(self, frames, state: _StreamState, out: asyncio.Queue) -> None:
        assembler = wire.Assembler(
            on_declare=lambda kind, body, nbytes: self._declared(state, kind, body, nbytes)
        )
        try:
            async for data in frames:
                frame = await _decode(data)
                kind = frame.WhichOneof("body")
                big = kind == "hello" and not assembler.incomplete
                nbytes = len(data)
                with self.stats.lock:
                    self.stats.bytes_total += nbytes
                    self.stats.messages[kind or "empty"] += 1
                while not assembler.incomplete and state.inflight >= self.limits.max_stream_bytes:
                    state.room.clear()
                    await state.room.wait()  # backpressure: gRPC flow control holds the client
                if big:
                    msg = wire.Assembled(frame.id, kind, frame.hello, {}, nbytes)
                else:
                    msg = self._feed(assembler, frame, state, out)
                if msg is None:
                    continue
                if msg.kind == "goodbye":
                    state.said_goodbye = True
                    break
                if msg.kind == "hello":
                    await self._hello(msg, state, out)
                    continue
                self._enqueue(msg, state, out)
            if state.outstanding:
                await asyncio.wait(state.outstanding)
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

    def _feed(
        self, assembler: wire.Assembler, frame: pb.ClientMessage, state: _StreamState, out
    ) -> wire.Assembled | None:
        """One frame into the assembler; a message refused alone is answered with an Error frame
        here (its bytes released) and the stream goes on."""
        try:
            return assembler.feed(frame)
        except wire.WireError as exc:
            if exc.refused_id is None:
                raise
            reserved, state.reserving = state.reserving, 0
            self._release(state, reserved)
            self._count_error(exc.code.lower())
            out.put_nowait(_error(exc.refused_id, exc.code, exc.message))
            if exc.refeed:
                return self._feed(assembler, frame, state, out)
            return None

    def _count_error(self, reason: str) -> None:
        with self.stats.lock:
            self.stats.errors[reason] += 1

    async def _call(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- the byte budgets --------------------------------------------------------------------

    def _release(self, state: _StreamState, nbytes: int) -> None:
        state.inflight -= nbytes
        self.stats.inflight_bytes -= nbytes
        state.room.set()

    def _declared(self, state: _StreamState, kind: str, body, nbytes: int) -> None:
        """Whether a declared report or baseline belongs to this stream (after the hello, its
        run, incarnation and a manifest matrix, tensor shapes that fit the manifest and r) and
        fits the byte budgets; checked before any chunk is buffered."""
        if state.run is None:
            raise _abort(
                "FAILED_PRECONDITION", f"{kind} arrived before the hello; expected a hello first"
            )
        if body.run != state.run:
            raise wire.WireError(
                "FAILED_PRECONDITION",
                f"{kind}.run: {body.run[:200]!r}, expected {state.run!r} (the run of this "
                f"stream's hello)",
            )
        if int(body.incarnation) != state.incarnation:
            raise wire.WireError(
                "FAILED_PRECONDITION",
                f"{kind}.incarnation: {body.incarnation}, expected {state.incarnation} (the "
                f"hello's); a restarted trainer opens a new stream with a new hello",
            )
        entry = state.manifest.get(body.matrix)
        if entry is None:
            raise wire.invalid(
                f"{kind}.matrix: {body.matrix[:200]!r} is not in the manifest of run "
                f"{state.run!r} ({len(state.manifest)} matrices)"
            )
        if kind == "audit":
            self._audit_fits(entry, body)
        n = entry.shape[1]
        for fname, t in wire.declared_tensors(body) if kind != "audit" else ():
            shape = list(t.shape)
            if len(shape) != 2:
                ok, expected = False, "2 dimensions"
            elif fname.endswith(".C"):
                ok, expected = (
                    shape[0] == shape[1] <= state.r_max,
                    f"[c, c] with c <= {state.r_max}",
                )
            elif fname == "v_ref":
                ok, expected = shape == [n, state.channel_rank], f"[{n}, {state.channel_rank}]"
            else:
                ok, expected = shape[0] == n and shape[1] <= state.r_max, f"[{n}, <= {state.r_max}]"
            if not ok:
                raise wire.invalid(
                    f"matrix {body.matrix[:200]}: {fname} declared with shape {shape}, expected "
                    f"{expected} (manifest and the hello's channel_rank + oversample)"
                )
        limits = self.limits
        if nbytes > limits.max_stream_bytes:
            raise wire.WireError(
                RESOURCE_EXHAUSTED,
                f"{kind} of matrix {body.matrix}: {nbytes} bytes of tensors, over the per-stream "
                f"budget of {limits.max_stream_bytes} (--max-stream-bytes)",
            )
        if self.stats.inflight_bytes + nbytes > limits.max_inflight_bytes:
            raise wire.WireError(
                RESOURCE_EXHAUSTED,
                f"{kind} of matrix {body.matrix}: {nbytes} bytes would take the sidecar's "
                f"in-flight reports over {limits.max_inflight_bytes} bytes "
                f"(--max-inflight-bytes); retry later",
            )
        state.reserving = nbytes
        state.inflight += nbytes
        self.stats.inflight_bytes += nbytes

    @staticmethod
    def _audit_fits(entry: ManifestEntry, body: pb.AuditBlock) -> None:
        """An AuditBlock's delta is declared 2-D and lies inside the manifest's [m, n]."""
        shape = list(body.delta.shape)
        if not body.HasField("delta") or len(shape) != 2:
            raise wire.invalid(
                f"audit of {body.matrix[:200]}: delta declared with shape {shape[:8]}, expected "
                f"[h, w] inside the manifest's {list(entry.shape)}"
            )
        try:
            check_block(body.matrix, entry.shape, body.row_offset, body.col_offset, *shape)
        except AuditError as exc:
            raise wire.invalid(str(exc)) from None

    # -- messages ----------------------------------------------------------------------------

    async def _hello(self, msg: wire.Assembled, state: _StreamState, out: asyncio.Queue) -> None:
        hello: pb.Hello = msg.body
        if state.run is not None:
            raise _abort(
                "FAILED_PRECONDITION",
                f"hello.run: a second hello ({hello.run[:200]!r}) on a stream of run "
                f"{state.run!r}; expected one hello per stream",
            )
        off_loop = gc_paused if len(hello.manifest) >= GC_PAUSE_MATRICES else _unpaused
        try:
            h = await asyncio.to_thread(off_loop, wire.hello_from, hello)
            result = await self._call(
                off_loop,
                self.engine.hello,
                h.run,
                h.incarnation,
                h.resume_step,
                h.manifest,
                h.config,
                h.channel_rank,
            )
        except (ValidationError, wire.WireError) as exc:
            raise _abort(exc.code, exc.message) from None
        state.run = h.run
        state.incarnation = h.incarnation
        state.manifest = await asyncio.to_thread(
            off_loop, lambda: {e.matrix: e for e in h.manifest}
        )
        state.channel_rank = result.channel_rank
        oversample = wire.config_value(h.config, "oversample", h.oversample)
        state.r_max = min(wire.MAX_COLUMNS, state.channel_rank + oversample)
        self._subscribers.setdefault(h.run, set()).add(out)
        self._said_goodbye.discard(h.run)  # a new stream of the run: it goes on
        for matrix, (lock_step, v_ref) in sorted(result.lock_references.items()):
            out.put_nowait(wire.encode_lock_reference(h.run, matrix, lock_step, v_ref))
        # Baselines are asked for again from every rank's first hello to this process once the
        # run was (re)created here: a new run (nothing to resend yet) or a lost store.
        if result.created:
            self._created_runs.add(h.run)
        key = (h.run, h.incarnation, h.rank)
        resend = h.run in self._created_runs and key not in self._hellos_seen
        self._hellos_seen.add(key)
        out.put_nowait(pb.ServerMessage(ack=pb.Ack(ids=[msg.id], resend_baselines=resend)))

    def _enqueue(self, msg: wire.Assembled, state: _StreamState, out: asyncio.Queue) -> None:
        """A complete report or baseline to the group commit; answered when it is done."""
        nbytes, state.reserving = state.reserving, 0
        done = asyncio.get_running_loop().create_future()
        state.outstanding.add(done)
        self._jobs.put_nowait(_Job(msg, state, out, nbytes, time.monotonic(), done))

    async def _commit_loop(self) -> None:
        """Take what is queued (waiting up to the commit window for more), store it as one
        batch on the engine's thread, answer each message in order."""
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._jobs.get()]
            deadline = loop.time() + self.limits.commit_window_s
            while len(batch) < MAX_BATCH:
                if self._jobs.empty():
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._jobs.get(), left))
                    except TimeoutError:
                        break
                else:
                    batch.append(self._jobs.get_nowait())
            try:
                results, aggregates = await self._call(self._store_batch, batch)
            except Exception as exc:
                log.exception("a batch of %d messages failed", len(batch))
                results, aggregates = [exc] * len(batch), []
            for job, result in zip(batch, results, strict=True):
                try:
                    self._answer(job, result)
                except Exception:  # the commit loop never dies: every later report needs it
                    log.exception("answering %s %d failed", job.msg.kind, job.msg.id)
            for run, frame in aggregates:
                self._fan_out(run, frame)

    def _store_batch(self, batch: list[_Job]) -> tuple[list[Any], list[tuple[str, Any]]]:
        """On the engine's thread: decode each message (`wire`), store each run of consecutive
        reports in one group commit (`Engine.ingest_many`) and each run of consecutive baselines
        in another (`Engine.baseline_many`), in order. Per message: True (stored), False (a
        duplicate), or the exception refusing it; and the run aggregates to send."""
        results: list[Any] = [None] * len(batch)
        reports: list[tuple[int, tuple]] = []
        baselines: list[tuple[int, tuple]] = []
        aggregates: list[tuple[str, Any]] = []

        def flush_reports() -> None:
            if not reports:
                return  # an empty transaction would mark a full disk writable again
            stored = self.engine.ingest_many([x for _, x in reports])
            for (i, _), r in zip(reports, stored, strict=True):
                results[i] = r
            aggregates.extend(self._aggregates([x for _, x in reports], stored))
            reports.clear()

        def flush_baselines() -> None:
            if not baselines:
                return  # an empty transaction would mark a full disk writable again
            stored = self.engine.baseline_many([x for _, x in baselines])
            for (i, _), r in zip(baselines, stored, strict=True):
                results[i] = r
            baselines.clear()

        for i, job in enumerate(batch):
            msg, st = job.msg, job.state
            try:
                if msg.kind == "audit":  # after the reports before it: its live keys are stored
                    flush_baselines()
                    flush_reports()
                    piece = wire.audit_from(msg)
                    skipped = int(msg.body.skipped_audits)
                    results[i] = self.engine.audit.add(st.run, st.incarnation, piece, skipped)
                    continue
                if msg.kind == "report":
                    flush_baselines()
                    check = wire.check_from(msg)
                    reports.append(
                        (i, (st.run, st.incarnation, check, int(msg.body.dropped_reports)))
                    )
                    continue
                flush_reports()
                if not msg.body.HasField("weight"):
                    raise wire.invalid("baseline.weight: missing, expected W0's sketch")
                sketch = wire.sketch_from(msg, "weight", msg.body.weight)
                baselines.append((i, (st.run, st.incarnation, msg.body.matrix, sketch)))
            except Exception as exc:
                results[i] = exc
        flush_baselines()
        flush_reports()
        return results, aggregates

    def _aggregates(self, reports: list[tuple], stored: list[Any]) -> list[tuple[str, Any]]:
        """The run aggregates of the checks these stored reports completed (sidecar/progress.py),
        as frames for the run's streams. The aggregate is read after the group commit, so a check
        whose run has a later step in the same batch sends none (it would mix steps); the later
        one sends its own. A failure here is logged: the reports stay acknowledged."""
        label = [self.engine.check_label(run, check.step) for run, _, check, _ in reports]
        last = {}
        for (run, _, _, _), step in zip(reports, label, strict=True):
            last[run] = max(last.get(run, step), step)
        out = []
        for (run, incarnation, check, _), fresh, step in zip(reports, stored, label, strict=True):
            if fresh is not True:
                continue
            try:
                matrices = len(self.engine.manifest(run) or ())
                done = self._progress.stored(run, incarnation, matrices, check.matrix, step)
                if done and step == last[run]:
                    frame = wire.encode_aggregate(run, step, self.engine.aggregate(run))
                    out.append((run, frame))
            except Exception:
                log.exception("the aggregate of run %s step %d was not sent", run, check.step)
        return out

    def _answer(self, job: _Job, result: Any) -> None:
        msg, state = job.msg, job.state
        self._release(state, job.nbytes)
        state.outstanding.discard(job.done)
        job.done.set_result(None)
        if isinstance(result, (ValidationError, wire.WireError)):
            self._count_error(result.code.lower())
            job.out.put_nowait(_error(msg.id, result.code, result.message))
            return
        if isinstance(result, BaseException):
            # A report the engine cannot digest is refused alone: ending the stream would make
            # the client resend it forever, blocking everything behind it.
            log.error("ingest of %s %d failed: %r", msg.kind, msg.id, result)
            self._count_error("internal")
            text = f"{msg.kind} {msg.id}: the sidecar failed on it ({result!r})"
            job.out.put_nowait(_error(msg.id, "INTERNAL", text))
            return
        if result and msg.kind == "report" and msg.body.dropped_reports:
            with self.stats.lock:
                self.stats.dropped[state.run] += int(msg.body.dropped_reports)
        with self.stats.lock:
            self.stats.last_lag_seconds = time.monotonic() - job.received
        job.out.put_nowait(pb.ServerMessage(ack=pb.Ack(ids=[msg.id])))

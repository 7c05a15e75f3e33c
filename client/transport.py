"""The background sender: one thread, a queue bounded in bytes, reconnect, resend, bounded flush.

The training thread only calls `submit_*` (append to a deque under a lock; never blocks on the
network). The sender thread connects with jittered exponential backoff, opens one `Ingest.Stream`,
sends the Hello, then every baseline and report not yet acknowledged, in id order; the sidecar acks
what it persisted. A broken stream puts the unacknowledged items back in front of the queue and
they are resent after reconnecting (the sidecar de-duplicates on (run, matrix, step, incarnation)).

The queue holds at most `max_queue_bytes` of unacknowledged items (sent or not). When a new item
does not fit, the oldest audit block goes first, then the oldest report (baselines only when
nothing else is left), counted, and the count travels with the next report (`dropped_reports`) or
audit block (`skipped_audits`). An audit block (`submit_audit`, the self-audit's ΔW) that does
not fit is never queued: it is skipped and counted (`audits_skipped`), so audits never push a
report out.

A refusal with a retryable status (`RETRYABLE`: RESOURCE_EXHAUSTED, the sidecar's disk is full or
it is over its in-flight budget; UNAVAILABLE, its store is locked or busy) keeps the item: it goes
back into the queue in id order and sending pauses (backoff from 0.1 s doubling to 5 s, reset by
the next ack), so everything still queued arrives once the sidecar can take it again. Any other
refusal is final: the item is dropped and counted as refused.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
from deltawatch.v1 import deltawatch_pb2 as pb
from deltawatch.v1 import deltawatch_pb2_grpc as pb_grpc

from . import wire

log = logging.getLogger("deltawatch.client")

RETRYABLE = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")  # Error codes the client resends
BACKOFF_INITIAL_S = 0.1
GOODBYE_WAIT_S = 3.0  # close(): how long the sidecar gets to end the stream after the Goodbye
BACKOFF_MAX_S = 5.0
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    # gRPC's own reconnect backoff (default up to 120 s) capped, so a sidecar that comes up is
    # found within a couple of seconds.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


@dataclass
class _Item:
    id: int
    kind: str  # "baseline" | "report" | "audit"
    payload: object  # baseline: (matrix, Sketch); report: MatrixCheck; audit: AuditPiece
    nbytes: int
    carried_dropped: int = 0  # drop (report) or skip (audit) count encoded into its frames
    frames: list | None = field(default=None, repr=False)


def payload_nbytes(*tensors) -> int:
    """A report's budgeted size: its tensors' bytes plus a fixed allowance for the scalars."""
    return 512 + sum(int(t.numel()) * 4 for t in tensors if t is not None)


class ErrorLog:
    """Logs the first occurrence of each kind of failure, counts all of them."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def __call__(self, kind: str, message: str, *args) -> None:
        with self._lock:
            self.counts[kind] += 1
            first = self.counts[kind] == 1
        if first:
            log.warning("deltawatch: " + message + " (logged once; counted as %r)", *args, kind)


class Transport:
    """Owns the connection to the sidecar. Thread-safe `submit_*`; `close()` flushes.

    `hello` builds the Hello frames for a given message id (called once per connection).
    `channel_factory` returns a fresh `grpc.Channel` (credentials applied).
    """

    def __init__(
        self,
        *,
        run: str,
        incarnation: int,
        hello: Callable[[int], list],
        channel_factory: Callable[[], grpc.Channel],
        max_queue_bytes: int,
        connect_timeout: float,
        on_alert: Callable[[dict], None] | None = None,
        errors: ErrorLog | None = None,
    ):
        self.run = run
        self.incarnation = incarnation
        self._hello = hello
        self._channel_factory = channel_factory
        self.max_queue_bytes = max_queue_bytes
        self.connect_timeout = connect_timeout
        self._on_alert = on_alert
        self.errors = errors or ErrorLog()
        self._cv = threading.Condition()
        self._pending: collections.deque[_Item] = collections.deque()  # not sent on this stream
        self._inflight: dict[int, _Item] = {}  # sent, not acknowledged (insertion = id order)
        self._bytes = 0
        self._next_id = 1
        self._dropped_unreported = 0
        self.dropped_total = 0
        self._skipped_unreported = 0  # audit blocks skipped since the last audit block sent
        self.audits_skipped = 0
        self.acked_total = 0
        self.refused_total = 0
        self.retried_total = 0  # refusals with a retryable status (the item was kept)
        self._retry_backoff = BACKOFF_INITIAL_S
        self._send_after = 0.0  # time.monotonic() before which nothing is sent (retry pause)
        self._baselines_acked: dict[str, _Item] = {}  # matrix -> its acknowledged baseline
        self.baselines_resent = 0
        self.connections = 0
        self.lock_references: dict[str, tuple[int, object]] = {}
        self._aggregate: dict | None = None  # the newest RunAggregate of the run ("step" inside)
        self.connected = False
        self._closing = False
        self._stop = threading.Event()
        self._session_call = None
        self._thread = threading.Thread(target=self._run, name="deltawatch-sender", daemon=True)
        self._thread.start()

    # -- training thread ---------------------------------------------------------------------

    def submit_baseline(self, matrix: str, sketch) -> None:
        self._submit("baseline", (matrix, sketch), payload_nbytes(sketch.G, sketch.C))

    def submit_report(self, check) -> None:
        tensors = [check.v_ref]
        for sketch in (check.update, check.weight):
            if sketch is not None:
                tensors += [sketch.G, sketch.C]
        self._submit("report", check, payload_nbytes(*tensors))

    def submit_audit(self, piece) -> None:
        """Queue one audit block (`AuditPiece`) when it fits the byte budget as it stands;
        otherwise skip it and count it (never drops a report to make room)."""
        nbytes = 512 + int(piece.delta.numel()) * piece.delta.element_size()
        with self._cv:
            if self._bytes + nbytes > self.max_queue_bytes:
                self.audits_skipped += 1
                self._skipped_unreported += 1
                self.errors(
                    "audit_skipped", "queue full: skipped an audit block of %s", piece.matrix
                )
                return
        self._submit("audit", piece, nbytes)

    def count_unsent(self) -> None:
        """Count a report that was never queued (its check was dropped on every rank after a
        failure): like a queue drop, the count travels with the next report."""
        with self._cv:
            self.dropped_total += 1
            self._dropped_unreported += 1

    def _submit(self, kind: str, payload, nbytes: int) -> None:
        with self._cv:
            if self._closing:
                return
            item = _Item(self._next_id, kind, payload, nbytes)
            self._next_id += 1
            self._pending.append(item)
            self._bytes += nbytes
            while self._bytes > self.max_queue_bytes and self._drop_oldest(keep=item):
                pass
            self._cv.notify_all()

    def _drop_oldest(self, keep: _Item) -> bool:
        """Drop the oldest unacknowledged audit block (else report, else baseline); False when
        nothing is left."""
        for kind in ("audit", "report", "baseline"):
            for source in (self._inflight.values(), self._pending):
                victim = next((i for i in source if i.kind == kind and i is not keep), None)
                if victim is not None:
                    break
            else:
                continue
            if victim.id in self._inflight:
                del self._inflight[victim.id]
            else:
                self._pending.remove(victim)
            self._bytes -= victim.nbytes
            if kind == "report":
                self.dropped_total += 1
                self._dropped_unreported += 1 + victim.carried_dropped
            elif kind == "audit":
                self.audits_skipped += 1
                self._skipped_unreported += 1 + victim.carried_dropped
            self.errors("queue_full", "queue full (%d bytes): dropped the oldest", self._bytes)
            return True
        return False

    # -- any thread --------------------------------------------------------------------------

    @property
    def queued_bytes(self) -> int:
        with self._cv:
            return self._bytes

    def unacknowledged(self) -> int:
        with self._cv:
            return len(self._pending) + len(self._inflight)

    def close(self, timeout: float) -> bool:
        """Wait up to `timeout` s for every item to be acknowledged, say goodbye, stop the
        thread. True when everything was acknowledged."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            while self._pending or self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.1))
            flushed = not (self._pending or self._inflight)
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        # The request stream now yields the Goodbye and half-closes; the sidecar ends the stream
        # once it has read it. Give that a moment before cancelling, or the cancel races the
        # Goodbye and the sidecar sees a dropped connection instead of a finished run.
        self._thread.join(timeout=GOODBYE_WAIT_S)
        call = self._session_call
        if call is not None and self._thread.is_alive():
            call.cancel()
        self._thread.join(timeout=max(0.5, deadline - time.monotonic()) + 2.0)
        return flushed

    # -- sender thread -----------------------------------------------------------------------

    def _run(self) -> None:
        backoff = BACKOFF_INITIAL_S
        while not self._stop.is_set():
            channel = None
            try:
                channel = self._channel_factory()
                if self._wait_ready(channel):
                    progressed = self._session(channel)
                    if progressed:
                        backoff = BACKOFF_INITIAL_S
            except Exception as exc:  # never let the sender die
                self.errors("sender", "sender error: %s", repr(exc))
            finally:
                self.connected = False
                if channel is not None:
                    with contextlib.suppress(Exception):
                        channel.close()
            if self._stop.is_set():
                break
            # Full jitter: sleep uniformly in [0, backoff], double up to BACKOFF_MAX_S.
            self._stop.wait(random.uniform(0.0, backoff))
            backoff = min(BACKOFF_MAX_S, backoff * 2)

    def _wait_ready(self, channel: grpc.Channel) -> bool:
        future = grpc.channel_ready_future(channel)
        deadline = time.monotonic() + self.connect_timeout
        try:
            while not self._stop.is_set():
                try:
                    future.result(timeout=min(0.2, max(0.01, deadline - time.monotonic())))
                    return True
                except grpc.FutureTimeoutError:
                    if time.monotonic() >= deadline:
                        self.errors(
                            "connect_timeout",
                            "no sidecar at the endpoint after %.0f s; retrying in the background",
                            self.connect_timeout,
                        )
                        return False
            return False
        finally:
            future.cancel()

    def _session(self, channel: grpc.Channel) -> bool:
        """One stream: hello, resend, send, read acks until it breaks or we close."""
        with self._cv:
            # What the last stream did not get acknowledged goes first, in id order.
            resend = sorted(self._inflight.values(), key=lambda i: i.id)
            self._inflight.clear()
            self._pending.extendleft(reversed(resend))
            hello_id = self._next_id
            self._next_id += 1
        session = _Session(self, hello_id)
        stub = pb_grpc.IngestStub(channel)
        call = stub.Stream(session.requests())
        self._session_call = call
        self.connections += 1
        progressed = False
        try:
            for msg in call:
                kind = msg.WhichOneof("body")
                if kind == "ack":
                    progressed = True
                    self.connected = True
                    self._acked(msg.ack.ids)
                    if msg.ack.resend_baselines:
                        self._resend_baselines()
                elif kind == "error":
                    self._refused(msg.error)
                elif kind == "lock_reference":
                    self._lock_reference(msg.lock_reference)
                elif kind == "alert":
                    self._alert(msg.alert)
                elif kind == "aggregate":
                    self._run_aggregate(msg.aggregate)
                if self._stop.is_set():
                    break
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                self.errors(
                    f"stream_{code.name.lower()}",
                    "the sidecar ended the stream: %s %s",
                    code.name,
                    exc.details(),
                )
            elif code == grpc.StatusCode.UNAUTHENTICATED:
                self.errors("unauthenticated", "the sidecar refused the token: %s", exc.details())
            elif code != grpc.StatusCode.CANCELLED:
                self.errors("stream_broken", "stream to the sidecar broke: %s", str(code))
        finally:
            session.finish()
            call.cancel()
            self._session_call = None
        return progressed

    def _acked(self, ids) -> None:
        with self._cv:
            self._retry_backoff = BACKOFF_INITIAL_S
            for i in ids:
                item = self._inflight.pop(i, None)
                if item is not None:
                    self._bytes -= item.nbytes
                    self.acked_total += 1
                    if item.kind == "baseline":
                        self._baselines_acked[item.payload[0]] = item
            self._cv.notify_all()

    def _resend_baselines(self) -> None:
        """The sidecar created the run with this hello (its store was lost): the baselines an
        earlier sidecar acknowledged go again, first (new ids, same content)."""
        with self._cv:
            again = []
            for old in self._baselines_acked.values():
                again.append(_Item(self._next_id, "baseline", old.payload, old.nbytes))
                self._next_id += 1
                self._bytes += old.nbytes
            self._baselines_acked.clear()
            self._pending.extendleft(reversed(again))
            self.baselines_resent += len(again)
            self._cv.notify_all()

    def _refused(self, err: pb.Error) -> None:
        if err.code in RETRYABLE:
            self._retry(err)
            return
        with self._cv:
            item = self._inflight.pop(err.id, None)
            if item is not None:
                self._bytes -= item.nbytes
                self.refused_total += 1
            self._cv.notify_all()
        self.errors(f"refused_{err.code.lower()}", "the sidecar refused a report: %s", err.message)

    def _retry(self, err: pb.Error) -> None:
        """Keep a item the sidecar could not take now: back into the queue in id order, and
        pause sending for the backoff."""
        with self._cv:
            item = self._inflight.pop(err.id, None)
            if item is not None:
                self._pending = collections.deque(
                    sorted([*self._pending, item], key=lambda i: i.id)
                )
                self.retried_total += 1
            self._send_after = time.monotonic() + random.uniform(0.5, 1.0) * self._retry_backoff
            self._retry_backoff = min(BACKOFF_MAX_S, self._retry_backoff * 2)
            self._cv.notify_all()
        self.errors(
            f"retry_{err.code.lower()}",
            "the sidecar cannot take a report now, it is kept and sent again: %s",
            err.message,
        )

    def _lock_reference(self, ref: pb.LockReference) -> None:
        try:
            matrix, lock_step, v_ref = wire.lock_reference_from(ref)
        except wire.WireError as exc:
            self.errors("bad_lock_reference", "ignored a lock reference: %s", exc.message)
            return
        with self._cv:
            self.lock_references[matrix] = (lock_step, v_ref)

    def latest_aggregate(self) -> dict | None:
        """A copy of the newest run aggregate the sidecar sent (None before the first)."""
        with self._cv:
            return None if self._aggregate is None else dict(self._aggregate)

    def _run_aggregate(self, frame: pb.RunAggregate) -> None:
        try:
            aggregate = wire.aggregate_from(frame)
        except wire.WireError as exc:
            self.errors("bad_aggregate", "ignored a run aggregate: %s", exc.message)
            return
        with self._cv:
            if self._aggregate is None or aggregate["step"] > self._aggregate["step"]:
                self._aggregate = aggregate

    def _alert(self, alert: pb.Alert) -> None:
        if self._on_alert is None:
            return
        try:
            self._on_alert(wire.alert_from(alert))
        except Exception as exc:
            self.errors("on_alert", "on_alert raised %s", repr(exc))

    def _encode(self, item: _Item) -> list:
        """Frames of an item (encoded once, on the sender side, never on the training thread)."""
        if item.frames is None:
            if item.kind == "baseline":
                matrix, sketch = item.payload
                item.frames = wire.encode_baseline(
                    item.id, run=self.run, incarnation=self.incarnation, matrix=matrix,
                    sketch=sketch,
                )  # fmt: skip
            else:  # a report carries the drops since the last one, an audit block the skips
                report = item.kind == "report"
                counter = "_dropped_unreported" if report else "_skipped_unreported"
                with self._cv:
                    count = getattr(self, counter)
                    setattr(self, counter, 0)
                item.carried_dropped = count
                if report:
                    fields = {"check": item.payload, "dropped_reports": count}
                else:
                    fields = {"piece": item.payload, "skipped_audits": count}
                encode = wire.encode_report if report else wire.encode_audit
                item.frames = encode(item.id, run=self.run, incarnation=self.incarnation, **fields)
        return item.frames


class _Session:
    """The request side of one stream: a generator gRPC consumes on its own thread."""

    def __init__(self, transport: Transport, hello_id: int):
        self.t = transport
        self.hello_id = hello_id
        self.done = False

    def finish(self) -> None:
        with self.t._cv:
            self.done = True
            self.t._cv.notify_all()

    def requests(self) -> Iterator[pb.ClientMessage]:
        t = self.t
        try:
            yield from t._hello(self.hello_id)
        except Exception as exc:
            t.errors("hello", "could not build the hello: %s", repr(exc))
            return
        while True:
            with t._cv:
                while not self.done and not t._stop.is_set():
                    pause = t._send_after - time.monotonic()
                    if t._pending and pause <= 0:
                        break
                    if not t._pending and t._closing and not t._inflight:
                        break
                    t._cv.wait(min(0.2, pause) if pause > 0 else 0.2)
                if self.done:
                    return
                if t._stop.is_set() or (t._closing and not t._pending and not t._inflight):
                    item = None
                else:
                    item = t._pending.popleft() if t._pending else None
                    if item is not None:
                        t._inflight[item.id] = item
            if item is None:
                if t._stop.is_set() or t._closing:
                    yield pb.ClientMessage(
                        id=0, goodbye=pb.Goodbye(run=t.run, reason="monitor closed")
                    )
                    return
                continue
            try:
                frames = t._encode(item)
            except Exception as exc:
                t.errors("encode", "could not encode a %s: %s", item.kind, repr(exc))
                with t._cv:
                    if t._inflight.pop(item.id, None) is not None:
                        t._bytes -= item.nbytes
                    t._cv.notify_all()
                continue
            yield from frames

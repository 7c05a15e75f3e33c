"""Mutation fuzz of the ingest: a real client stream, recorded, replayed with hostile changes.

The stream is recorded from a real `Monitor` (its own Transport and wire codec) talking to a small
recording gRPC servicer on a loopback port that acknowledges every message. It carries a hello,
baselines, reports with chunked tensors (a 48 x 9000 matrix: G is 1.15 MB, two chunks) and the
locking report (with v_ref). Each mutation class then replays it, changed, into a real
`deltawatch serve` process on a raw gRPC stub, a fresh run name per trial. Every answer must be a
named status: an `Error` frame (INVALID_ARGUMENT, FAILED_PRECONDITION, or a retryable one) with a
message, or a stream ended with INVALID_ARGUMENT / FAILED_PRECONDITION / RESOURCE_EXHAUSTED; never
INTERNAL or UNKNOWN, never a hang (every stream has a deadline). After each class the sidecar is
killed (-9) and restarted on its data dir: it must come back ready with nothing quarantined, and a control run
stored at the start must read exactly as before. Trials are bounded and seeded.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import struct
import threading

import grpc
import pytest
import torch
from deltawatch.client import Monitor, wire
from deltawatch.v1 import deltawatch_pb2 as pb
from deltawatch.v1 import deltawatch_pb2_grpc as pb_grpc
from support import SidecarProcess

ERROR_CODES = {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}
STREAM_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
DEADLINE_S = 60.0  # a stream not answered by then is a hang


class _Recorder(pb_grpc.IngestServicer):
    """Records every frame of every stream and acknowledges each complete message."""

    def __init__(self) -> None:
        self.frames: list[pb.ClientMessage] = []
        self.lock = threading.Lock()

    def Stream(self, request_iterator, context):
        assembler = wire.Assembler()
        for frame in request_iterator:
            with self.lock:
                self.frames.append(pb.ClientMessage.FromString(frame.SerializeToString()))
            msg = assembler.feed(frame)
            if msg is not None and msg.kind != "goodbye":
                yield pb.ServerMessage(ack=pb.Ack(ids=[msg.id]))


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        block = torch.nn.Module()
        block.wide = torch.nn.Linear(9000, 48, bias=False)
        block.small = torch.nn.Linear(40, 24, bias=False)
        self.layers = torch.nn.ModuleList([block])


def _record() -> list[list[pb.ClientMessage]]:
    """The messages (each a list of frames) of one real Monitor's stream: hello, baselines,
    four checks of two matrices (the third locks), goodbye."""
    recorder = _Recorder()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_IngestServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    torch.manual_seed(0)
    model = _Toy()
    mon = Monitor(model, run="recorded", endpoint=f"127.0.0.1:{port}", every=1, lock_at_step=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        direction = {
            n: torch.randn(p.shape, generator=g) * 1e-3 for n, p in model.named_parameters()
        }
        for step in range(1, 5):
            for n, p in model.named_parameters():
                p.add_(direction[n])
            mon.step(step)
    assert mon.close(timeout=60) is True
    server.stop(0)
    messages: list[list[pb.ClientMessage]] = []
    for f in recorder.frames:
        if f.WhichOneof("body") == "chunk":
            messages[-1].append(f)
        else:
            messages.append([f])
    kinds = [m[0].WhichOneof("body") for m in messages]
    assert kinds[0] == "hello" and kinds[-1] == "goodbye" and kinds.count("report") == 8, kinds
    assert any(len(m) > 1 for m in messages), "the wide matrix's G must travel in chunks"
    return messages


@pytest.fixture(scope="module")
def recorded() -> list[list[pb.ClientMessage]]:
    return _record()


def _copy(frames: list[pb.ClientMessage], run: str) -> list[pb.ClientMessage]:
    """Frames with the run renamed (each trial stores under its own run)."""
    out = []
    for f in frames:
        c = pb.ClientMessage()
        c.CopyFrom(f)
        body = c.WhichOneof("body")
        if body in ("hello", "baseline", "report", "goodbye"):
            getattr(c, body).run = run
        out.append(c)
    return out


class Replay:
    """The recorded stream's parts for one run name."""

    def __init__(self, messages: list[list[pb.ClientMessage]], run: str) -> None:
        self.run = run
        self.all = [_copy(m, run) for m in messages]
        self.hello = self.all[0]
        self.baselines = [m for m in self.all if m[0].WhichOneof("body") == "baseline"]
        self.reports = [m for m in self.all if m[0].WhichOneof("body") == "report"]
        self.goodbye = self.all[-1]
        self.chunked = next(m for m in self.reports if len(m) > 1)

    def start(self) -> list[pb.ClientMessage]:
        return [f for m in [self.hello, *self.baselines] for f in m]

    def first_report(self) -> list[pb.ClientMessage]:
        return [pb.ClientMessage.FromString(f.SerializeToString()) for f in self.reports[0]]


def _answers(side: SidecarProcess, frames) -> tuple[list[pb.ServerMessage], grpc.RpcError | None]:
    """Send frames on a raw stream; what came back and how the stream ended (None: OK)."""
    with grpc.insecure_channel(
        side.endpoint, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as ch:
        call = pb_grpc.IngestStub(ch).Stream(iter(frames), timeout=DEADLINE_S)
        out = []
        try:
            for m in call:
                out.append(m)
        except grpc.RpcError as exc:
            assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED, "the stream hung"
            return out, exc
        return out, None


def _named(side: SidecarProcess, frames, *, probe_id: int | None = None) -> dict[int, str]:
    """Replay `frames`; every refusal must be named. Returns id -> "ack" | Error code. With
    `probe_id`: the stream must have gone on to answer that (last, valid) message."""
    out, ended = _answers(side, frames)
    answered: dict[int, str] = {}
    for m in out:
        kind = m.WhichOneof("body")
        if kind == "ack":
            answered.update((i, "ack") for i in m.ack.ids)
        elif kind == "error":
            assert m.error.code in ERROR_CODES, (m.error.code, m.error.message)
            assert len(m.error.message) > 10, m.error
            answered[m.error.id] = m.error.code
    if ended is not None:
        assert ended.code() in STREAM_CODES, (ended.code(), ended.details())
        assert ended.details(), ended.code()
        assert probe_id is None, f"the stream ended ({ended.details()}) instead of going on"
    if probe_id is not None:
        assert probe_id in answered, f"message {probe_id} unanswered: {answered}"
    return answered


def _restart_and_check(side: SidecarProcess, control: dict) -> None:
    side.kill()  # kill -9: the harder restart
    side.restart()
    ready = side.get("/readyz")
    assert ready["status"] == "ready" and "quarantined" not in ready, ready
    assert side.run("fuzz-control") == control


def _with_id(frames: list[pb.ClientMessage], msg_id: int) -> list[pb.ClientMessage]:
    out = []
    for f in frames:
        c = pb.ClientMessage.FromString(f.SerializeToString())
        c.id = msg_id
        if c.WhichOneof("body") == "chunk":
            c.chunk.id = msg_id
        out.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# Mutation classes: each yields (frames, probe) trials for a fresh Replay


def bit_flips(r: Replay, rng: random.Random):
    """Random bit flips anywhere in a report's declaring frame (re-parsed; unparsable ones
    travel as raw bytes in `raw_bit_flips`)."""
    for _ in range(12):
        head = bytearray(r.reports[1][0].SerializeToString())
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(head))
            head[i] ^= 1 << rng.randrange(8)
        try:
            frame = pb.ClientMessage.FromString(bytes(head))
        except Exception:
            continue
        yield [*r.start(), frame, *r.reports[1][1:], *_with_id(r.reports[2], 900)], None


def nan_inf(r: Replay, rng: random.Random):
    for value in (float("nan"), float("inf"), float("-inf")):
        for field in ("frobenius_sq", "channel_energy_sq", "weight.convergence"):
            frames = r.first_report()
            body = frames[0].report
            if field == "weight.convergence":
                body.weight.convergence = value
            else:
                setattr(body, field, value)
            yield [*r.start(), *frames, *_with_id(r.reports[1], 900)], 900
        frames = [pb.ClientMessage.FromString(f.SerializeToString()) for f in r.chunked]
        data = bytearray(frames[1].chunk.data)
        at = 4 * rng.randrange(len(data) // 4)
        data[at : at + 4] = struct.pack("<f", value)
        frames[1].chunk.data = bytes(data)
        yield [*r.start(), *frames, *_with_id(r.reports[0], 900)], 900


def shape_lies(r: Replay, rng: random.Random):
    """30 lies about a declared tensor's shape, inline and chunked: each refused alone."""
    lies = ([], [0], [-1, 32], [1, 2, 3], [9000], [32, 9000], [9001, 32], [8999, 32], [9000, 33],
            [9000, 4097], [1 << 40, 1 << 40], [9000, 0])  # fmt: skip
    trials = 0
    for fields in (("weight.G", "chunked"), ("update.C", "inline"), ("v_ref", "inline")):
        for lie in lies:
            if trials >= 30:
                return
            name, where = fields
            frames = [pb.ClientMessage.FromString(f.SerializeToString()) for f in r.chunked]
            if name == "v_ref" and not frames[0].report.HasField("v_ref"):
                locked = next(m for m in r.reports if m[0].report.locked_now)
                frames = [pb.ClientMessage.FromString(f.SerializeToString()) for f in locked]
            t = frames[0].report
            tensor = {"weight.G": t.weight.G, "update.C": t.update.C, "v_ref": t.v_ref}[name]
            tensor.shape[:] = lie
            trials += 1
            yield [*r.start(), *frames, *_with_id(r.reports[0], 900)], 900


def chunk_lies(r: Replay, rng: random.Random):
    def variant(change):
        frames = [pb.ClientMessage.FromString(f.SerializeToString()) for f in r.chunked]
        change(frames)
        return [*r.start(), *frames, *_with_id(r.reports[0], 900)]

    def set_chunk(i, **kw):
        def change(frames):
            for k, v in kw.items():
                setattr(frames[i].chunk, k, v)

        return change

    yield variant(set_chunk(1, chunk_index=1)), 900
    yield variant(set_chunk(1, chunk_count=7)), 900
    yield variant(set_chunk(1, field="update.C")), 900
    yield variant(set_chunk(1, data=b"\0" * 12)), 900
    yield variant(set_chunk(2, data=bytes(wire.MAX_CHUNK_BYTES + 4))), 900
    yield variant(lambda f: f.insert(2, f[1])), 900  # a chunk twice
    yield variant(lambda f: f.pop(1)), 900  # a chunk missing
    yield variant(lambda f: setattr(f[0].report.weight.G, "chunk_count", 1)), 900
    yield variant(lambda f: setattr(f[0].report.weight.G, "chunk_count", 0)), 900
    orphan = pb.ClientMessage(id=77, chunk=pb.TensorChunk(id=77, field="weight.G", chunk_count=1))
    yield [*r.start(), orphan], None  # a chunk of no message: the stream ends, named


def huge_counts(r: Replay, rng: random.Random):
    for value in (1 << 63, (1 << 64) - 1):
        for field in ("dropped_reports", "visible_count", "numel", "step"):
            frames = r.first_report()
            lie = value
            if field == "step":  # int64 on the wire: below zero is the lie
                lie = -(1 << 63) if value == 1 << 63 else -1
            setattr(frames[0].report, field, lie)
            yield [*r.start(), *frames, *_with_id(r.reports[1], 900)], 900
        hello = _copy(r.hello, r.run)
        hello[0].hello.incarnation = value
        yield hello, None


def duplicate_ids(r: Replay, rng: random.Random):
    a, b = r.reports[0], r.reports[1]
    yield [*r.start(), *a, *_with_id(b, a[0].id), *a, *_with_id(r.reports[2], 900)], 900
    yield [*r.start(), *_with_id(a, r.hello[0].id), *_with_id(b, 900)], 900


def _hello_with(r: Replay, **change):
    hello = _copy(r.hello, r.run)
    h = hello[0].hello
    if "config" in change:
        h.config_json = change["config"]
    if "shape" in change:
        h.manifest[0].shape[:] = change["shape"]
    if "resume_step" in change:
        h.resume_step = change["resume_step"]
    return hello


def hostile_hellos(r: Replay, rng: random.Random):
    config = json.loads(r.hello[0].hello.config_json)
    bad_configs = [
        json.dumps({**config, "alpha": 10**400}),  # the 401-digit alpha
        json.dumps({**config, "alpha": float("nan")}),
        json.dumps({**config, "alpha": float("inf")}),
        json.dumps({**config, "alpha": "0.5"}),
        json.dumps({**config, "lock_threshold": 2.0}),
        json.dumps({**config, "channel_rank": 0}),
        json.dumps({**config, "oversample": 10**6}),
        "[" * 100_000 + "]" * 100_000,  # 100k deep
        '{"a":' * 50 + "1" + "}" * 50,
        "[1, 2]",
        "not json",
        json.dumps({"pad": "x" * (1 << 17)}),
    ]
    for text in bad_configs:
        yield _hello_with(r, config=text), None
    for shape in ([], [1], [1, 2, 3], [0, 48], [1 << 40, 2]):
        yield _hello_with(r, shape=shape), None
    yield _hello_with(r, resume_step=-1), None
    hello = _copy(r.hello, r.run)
    hello[0].hello.manifest[1].matrix = hello[0].hello.manifest[0].matrix
    yield hello, None


def oversize_frames(r: Replay, rng: random.Random):
    big = pb.ClientMessage(id=5, goodbye=pb.Goodbye(run=r.run, reason="a" * (5 << 20)))
    yield [*r.start(), big], None
    frames = r.first_report()
    frames[0].report.matrix = "m" * (5 << 20)
    yield [*r.start(), *frames], None


def odd_run_names(r: Replay, rng: random.Random):
    for name in ("", "a" * 129, "../etc", "名字", "run\x00x", "run name", "run;DROP"):
        hello = _copy(r.hello, r.run)
        hello[0].hello.run = name
        yield hello, None
    frames = r.first_report()
    frames[0].report.run = "another-run"
    yield [*r.start(), *frames, *_with_id(r.reports[1], 900)], 900


def goodbye_mid_chunk(r: Replay, rng: random.Random):
    frames = [pb.ClientMessage.FromString(f.SerializeToString()) for f in r.chunked]
    yield [*r.start(), *frames[:2], *r.goodbye], None
    yield [*r.start(), frames[0], *_with_id(r.reports[0], 900)], 900


CLASSES = [
    bit_flips,
    nan_inf,
    shape_lies,
    chunk_lies,
    huge_counts,
    duplicate_ids,
    hostile_hellos,
    oversize_frames,
    odd_run_names,
    goodbye_mid_chunk,
]


@pytest.fixture(scope="module")
def side(tmp_path_factory, recorded):
    s = SidecarProcess(tmp_path_factory.mktemp("fuzz")).start()
    control = Replay(recorded, "fuzz-control")
    answered = _named(s, [f for m in control.all for f in m])
    assert set(answered.values()) == {"ack"}, answered
    yield s
    s.kill()


@pytest.mark.parametrize("mutate", CLASSES, ids=lambda f: f.__name__)
def test_mutated_streams_get_named_statuses_and_a_restart_succeeds(side, recorded, mutate):
    control = side.run("fuzz-control")
    rng = random.Random(mutate.__name__)
    trials = 0
    for i, (frames, probe) in enumerate(mutate(Replay(recorded, f"fuzz-{mutate.__name__}"), rng)):
        run = f"fuzz-{mutate.__name__[:20]}-{i}"
        renamed = _copy(frames, run) if mutate is not odd_run_names else frames
        _named(side, renamed, probe_id=probe)
        trials += 1
    assert trials >= 2, mutate.__name__
    if mutate is huge_counts:  # dropped_reports 2^63, 2^64-1: refused, and not stored
        refused = recorded[[m[0].WhichOneof("body") for m in recorded].index("report")][0]
        for i in (0, 5):
            detail = side.run(f"fuzz-huge_counts-{i}")
            steps = {m["matrix"]: m["step"] for m in detail["matrices"]}
            assert steps[refused.report.matrix] is None, steps
    assert side.get("/healthz")["status"] == "ok"
    _restart_and_check(side, control)

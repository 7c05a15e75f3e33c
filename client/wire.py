"""MatrixCheck <-> protobuf: the one place where tensors become bytes and bytes become tensors.

A tensor travels as raw little-endian bytes with its dtype and shape (never pickle). A message's
tensors travel inline in the declaring frame while that frame stays within `MAX_CHUNK_BYTES` of
tensor data; every other tensor travels as `TensorChunk` frames of at most `MAX_CHUNK_BYTES`
directly after the declaring frame, in field order and chunk order. `Assembler` reverses this on
the sidecar and validates every step (sizes, order, dtype, shape, finiteness).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from deltawatch.v1 import deltawatch_pb2 as pb

from .records import MatrixCheck, Sketch

MAX_CHUNK_BYTES = 1 << 20  # 1 MiB: the largest piece of a tensor in one frame
MAX_TENSOR_BYTES = 1 << 30  # 1 GiB: a declared tensor larger than this is refused
MAX_FRAME_BYTES = 4 << 20  # the sidecar's receive limit for one frame (inline data + scalars)

_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "<f4"),
    "float64": (torch.float64, "<f8"),
}
SKETCH_FIELDS = ("G", "C")


class WireError(Exception):
    """A frame that cannot be accepted. `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# ------------------------------------------------------------------------------------------------
# Encoding (client side)


def tensor_bytes(t: torch.Tensor) -> tuple[str, list[int], bytes]:
    """(dtype, shape, raw little-endian float32 bytes) of a tensor, copied to the host."""
    a = t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return "float32", list(a.shape), a.tobytes()


class _Frames:
    """Collects the tensors of one message: inline while the frame has room, else chunked."""

    def __init__(self, msg_id: int):
        self.msg_id = msg_id
        self.inline_bytes = 0
        self.chunks: list[pb.ClientMessage] = []

    def put(self, target: pb.Tensor, field: str, t: torch.Tensor) -> None:
        dtype, shape, raw = tensor_bytes(t)
        target.dtype = dtype
        target.shape.extend(shape)
        target.chunk_index = 0
        if self.inline_bytes + len(raw) <= MAX_CHUNK_BYTES:
            target.chunk_count = 1
            target.data = raw
            self.inline_bytes += len(raw)
            return
        count = max(1, math.ceil(len(raw) / MAX_CHUNK_BYTES))
        target.chunk_count = count
        view = memoryview(raw)
        for i in range(count):
            piece = bytes(view[i * MAX_CHUNK_BYTES : (i + 1) * MAX_CHUNK_BYTES])
            chunk = pb.TensorChunk(
                id=self.msg_id, field=field, chunk_index=i, chunk_count=count, data=piece
            )
            self.chunks.append(pb.ClientMessage(id=self.msg_id, chunk=chunk))

    def sketch(self, target: pb.Sketch, prefix: str, sketch) -> None:
        self.put(target.G, f"{prefix}.G", sketch.G)
        self.put(target.C, f"{prefix}.C", sketch.C)
        target.convergence = float(sketch.convergence)
        target.power_steps = int(sketch.power_steps)
        target.exact = bool(sketch.exact)


def encode_hello(
    msg_id: int,
    *,
    run: str,
    incarnation: int,
    resume_step: int | None,
    client_version: str,
    config: dict,
    manifest: Iterable[dict],
    rank: int = 0,
    world_size: int = 1,
) -> list[pb.ClientMessage]:
    """The Hello frame. `manifest` items: matrix, shape, numel, dtype, layer, module,
    shard_layout, owner_rank."""
    hello = pb.Hello(
        run=run,
        incarnation=incarnation,
        client_version=client_version,
        config_json=json.dumps(config, sort_keys=True, default=str),
        rank=rank,
        world_size=world_size,
    )
    if resume_step is not None:
        hello.resume_step = resume_step
    for e in manifest:
        entry = hello.manifest.add(
            matrix=e["matrix"],
            numel=int(e["numel"]),
            dtype=str(e["dtype"]),
            module=e["module"],
            shard_layout=e.get("shard_layout", "replicated"),
            owner_rank=int(e.get("owner_rank", 0)),
        )
        entry.shape.extend(int(s) for s in e["shape"])
        if e.get("layer") is not None:
            entry.layer = int(e["layer"])
    return [pb.ClientMessage(id=msg_id, hello=hello)]


def encode_baseline(
    msg_id: int, *, run: str, incarnation: int, matrix: str, sketch
) -> list[pb.ClientMessage]:
    """A Baseline (W0's Ritz data, a tracker `Sketch`) as frames: the declaring one, then chunks."""
    frames = _Frames(msg_id)
    baseline = pb.Baseline(run=run, incarnation=incarnation, matrix=matrix)
    frames.sketch(baseline.weight, "weight", sketch)
    return [pb.ClientMessage(id=msg_id, baseline=baseline), *frames.chunks]


def encode_report(
    msg_id: int, *, run: str, incarnation: int, check, dropped_reports: int = 0
) -> list[pb.ClientMessage]:
    """A `MatrixCheck` as frames: the MatrixReport, then the chunks of its large tensors."""
    frames = _Frames(msg_id)
    r = pb.MatrixReport(
        run=run,
        incarnation=incarnation,
        matrix=check.matrix,
        step=int(check.step),
        numel=int(check.numel),
        frobenius_sq=float(check.frobenius_sq),
        visible_count=int(check.visible_count),
        visible_low_count=int(check.visible_low_count),
        visible_principal_count=int(check.visible_principal_count),
        locked_now=bool(check.locked_now),
        dropped_reports=int(dropped_reports),
    )
    r.shape.extend(int(s) for s in check.shape)
    if check.channel_energy_sq is not None:
        r.channel_energy_sq = float(check.channel_energy_sq)
    if check.lock_step is not None:
        r.lock_step = int(check.lock_step)
    if check.update is not None:
        frames.sketch(r.update, "update", check.update)
    frames.sketch(r.weight, "weight", check.weight)
    if check.v_ref is not None:
        frames.put(r.v_ref, "v_ref", check.v_ref)
    return [pb.ClientMessage(id=msg_id, report=r), *frames.chunks]


def frames_size(frames: Iterable[pb.ClientMessage]) -> int:
    """Serialized bytes of a message's frames (what the transport's byte budget counts)."""
    return sum(f.ByteSize() for f in frames)


# ------------------------------------------------------------------------------------------------
# Decoding (sidecar side; the client decodes LockReference and Alert)


def decode_tensor(
    field: str, t: pb.Tensor, data: bytes | None = None, *, check_finite: bool = True
) -> torch.Tensor:
    """Raw little-endian bytes -> a float32 CPU tensor; validates dtype, size and finiteness."""
    if t.dtype not in _DTYPES:
        raise WireError(
            "INVALID_ARGUMENT", f"{field}: dtype {t.dtype!r}, expected one of {sorted(_DTYPES)}"
        )
    torch_dtype, np_dtype = _DTYPES[t.dtype]
    shape = list(t.shape)
    if not shape or any(s <= 0 for s in shape) or len(shape) > 2:
        raise WireError(
            "INVALID_ARGUMENT", f"{field}: shape {shape}, expected 1 or 2 positive dimensions"
        )
    raw = t.data if data is None else data
    expected = math.prod(shape) * np.dtype(np_dtype).itemsize
    if len(raw) != expected:
        raise WireError(
            "INVALID_ARGUMENT",
            f"{field}: {len(raw)} bytes, expected {expected} for {t.dtype} shape {shape}",
        )
    a = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
    out = torch.from_numpy(a.astype(np.float32))
    if check_finite and not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise WireError(
            "INVALID_ARGUMENT", f"{field}: {bad} non-finite values, expected all finite"
        )
    return out


def declared_tensors(body) -> list[tuple[str, pb.Tensor]]:
    """The (field, Tensor) pairs a Baseline or MatrixReport declares, in wire order."""
    out: list[tuple[str, pb.Tensor]] = []
    if isinstance(body, pb.Baseline):
        if body.HasField("weight"):
            out += [("weight.G", body.weight.G), ("weight.C", body.weight.C)]
        return out
    if body.HasField("update"):
        out += [("update.G", body.update.G), ("update.C", body.update.C)]
    if body.HasField("weight"):
        out += [("weight.G", body.weight.G), ("weight.C", body.weight.C)]
    if body.HasField("v_ref"):
        out.append(("v_ref", body.v_ref))
    return out


@dataclass
class Assembled:
    """A complete client message: its id, kind ("hello" | "baseline" | "report" | "goodbye"),
    the protobuf body and its tensors by field name (float32 CPU)."""

    id: int
    kind: str
    body: object
    tensors: dict[str, torch.Tensor]
    nbytes: int


class Assembler:
    """Reassembles frames into messages, validating each step (finiteness is checked per
    message, by `check_from` / `sketch_from`, so a NaN refuses one report, not the stream).

    Raises `WireError` on malformed chunking (unexpected chunk, wrong index or count, a chunk over
    1 MiB, a declared tensor over `MAX_TENSOR_BYTES`, a new message while one is incomplete).
    """

    def __init__(self, on_declare=None) -> None:
        self._on_declare = on_declare  # (kind, body) -> None; may raise WireError
        self._pending: Assembled | None = None
        self._waiting: list[tuple[str, pb.Tensor]] = []  # chunked tensors still to come
        self._parts: list[bytes] = []

    def feed(self, frame: pb.ClientMessage) -> Assembled | None:
        """One frame in; a complete message out (or None while chunks are outstanding)."""
        kind = frame.WhichOneof("body")
        if kind is None:
            raise WireError("INVALID_ARGUMENT", f"frame {frame.id}: body is empty, expected one")
        if kind == "chunk":
            return self._chunk(frame)
        if self._pending is not None:
            field, _ = self._waiting[0]
            raise WireError(
                "INVALID_ARGUMENT",
                f"frame {frame.id}: a {kind} arrived while message {self._pending.id} still "
                f"waits for chunks of {field}",
            )
        body = getattr(frame, kind)
        if self._on_declare is not None and kind in ("baseline", "report"):
            self._on_declare(kind, body)
        msg = Assembled(frame.id, kind, body, {}, frame.ByteSize())
        waiting = []
        for field, t in declared_tensors(body) if kind in ("baseline", "report") else []:
            if t.chunk_count == 0 or t.chunk_index != 0:
                raise WireError(
                    "INVALID_ARGUMENT",
                    f"{field}: chunk_index {t.chunk_index} chunk_count {t.chunk_count} in the "
                    f"declaring frame, expected index 0 and count >= 1",
                )
            declared = _declared_bytes(field, t)
            if t.data:
                if t.chunk_count != 1:
                    raise WireError(
                        "INVALID_ARGUMENT",
                        f"{field}: inline data with chunk_count {t.chunk_count}, expected 1",
                    )
                msg.tensors[field] = decode_tensor(field, t, check_finite=False)
            else:
                if t.chunk_count != math.ceil(declared / MAX_CHUNK_BYTES):
                    raise WireError(
                        "INVALID_ARGUMENT",
                        f"{field}: chunk_count {t.chunk_count}, expected "
                        f"{math.ceil(declared / MAX_CHUNK_BYTES)} for {declared} bytes in 1 MiB "
                        f"chunks",
                    )
                waiting.append((field, t))
        if not waiting:
            return msg
        self._pending, self._waiting, self._parts = msg, waiting, []
        return None

    def _chunk(self, frame: pb.ClientMessage) -> Assembled | None:
        c = frame.chunk
        if self._pending is None:
            raise WireError(
                "INVALID_ARGUMENT", f"chunk of {c.field!r} for message {c.id}: no message waits"
            )
        field, t = self._waiting[0]
        where = f"chunk {c.chunk_index}/{c.chunk_count} of {c.field!r} (message {c.id})"
        if c.id != self._pending.id or frame.id != self._pending.id:
            raise WireError("INVALID_ARGUMENT", f"{where}: expected message {self._pending.id}")
        if c.field != field:
            raise WireError("INVALID_ARGUMENT", f"{where}: expected field {field!r}")
        if c.chunk_count != t.chunk_count or c.chunk_index != len(self._parts):
            raise WireError(
                "INVALID_ARGUMENT",
                f"{where}: expected chunk {len(self._parts)}/{t.chunk_count}",
            )
        if len(c.data) > MAX_CHUNK_BYTES:
            raise WireError(
                "INVALID_ARGUMENT", f"{where}: {len(c.data)} bytes, expected at most 1 MiB"
            )
        self._parts.append(c.data)
        self._pending.nbytes += frame.ByteSize()
        if len(self._parts) < t.chunk_count:
            return None
        self._pending.tensors[field] = decode_tensor(
            field, t, b"".join(self._parts), check_finite=False
        )
        self._parts = []
        self._waiting.pop(0)
        if self._waiting:
            return None
        msg, self._pending = self._pending, None
        return msg

    @property
    def incomplete(self) -> bool:
        return self._pending is not None


def _declared_bytes(field: str, t: pb.Tensor) -> int:
    if t.dtype not in _DTYPES:
        raise WireError(
            "INVALID_ARGUMENT", f"{field}: dtype {t.dtype!r}, expected one of {sorted(_DTYPES)}"
        )
    shape = list(t.shape)
    if not shape or len(shape) > 2 or any(s <= 0 for s in shape):
        raise WireError(
            "INVALID_ARGUMENT", f"{field}: shape {shape}, expected 1 or 2 positive dimensions"
        )
    n = math.prod(shape) * np.dtype(_DTYPES[t.dtype][1]).itemsize
    if n > MAX_TENSOR_BYTES:
        raise WireError(
            "INVALID_ARGUMENT",
            f"{field}: {n} bytes declared (shape {shape}), expected at most {MAX_TENSOR_BYTES}",
        )
    return n


def _finite(field: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise WireError(
            "INVALID_ARGUMENT", f"{field}: {bad} non-finite values, expected all finite"
        )


def sketch_from(msg: Assembled, prefix: str, body: pb.Sketch):
    """The tracker `Sketch` of a decoded message (prefix "update" or "weight")."""
    for name in ("G", "C"):
        _finite(f"{prefix}.{name}", msg.tensors[f"{prefix}.{name}"])
    if not math.isfinite(body.convergence):
        raise WireError(
            "INVALID_ARGUMENT",
            f"{prefix}.convergence: {body.convergence}, expected a finite number",
        )
    return Sketch(
        G=msg.tensors[f"{prefix}.G"],
        C=msg.tensors[f"{prefix}.C"],
        convergence=float(body.convergence),
        power_steps=int(body.power_steps),
        exact=bool(body.exact),
    )


def check_from(msg: Assembled):
    """A decoded MatrixReport -> the tracker's `MatrixCheck` (validated for finiteness)."""
    r: pb.MatrixReport = msg.body
    if len(r.shape) != 2 or any(s <= 0 for s in r.shape):
        raise WireError(
            "INVALID_ARGUMENT", f"report.shape: {list(r.shape)}, expected [m, n] positive"
        )
    if not r.HasField("weight"):
        raise WireError("INVALID_ARGUMENT", "report.weight: missing, expected the W_t sketch")
    for name in ("frobenius_sq", "channel_energy_sq"):
        value = getattr(r, name)
        if not math.isfinite(value) or value < 0:
            raise WireError(
                "INVALID_ARGUMENT", f"report.{name}: {value}, expected a finite number >= 0"
            )
    if r.locked_now != r.HasField("v_ref"):
        raise WireError(
            "INVALID_ARGUMENT",
            f"report.v_ref: {'present' if r.HasField('v_ref') else 'absent'} with locked_now="
            f"{r.locked_now}, expected v_ref exactly on the check that locked",
        )
    if "v_ref" in msg.tensors:
        _finite("v_ref", msg.tensors["v_ref"])
    if r.locked_now and not r.HasField("lock_step"):
        raise WireError("INVALID_ARGUMENT", "report.lock_step: absent with locked_now=true")
    return MatrixCheck(
        matrix=r.matrix,
        step=int(r.step),
        shape=(int(r.shape[0]), int(r.shape[1])),
        numel=int(r.numel),
        frobenius_sq=float(r.frobenius_sq),
        visible_count=int(r.visible_count),
        visible_low_count=int(r.visible_low_count),
        visible_principal_count=int(r.visible_principal_count),
        channel_energy_sq=float(r.channel_energy_sq) if r.HasField("channel_energy_sq") else None,
        update=sketch_from(msg, "update", r.update) if r.HasField("update") else None,
        weight=sketch_from(msg, "weight", r.weight),
        lock_step=int(r.lock_step) if r.HasField("lock_step") else None,
        locked_now=bool(r.locked_now),
        v_ref=msg.tensors.get("v_ref"),
    )


def manifest_from(hello: pb.Hello) -> list[dict]:
    """The Hello's manifest as plain dicts (the sidecar turns them into engine ManifestEntry)."""
    return [
        {
            "matrix": e.matrix,
            "shape": tuple(int(s) for s in e.shape),
            "numel": int(e.numel),
            "dtype": e.dtype,
            "layer": int(e.layer) if e.HasField("layer") else None,
            "module": e.module,
            "shard_layout": e.shard_layout,
            "owner_rank": int(e.owner_rank),
        }
        for e in hello.manifest
    ]


# ------------------------------------------------------------------------------------------------
# Sidecar -> client


def encode_lock_reference(run: str, matrix: str, lock_step: int, v_ref: torch.Tensor):
    """A LockReference frame (v_ref inline; a (n, K) float32 basis is small)."""
    dtype, shape, raw = tensor_bytes(v_ref)
    t = pb.Tensor(dtype=dtype, shape=shape, chunk_index=0, chunk_count=1, data=raw)
    ref = pb.LockReference(run=run, matrix=matrix, lock_step=int(lock_step), v_ref=t)
    return pb.ServerMessage(lock_reference=ref)


def lock_reference_from(ref: pb.LockReference) -> tuple[str, int, torch.Tensor]:
    """(matrix, lock_step, v_ref) of a LockReference."""
    return ref.matrix, int(ref.lock_step), decode_tensor("lock_reference.v_ref", ref.v_ref)


_ALERT_STR = ("id", "rule", "run", "state", "severity", "started_at", "summary")


def encode_alert(alert: dict) -> pb.ServerMessage:
    """An /api/v1/alerts item -> an Alert frame."""
    a = pb.Alert(**{k: "" if alert.get(k) is None else str(alert[k]) for k in _ALERT_STR})
    if alert.get("matrix") is not None:
        a.matrix = str(alert["matrix"])
    if alert.get("ended_at") is not None:
        a.ended_at = str(alert["ended_at"])
    if alert.get("value") is not None:
        a.value = float(alert["value"])
    return pb.ServerMessage(alert=a)


def alert_from(a: pb.Alert) -> dict:
    """An Alert frame -> the /api/v1/alerts item dict (absent fields are None)."""
    out: dict = {k: getattr(a, k) for k in _ALERT_STR}
    out["matrix"] = a.matrix if a.HasField("matrix") else None
    out["ended_at"] = a.ended_at if a.HasField("ended_at") else None
    out["value"] = a.value if a.HasField("value") else None
    return out


def encode_aggregate(run: str, step: int, aggregate: dict) -> pb.ServerMessage:
    """A run's aggregate at `step` -> a RunAggregate frame (JSON, nulls kept, floats exact)."""
    body = json.dumps(aggregate, allow_nan=False, separators=(",", ":"))
    return pb.ServerMessage(aggregate=pb.RunAggregate(run=run, step=int(step), aggregate_json=body))


def aggregate_from(a: pb.RunAggregate) -> dict:
    """A RunAggregate frame -> {"step": step, <every aggregate key>: value or None}."""
    try:
        values = json.loads(a.aggregate_json)
    except ValueError as exc:
        raise WireError("INVALID_ARGUMENT", f"aggregate.aggregate_json: not JSON ({exc})") from None
    if not isinstance(values, dict):
        raise WireError("INVALID_ARGUMENT", "aggregate.aggregate_json: expected a JSON object")
    return {**values, "step": int(a.step)}


def iter_ids(frames: Iterable[pb.ClientMessage]) -> Iterator[int]:
    """The distinct message ids of a frame list, in order."""
    seen = set()
    for f in frames:
        if f.id not in seen:
            seen.add(f.id)
            yield f.id

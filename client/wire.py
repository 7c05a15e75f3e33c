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
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from deltawatch.v1 import deltawatch_pb2 as pb

from .config import RUN_NAME, RUN_NAME_RULE, MonitorConfig
from .records import SHARD_LAYOUTS, AuditPiece, ManifestEntry, MatrixCheck, Sketch
from .schedule import SCHEDULES
from .settings import MAX_COLUMNS, AnchorSettings, LockSettings, SketchSettings

# The protocol's limits: the one place the client, the ingest and the engine read them from.
MAX_CHUNK_BYTES = 1 << 20  # 1 MiB: the largest piece of a tensor in one frame
MAX_TENSOR_BYTES = 1 << 30  # 1 GiB: a declared tensor larger than this is refused
MAX_FRAME_BYTES = 4 << 20  # the sidecar's receive limit for one frame (inline data + scalars)
MAX_MATRICES = 100_000  # matrices in one hello's manifest
MAX_NAME = 512  # characters of a matrix or module name
MAX_DIM = 1 << 24  # rows or columns of one matrix
MAX_INT64 = (1 << 63) - 1  # every integer field is stored in a signed 64-bit SQLite INTEGER
MAX_CONFIG_BYTES = 1 << 16  # hello.config_json
MAX_CONFIG_DEPTH = 8  # nesting of hello.config_json (the Monitor's settings are flat)
MATRIX_NAME = re.compile(r"[A-Za-z0-9_.:/\-\[\]]{1,512}")
# hello.config_json keys the sidecar reads: key -> (type, low, high, default); ints are inclusive,
# ratios are in (0, 1] (lock_min_energy in [0, 1]).
# The defaults are the settings sections' own.
_SKETCH, _ANCHOR, _LOCK = SketchSettings(), AnchorSettings(), LockSettings()
CONFIG_KEYS: dict[str, tuple[type, float, float, float]] = {
    "channel_rank": (int, 1, MAX_COLUMNS, _SKETCH.channel_rank),
    "oversample": (int, 1, MAX_COLUMNS, _SKETCH.oversample),
    "alpha": (float, 0.0, 1.0, _ANCHOR.alpha),
    "lock_threshold": (float, 0.0, 1.0, _LOCK.threshold),
    "lock_min_energy": (float, 0.0, 1.0, _LOCK.min_energy),
    "lock_patience": (int, 1, MAX_INT64, _LOCK.patience),
    "mask_rank": (int, 1, MAX_DIM, _ANCHOR.mask_rank),
    "every": (int, 1, MAX_INT64, MonitorConfig.every),
}

_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "<f4"),
    "float64": (torch.float64, "<f8"),
}
# An AuditBlock's one tensor and its one dtype: float32, which holds the view's ΔW exactly.
AUDIT_FIELD, AUDIT_DTYPE = "delta", "float32"
_AUDIT_DTYPES = {AUDIT_DTYPE: _DTYPES[AUDIT_DTYPE]}
SKETCH_FIELDS = ("G", "C")


class WireError(Exception):
    """A frame that cannot be accepted. `code` is a grpc.StatusCode name.

    `refused_id` is the message refused alone (an Error frame answers it, its remaining chunks are
    skipped, the stream goes on); None ends the stream. `refeed`: the frame that raised starts a
    new message and is to be fed again (it cut off the refused one)."""

    def __init__(
        self, code: str, message: str, *, refused_id: int | None = None, refeed: bool = False
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.refused_id = refused_id
        self.refeed = refeed


def invalid(message: str) -> WireError:
    """An INVALID_ARGUMENT WireError."""
    return WireError("INVALID_ARGUMENT", message)


def finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite: min and max in one pass (NaN and ±inf propagate to them),
    without materialising an isfinite mask of the tensor's size."""
    if not t.numel():
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def check_int(field: str, value: int, low: int = 0, high: int = MAX_INT64) -> int:
    """An integer field in [low, high] (the default: what a signed 64-bit SQLite INTEGER holds)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:40]}... (too long)"
        raise invalid(f"{field}: {shown}, expected an integer in {low}..{high}")
    return value


def check_number(field: str, value: float, low: float = 0.0, high: float = math.inf) -> float:
    """A finite float field in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"{field}: {value!r:.40}, expected a finite number in [{low}, {high}]")
    try:
        x = float(value)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x) or not low <= x <= high:
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:40]}... (too long)"
        raise invalid(f"{field}: {shown}, expected a finite number in [{low}, {high}]")
    return x


def _depth(value: object) -> int:
    """Nesting depth of a parsed JSON value (iterative: a hostile depth cannot recurse)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in v)
    return deepest


def config_from(text: str) -> dict:
    """hello.config_json -> the Monitor's settings as a dict: a JSON object of at most
    `MAX_CONFIG_BYTES`, nested at most `MAX_CONFIG_DEPTH` deep (`check_config` checks the values
    against the run, in the engine)."""
    if len(text) > MAX_CONFIG_BYTES:
        raise invalid(
            f"hello.config_json: {len(text)} characters, expected at most {MAX_CONFIG_BYTES}"
        )
    try:
        config = json.loads(text) if text else {}
    except RecursionError:
        raise invalid(
            f"hello.config_json: nested too deep, expected at most {MAX_CONFIG_DEPTH} levels"
        ) from None
    except ValueError as exc:
        raise invalid(f"hello.config_json: not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise invalid(f"hello.config_json: a {type(config).__name__}, expected a JSON object")
    if _depth(config) > MAX_CONFIG_DEPTH:
        raise invalid(
            f"hello.config_json: nested {_depth(config)} levels, expected at most "
            f"{MAX_CONFIG_DEPTH}"
        )
    return config


def check_config(config: dict) -> dict:
    """Every key of a hello config the sidecar reads in its range (`CONFIG_KEYS`)."""
    for key, (kind, low, high, _) in CONFIG_KEYS.items():
        if key not in config:
            continue
        where = f"hello.config_json.{key}"
        if kind is int:
            check_int(where, config[key], int(low), int(high))
        else:
            check_number(where, config[key], low, high)
    if config.get("schedule", SCHEDULES[0]) not in SCHEDULES:
        raise invalid(
            f"hello.config_json.schedule: {str(config['schedule'])[:50]!r}, expected one of "
            f"{SCHEDULES}"
        )
    return config


def config_value(config: dict, key: str, field: int | None = None):
    """A setting of a hello: its own field when the hello has one and sent it (`channel_rank`,
    `oversample`), else the validated config's value (an older client), else the default
    (`CONFIG_KEYS`)."""
    kind, _, _, default = CONFIG_KEYS[key]
    return kind(field if field is not None else config.get(key, default))


def check_manifest(entries: Iterable[ManifestEntry]) -> list[ManifestEntry]:
    """A hello's manifest, every field checked: names, 2-D shapes, numel = m·n, layout, dtype,
    module, layer, owner rank, no matrix twice, 1 to `MAX_MATRICES` entries."""
    entries = list(entries)
    if not 0 < len(entries) <= MAX_MATRICES:
        raise invalid(f"hello.manifest: {len(entries)} matrices, expected 1 to {MAX_MATRICES}")
    seen: set[str] = set()
    for i, e in enumerate(entries):
        where = f"hello.manifest[{i}]"
        if not isinstance(e.matrix, str) or not MATRIX_NAME.fullmatch(e.matrix):
            raise invalid(
                f"{where}.matrix: {str(e.matrix)[:200]!r}, expected 1-{MAX_NAME} characters of "
                f"[A-Za-z0-9_.:/-[]]"
            )
        if e.matrix in seen:
            raise invalid(f"{where}.matrix: {e.matrix!r} appears twice in the manifest")
        seen.add(e.matrix)
        shape = tuple(e.shape)
        if len(shape) != 2 or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_DIM for s in shape
        ):
            raise invalid(
                f"{where}.shape: {list(shape)[:8]}, expected [m, n] with 0 < m, n <= {MAX_DIM}"
            )
        if e.numel != math.prod(shape):
            raise invalid(
                f"{where}.numel: {e.numel}, expected {math.prod(shape)} for shape {list(shape)}"
            )
        if e.shard_layout not in SHARD_LAYOUTS:
            raise invalid(
                f"{where}.shard_layout: {str(e.shard_layout)[:40]!r}, expected one of "
                f"{SHARD_LAYOUTS}"
            )
        if not isinstance(e.module, str) or not 0 < len(e.module) <= MAX_NAME:
            raise invalid(f"{where}.module: expected 1-{MAX_NAME} characters")
        if not isinstance(e.dtype, str) or not re.fullmatch(r"[a-z0-9_]{1,32}", e.dtype):
            raise invalid(f"{where}.dtype: {str(e.dtype)[:40]!r}, expected e.g. 'bfloat16'")
        if e.layer is not None:
            check_int(f"{where}.layer", e.layer)
        if e.expert is not None:
            check_int(f"{where}.expert", e.expert)
        check_int(f"{where}.owner_rank", e.owner_rank)
    return entries


# ------------------------------------------------------------------------------------------------
# Encoding (client side)


def tensor_bytes(t: torch.Tensor) -> tuple[str, list[int], bytes]:
    """(dtype, shape, raw little-endian float32 bytes) of a tensor, copied to the host (protobuf
    fields take bytes)."""
    dtype, shape, data = tensor_to_bytes(t.detach().to(torch.float32))
    return dtype, shape, bytes(data)


# dtypes a tensor's raw bytes may carry (name -> torch dtype): the store keeps any of them
# (sidecar/store.py), the wire sends float32; anything else is refused.
_RAW_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_RAW_NAMES = {v: k for k, v in _RAW_DTYPES.items()}


def tensor_to_bytes(t: torch.Tensor) -> tuple[str, list[int], memoryview | bytes]:
    """(dtype name, shape, raw little-endian bytes) of a tensor; the inverse of tensor_from_bytes.
    The bytes are a view of the (CPU, contiguous) tensor's memory, not a copy: sqlite3 binds it
    as a BLOB, which SQLite copies once."""
    if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
        raise RuntimeError("deltawatch writes tensors little-endian; this host is big-endian")
    t = t.detach().to("cpu").contiguous()
    if t.dtype not in _RAW_NAMES:
        raise TypeError(f"cannot write a tensor of dtype {t.dtype} as bytes")
    data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""
    return _RAW_NAMES[t.dtype], list(t.shape), data


def tensor_from_bytes(dtype: str, shape: Iterable[int], data: bytes) -> torch.Tensor:
    """A CPU tensor from (dtype name, shape, raw little-endian bytes); refuses unknown dtypes."""
    if dtype not in _RAW_DTYPES:
        raise TypeError(f"stored tensor has unknown dtype {dtype!r}")
    shape = [int(s) for s in shape]
    torch_dtype = _RAW_DTYPES[dtype]
    if not data:
        return torch.empty(shape, dtype=torch_dtype)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(torch_dtype)
    return flat.reshape(shape)


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
    channel_rank: int = 0,
    oversample: int = 0,
) -> list[pb.ClientMessage]:
    """The Hello frame. `manifest` items: matrix, shape, numel, dtype, layer, module,
    shard_layout, owner_rank, and `expert` for a mixture-of-experts matrix;
    `channel_rank` and `oversample` are K and p (`SketchSettings`;
    0 sends neither, as an older client did, and the sidecar reads config's)."""
    hello = pb.Hello(
        run=run,
        incarnation=incarnation,
        client_version=client_version,
        config_json=json.dumps(config, sort_keys=True, default=str),
        rank=rank,
        world_size=world_size,
        channel_rank=channel_rank,
        oversample=oversample,
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
        if e.get("expert") is not None:
            entry.expert = int(e["expert"])
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
    if check.weight is not None:  # absent on the checks that skip the W_t tracker
        frames.sketch(r.weight, "weight", check.weight)
    if check.v_ref is not None:
        frames.put(r.v_ref, "v_ref", check.v_ref)
    return [pb.ClientMessage(id=msg_id, report=r), *frames.chunks]


def encode_audit(
    msg_id: int, *, run: str, incarnation: int, piece: AuditPiece, skipped_audits: int = 0
) -> list[pb.ClientMessage]:
    """An `AuditPiece` as frames: the AuditBlock, then the chunks of its float32 ΔW block."""
    frames = _Frames(msg_id)
    a = pb.AuditBlock(
        run=run,
        incarnation=incarnation,
        matrix=piece.matrix,
        step=int(piece.step),
        row_offset=int(piece.row_offset),
        col_offset=int(piece.col_offset),
        skipped_audits=int(skipped_audits),
    )
    frames.put(a.delta, AUDIT_FIELD, piece.delta)
    return [pb.ClientMessage(id=msg_id, audit=a), *frames.chunks]


def frames_size(frames: Iterable[pb.ClientMessage]) -> int:
    """Serialized bytes of a message's frames (what the transport's byte budget counts)."""
    return sum(f.ByteSize() for f in frames)


# ------------------------------------------------------------------------------------------------
# Decoding (sidecar side; the client decodes LockReference and Alert)


def decode_tensor(
    field: str, t: pb.Tensor, data: bytes | bytearray | None = None, *, check_finite: bool = True
) -> torch.Tensor:
    """Raw little-endian bytes -> a float32 CPU tensor; validates dtype, size and finiteness.
    A float32 tensor of a writable buffer (a chunked tensor's preallocated `bytearray`) is a view
    of it, not a copy."""
    expected = _declared_bytes(field, t)
    shape = list(t.shape)
    raw = t.data if data is None else data
    if len(raw) != expected:
        raise invalid(f"{field}: {len(raw)} bytes, expected {expected} for {t.dtype} shape {shape}")
    a = np.frombuffer(raw, dtype=_DTYPES[t.dtype][1]).reshape(shape)
    writable = isinstance(raw, bytearray)
    out = torch.from_numpy(a.astype(np.float32, copy=not writable))
    if check_finite and not finite(out):
        bad = int((~torch.isfinite(out)).sum())
        raise invalid(f"{field}: {bad} non-finite values, expected all finite")
    return out


def declared_tensors(body) -> list[tuple[str, pb.Tensor]]:
    """The (field, Tensor) pairs a Baseline, MatrixReport or AuditBlock declares, in wire order."""
    out: list[tuple[str, pb.Tensor]] = []
    if isinstance(body, pb.AuditBlock):
        return [(AUDIT_FIELD, body.delta)] if body.HasField("delta") else []
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
    """A complete client message: its id, kind ("hello" | "baseline" | "report" | "audit" |
    "goodbye"),
    the protobuf body and its tensors by field name (float32 CPU)."""

    id: int
    kind: str
    body: object
    tensors: dict[str, torch.Tensor]
    nbytes: int


@dataclass
class _Chunked:
    """A chunked tensor being received: its declaration and the buffer its chunks fill."""

    field: str
    tensor: pb.Tensor
    buffer: bytearray
    received: int = 0  # chunks so far
    offset: int = 0  # bytes so far


class Assembler:
    """Reassembles frames into messages, validating each step (finiteness is checked per
    message, by `check_from` / `sketch_from`, so a NaN refuses one report, not the stream).

    Memory: a chunked tensor's bytes go straight into one buffer of its declared size, allocated
    when it is declared (after `on_declare` accepted the declaration); no chunk list, no join,
    no second copy for float32.

    A fault of one message (a declaration `on_declare` or the checks refuse; a chunk with the
    wrong index, count, field or size; a new message while its chunks are due) raises
    `WireError` with `refused_id` set: that message is dropped, the chunks still coming for it
    are skipped unread, and the stream goes on. Frames that belong to no message (an empty body,
    an orphan chunk) raise `WireError` without `refused_id`.
    """

    def __init__(self, on_declare=None) -> None:
        # (kind, body, declared bytes) -> None; may raise WireError (refusing that message)
        self._on_declare = on_declare
        self._pending: Assembled | None = None
        self._waiting: list[_Chunked] = []  # chunked tensors still to come
        self._skipping: int | None = None  # id of a refused message whose chunks are dropped

    def feed(self, frame: pb.ClientMessage) -> Assembled | None:
        """One frame in; a complete message out (or None while chunks are outstanding)."""
        kind = frame.WhichOneof("body")
        if kind is None:
            raise invalid(f"frame {frame.id}: body is empty, expected one")
        if kind == "chunk":
            if self._pending is None and self._skipping == frame.chunk.id:
                return None
            return self._chunk(frame)
        self._skipping = None
        if self._pending is not None:
            pending, self._pending, self._waiting = self._pending, None, []
            raise WireError(
                "INVALID_ARGUMENT",
                f"frame {frame.id}: a {kind} arrived while message {pending.id} still waits for "
                f"chunks; message {pending.id} is dropped",
                refused_id=pending.id,
                refeed=True,
            )
        if kind not in ("baseline", "report", "audit"):
            return Assembled(frame.id, kind, getattr(frame, kind), {}, frame.ByteSize())
        try:
            return self._declare(frame, kind)
        except WireError as exc:
            self._skipping = frame.id
            exc.refused_id = frame.id
            raise

    def _declare(self, frame: pb.ClientMessage, kind: str) -> Assembled | None:
        body = getattr(frame, kind)
        tensors = declared_tensors(body)
        sizes = [_declared_bytes(field, t) for field, t in tensors]
        if self._on_declare is not None:
            self._on_declare(kind, body, sum(sizes))
        msg = Assembled(frame.id, kind, body, {}, frame.ByteSize())
        waiting = []
        for (field, t), declared in zip(tensors, sizes, strict=True):
            if t.chunk_count == 0 or t.chunk_index != 0:
                raise invalid(
                    f"{field}: chunk_index {t.chunk_index} chunk_count {t.chunk_count} in the "
                    f"declaring frame, expected index 0 and count >= 1"
                )
            if t.data:
                if t.chunk_count != 1:
                    raise invalid(
                        f"{field}: inline data with chunk_count {t.chunk_count}, expected 1"
                    )
                msg.tensors[field] = decode_tensor(field, t, check_finite=False)
                continue
            if t.chunk_count != math.ceil(declared / MAX_CHUNK_BYTES):
                raise invalid(
                    f"{field}: chunk_count {t.chunk_count}, expected "
                    f"{math.ceil(declared / MAX_CHUNK_BYTES)} for {declared} bytes in 1 MiB chunks"
                )
            waiting.append((field, t, declared))
        if not waiting:
            return msg
        self._pending = msg
        self._waiting = [_Chunked(f, t, bytearray(n)) for f, t, n in waiting]
        return None

    def _chunk(self, frame: pb.ClientMessage) -> Assembled | None:
        c = frame.chunk
        if self._pending is None:
            raise invalid(f"chunk of {c.field[:100]!r} for message {c.id}: no message waits")
        try:
            return self._fill(frame)
        except WireError as exc:
            exc.refused_id, self._skipping = self._pending.id, self._pending.id
            self._pending, self._waiting = None, []
            raise

    def _fill(self, frame: pb.ClientMessage) -> Assembled | None:
        c, pending, w = frame.chunk, self._pending, self._waiting[0]
        where = f"chunk {c.chunk_index}/{c.chunk_count} of {c.field[:100]!r} (message {c.id})"
        if c.id != pending.id or frame.id != pending.id:
            raise invalid(f"{where}: expected message {pending.id}")
        if c.field != w.field:
            raise invalid(f"{where}: expected field {w.field!r}")
        if c.chunk_count != w.tensor.chunk_count or c.chunk_index != w.received:
            raise invalid(f"{where}: expected chunk {w.received}/{w.tensor.chunk_count}")
        if len(c.data) > MAX_CHUNK_BYTES:
            raise invalid(f"{where}: {len(c.data)} bytes, expected at most 1 MiB")
        last = w.received + 1 == w.tensor.chunk_count
        end = w.offset + len(c.data)
        if end > len(w.buffer) or (last and end != len(w.buffer)):
            raise invalid(
                f"{w.field}: {end} bytes, expected {len(w.buffer)} for {w.tensor.dtype} shape "
                f"{list(w.tensor.shape)} (after chunk {w.received})"
            )
        w.buffer[w.offset : end] = c.data
        w.offset, w.received = end, w.received + 1
        pending.nbytes += frame.ByteSize()
        if not last:
            return None
        pending.tensors[w.field] = decode_tensor(w.field, w.tensor, w.buffer, check_finite=False)
        self._waiting.pop(0)
        if self._waiting:
            return None
        msg, self._pending = pending, None
        return msg

    @property
    def incomplete(self) -> bool:
        return self._pending is not None


def _declared_bytes(field: str, t: pb.Tensor) -> int:
    dtypes = _AUDIT_DTYPES if field == AUDIT_FIELD else _DTYPES
    if t.dtype not in dtypes:
        raise invalid(f"{field}: dtype {t.dtype[:40]!r}, expected one of {sorted(dtypes)}")
    shape = list(t.shape)
    if not shape or len(shape) > 2 or any(s <= 0 for s in shape):
        raise invalid(f"{field}: shape {shape[:8]}, expected 1 or 2 positive dimensions")
    n = math.prod(shape) * np.dtype(dtypes[t.dtype][1]).itemsize
    if n > MAX_TENSOR_BYTES:
        raise invalid(
            f"{field}: {n} bytes declared (shape {shape}), expected at most {MAX_TENSOR_BYTES}"
        )
    return n


def _finite(field: str, t: torch.Tensor) -> None:
    if not finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise invalid(f"{field}: {bad} non-finite values, expected all finite")


def sketch_from(msg: Assembled, prefix: str, body: pb.Sketch) -> Sketch:
    """The tracker `Sketch` of a decoded message (prefix "update" or "weight")."""
    for name in SKETCH_FIELDS:
        _finite(f"{prefix}.{name}", msg.tensors[f"{prefix}.{name}"])
    check_number(f"{prefix}.convergence", body.convergence)
    return Sketch(
        G=msg.tensors[f"{prefix}.G"],
        C=msg.tensors[f"{prefix}.C"],
        convergence=float(body.convergence),
        power_steps=int(body.power_steps),
        exact=bool(body.exact),
    )


def check_from(msg: Assembled) -> MatrixCheck:
    """A decoded MatrixReport -> the tracker's `MatrixCheck`: every scalar in its range (the
    integers within signed 64 bits), every float and tensor finite, v_ref exactly on the locking
    check. The shapes against the manifest are the engine's question."""
    r: pb.MatrixReport = msg.body
    if len(r.shape) != 2 or any(s <= 0 for s in r.shape):
        raise invalid(f"report.shape: {list(r.shape)[:8]}, expected [m, n] positive")
    for name in ("step", "numel", "dropped_reports", *COUNT_FIELDS):
        check_int(f"report.{name}", getattr(r, name))
    if r.HasField("lock_step"):
        check_int("report.lock_step", r.lock_step, 0, r.step)
    for name in ("frobenius_sq", "channel_energy_sq"):
        check_number(f"report.{name}", getattr(r, name))
    if r.locked_now != r.HasField("v_ref"):
        raise invalid(
            f"report.v_ref: {'present' if r.HasField('v_ref') else 'absent'} with locked_now="
            f"{r.locked_now}, expected v_ref exactly on the check that locked"
        )
    if "v_ref" in msg.tensors:
        _finite("v_ref", msg.tensors["v_ref"])
    if r.locked_now and not r.HasField("lock_step"):
        raise invalid("report.lock_step: absent with locked_now=true")
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
        weight=sketch_from(msg, "weight", r.weight) if r.HasField("weight") else None,
        lock_step=int(r.lock_step) if r.HasField("lock_step") else None,
        locked_now=bool(r.locked_now),
        v_ref=msg.tensors.get("v_ref"),
    )


COUNT_FIELDS = ("visible_count", "visible_low_count", "visible_principal_count")


def audit_from(msg: Assembled) -> AuditPiece:
    """A decoded AuditBlock -> an `AuditPiece`: step and offsets within signed 64 bits, a 2-D
    float32 block, every value finite. Whether the block fits the matrix is the ingest's question (at
    declaration), whether it fits the other blocks the engine's."""
    a: pb.AuditBlock = msg.body
    for name in ("step", "row_offset", "col_offset", "skipped_audits"):
        check_int(f"audit.{name}", getattr(a, name))
    delta = msg.tensors.get(AUDIT_FIELD)
    if delta is None or delta.ndim != 2:
        raise invalid(f"audit.delta: {'missing' if delta is None else 'not 2-D'}, expected (h, w)")
    _finite(f"audit.{AUDIT_FIELD}", delta)
    return AuditPiece(a.matrix, int(a.step), int(a.row_offset), int(a.col_offset), delta)


@dataclass(frozen=True)
class HelloFields:
    """A hello's fields, each checked on its own (the engine checks them against the run)."""

    run: str
    incarnation: int
    resume_step: int | None
    config: dict
    manifest: list[ManifestEntry]
    rank: int
    channel_rank: int | None  # K from the hello's field; None: an older client did not send it
    oversample: int | None  # p likewise


def _sketch_field(hello: pb.Hello, field: str) -> int | None:
    """hello.channel_rank or hello.oversample in 1..`MAX_COLUMNS`; 0 (an older client that
    sends the setting only in config_json) is None."""
    value = int(getattr(hello, field))
    return check_int(f"hello.{field}", value, 1, MAX_COLUMNS) if value else None


def hello_from(hello: pb.Hello) -> HelloFields:
    """A Hello -> `HelloFields`: the run name, the incarnation (1..2⁶³−1), the resume step, the
    config (`config_from`), the manifest as `ManifestEntry`s (`check_manifest` is the engine's
    call, on its worker thread: a 100k-matrix manifest is checked off the event loop), the rank,
    K and p."""
    if not RUN_NAME.fullmatch(hello.run):
        raise invalid(f"hello.run: {hello.run[:200]!r}, expected a name matching {RUN_NAME_RULE}")
    check_int("hello.incarnation", hello.incarnation, 1)
    resume = None
    if hello.HasField("resume_step"):
        resume = check_int("hello.resume_step", hello.resume_step)
    if not 0 < len(hello.manifest) <= MAX_MATRICES:
        raise invalid(
            f"hello.manifest: {len(hello.manifest)} matrices, expected 1 to {MAX_MATRICES}"
        )
    return HelloFields(
        hello.run,
        int(hello.incarnation),
        resume,
        config_from(hello.config_json),
        manifest_from(hello),
        int(hello.rank),
        _sketch_field(hello, "channel_rank"),
        _sketch_field(hello, "oversample"),
    )


def manifest_from(hello: pb.Hello) -> list[ManifestEntry]:
    """The Hello's manifest as `ManifestEntry`s, as sent (`check_manifest` validates them)."""
    return [
        ManifestEntry(
            e.matrix,
            tuple(int(s) for s in e.shape),
            int(e.numel),
            e.dtype,
            int(e.layer) if e.HasField("layer") else None,
            e.module,
            e.shard_layout,
            int(e.owner_rank),
            int(e.expert) if e.HasField("expert") else None,
        )
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

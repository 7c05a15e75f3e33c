"""The live self-audit (DESIGN §2 audit tier, `Monitor(audit_every=N)`, docs/audit.md): a matrix's
full ΔW, assembled from the blocks its ranks sent, gives exact float64 keys to hold the live
estimates of the same (matrix, step) against.

Only the keys that need ΔW alone are audited (`AUDITED_KEYS`): ‖ΔW‖_F, σ1, the stable rank and the
top-K energy. The rotation and the spectral shift need W0 and W_t (the sidecar never has the
weights), the alignments need V_K of earlier checks, the counts need W0's bits and masks.

Each key's error is reported as a ratio to its stated bound (`STATED_BOUNDS`): 1 is the bound, so
an audit error ratio above 1 is a live estimate outside its stated accuracy (the `AuditError`
rule). The ΔW travels in float32 (4·m·n bytes), as the tracker forms it: in the bf16 view
D = f32(bf16(W_t)) − f32(bf16(W0)), the exact difference of two bf16 values (their 8-bit
significands fit float32's 24 unless the exponents are 16 apart), so the reference is the very
matrix the tracker iterates on. Rounding it to bf16 would not do: a difference is a bf16 number
only where the two values are within a factor 2 of each other (Sterbenz), and the toy trajectory
of tests/dist/toy.py, whose updates are as large as its small weights, showed a bf16-rounded ΔW
3.7e-4 off in ‖ΔW‖_F — over that key's 1e-4 bound.

`Auditor` holds the incomplete assemblies of every run (bounded in bytes and in age, evictions
counted), runs the float64 SVD of a complete one on its own worker thread (never the event loop,
never the ingest thread), stores the result (`Store.save_audit`, idempotent on (run, matrix, step))
and tells its listeners (the alert engine) the worst error ratio.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from deltawatch.client.records import AuditPiece
from deltawatch.client.sketch import DEFAULT_TOLERANCE

from .errors import FAILED_PRECONDITION, ValidationError, invalid
from .exact import spectrum_keys

log = logging.getLogger("deltawatch.audit")

AUDITED_KEYS = ("frobenius_norm", "spectral_norm", "stable_rank", "topk_energy_ratio")
# key -> ("relative" | "absolute", the stated bound): ‖ΔW‖_F is an exact statistic (issue 2's
# 1e-4); σ1 and the stable rank are reported only when their bound ≤ the tolerance; the top-K
# energy's accuracy is the measured one of docs/geometry.md (issue 2's 0.02).
STATED_BOUNDS = {
    "frobenius_norm": ("relative", 1e-4),
    "spectral_norm": ("relative", DEFAULT_TOLERANCE),
    "stable_rank": ("relative", DEFAULT_TOLERANCE),
    "topk_energy_ratio": ("absolute", 0.02),
}
# What the alert rule and the metric read: the worst ratio of an audit, and which key it is.
WORST_RATIO, WORST_KEY = "audit_error_ratio", "audit_key"
DEFAULT_MAX_BYTES = 1 << 30  # bytes of every incomplete assembly's blocks together
DEFAULT_TIMEOUT_S = 600.0  # an assembly missing a block this long is evicted
MAX_AWAITING = 10_000  # audits waiting for their check's report (the oldest forgotten)


class AuditError(ValueError):
    """A block that does not fit the matrix (names the field, what came, what was expected)."""


def check_block(matrix: str, shape: tuple[int, int], row: int, col: int, h: int, w: int) -> None:
    """An audit block of shape (h, w) at (row, col) lies inside the manifest's [m, n]."""
    m, n = shape
    if h <= 0 or w <= 0 or h > m or w > n:
        raise AuditError(
            f"audit of {matrix}: delta has shape [{h}, {w}], expected at most the manifest's "
            f"[{m}, {n}]"
        )
    if row < 0 or col < 0 or row + h > m or col + w > n:
        raise AuditError(
            f"audit of {matrix}: rows {row}:{row + h}, cols {col}:{col + w} lie outside the "
            f"matrix of shape [{m}, {n}]"
        )


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def assemble(
    shape: tuple[int, int], blocks: list[tuple[int, int, torch.Tensor]]
) -> torch.Tensor | None:
    """ΔW (float64, m×n) from (row offset, column offset, block) pieces, or None while some entry
    is not yet covered. A piece outside the matrix or overlapping another is refused."""
    m, n = shape
    D = torch.zeros((m, n), dtype=torch.float64)
    covered = torch.zeros((m, n), dtype=torch.bool)
    for row, col, block in blocks:
        if block.ndim != 2:
            raise AuditError(f"audit block: tensor has shape {list(block.shape)}, expected 2-D")
        h, w = block.shape
        check_block("audit block", shape, row, col, h, w)
        if covered[row : row + h, col : col + w].any():
            raise AuditError(
                f"audit block: rows {row}:{row + h}, cols {col}:{col + w} overlap a block "
                f"already received"
            )
        D[row : row + h, col : col + w] = block.double()
        covered[row : row + h, col : col + w] = True
    return D if bool(covered.all()) else None


def exact_update_keys(D: torch.Tensor, rank: int) -> dict[str, float | None]:
    """The audited keys of ΔW from its float64 singular values (LAPACK, no vectors; sidecar/exact.py
    `spectrum_keys`): ‖ΔW‖_F, σ1, ‖ΔW‖_F²/σ1², Σ_{i≤K}σ_i²/‖ΔW‖_F² (None where DESIGN §2 says
    null: ΔW = 0). Cost O(m·n·min(m, n))."""
    frob_sq = float(D.double().square().sum())
    keys: dict[str, float | None] = dict.fromkeys(AUDITED_KEYS)
    keys["frobenius_norm"] = math.sqrt(frob_sq)
    if frob_sq == 0:
        keys["spectral_norm"] = 0.0
        return keys
    keys.update(spectrum_keys(torch.linalg.svdvals(D.double()), frob_sq, rank))
    return keys


def error_ratios(live: dict, exact: dict) -> dict[str, float]:
    """|live − exact| / stated bound per audited key (relative keys: over |exact|); keys null on
    either side are left out."""
    out = {}
    for key in AUDITED_KEYS:
        value, ref = live.get(key), exact.get(key)
        if value is None or ref is None:
            continue
        kind, bound = STATED_BOUNDS[key]
        error = abs(float(value) - ref)
        if kind == "relative":
            if ref == 0:
                continue
            error /= abs(ref)
        out[key] = error / bound
    return out


def audit_keys(live: dict | None, exact: dict, ratios: dict) -> dict[str, dict[str, Any]]:
    """Per audited key: the live value, the exact one, the error (relative or absolute, as the
    bound), the bound and the error ratio (the API's `audit` block)."""
    out = {}
    for key in AUDITED_KEYS:
        kind, bound = STATED_BOUNDS[key]
        ratio = ratios.get(key)
        out[key] = {
            "live": None if live is None else live.get(key),
            "exact": exact.get(key),
            "error": None if ratio is None else ratio * bound,
            "error_kind": kind,
            "bound": bound,
            "error_ratio": ratio,
        }
    return out


@dataclass
class Assembly:
    """The blocks of one (run, incarnation, matrix, step) received so far."""

    shape: tuple[int, int]
    started: float
    blocks: dict[tuple[int, int, int, int], torch.Tensor] = field(default_factory=dict)
    covered: int = 0  # entries covered (blocks never overlap)
    nbytes: int = 0


Key = tuple[str, int, str, int]  # (run, incarnation, matrix, step)


class Auditor:
    """Assembles audit blocks, computes and stores the audits (see the module docstring).
    `add` is called on the ingest's worker thread; the SVD runs on the auditor's own thread."""

    def __init__(
        self,
        store: Any,
        manifest: Callable[[str], list | None],
        channel_rank: Callable[[str], int],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self._manifest = manifest
        self._channel_rank = channel_rank
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: collections.OrderedDict[Key, Assembly] = collections.OrderedDict()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="deltawatch-audit"
        )
        self._listeners: list[Callable[[str, str, int, dict], Any]] = []
        # audits stored before their check's report: (run, matrix, step) -> exact keys
        self._awaiting: collections.OrderedDict[tuple[str, str, int], dict] = (
            collections.OrderedDict()
        )
        self.evicted = 0  # incomplete assemblies dropped (timeout or memory cap)
        self.completed = 0  # audits computed and stored
        self.failed = 0  # audits whose computation failed (logged)
        self.skipped: collections.Counter[str] = collections.Counter()  # run -> client skips
        self.last_seconds = 0.0  # the latest audit's float64 SVD time

    def subscribe(self, callback: Callable[[str, str, int, dict], Any]) -> None:
        """Call `callback(run, matrix, step, {WORST_RATIO, WORST_KEY})` after each stored audit
        with at least one ratio (the alert engine's `observe`)."""
        self._listeners.append(callback)

    @property
    def pending_bytes(self) -> int:
        with self._lock:
            return sum(a.nbytes for a in self._pending.values())

    def pending(self, run: str | None = None) -> int:
        """Incomplete assemblies (of `run`, or all)."""
        with self._lock:
            return sum(1 for k in self._pending if run is None or k[0] == run)

    # -- ingest thread ------------------------------------------------------------------------

    def add(self, run: str, incarnation: int, piece: AuditPiece, skipped: int = 0) -> bool:
        """Hold one block; True when it was new, False for a duplicate (a resent block, a block
        of an audit already stored). When the blocks cover the matrix, its audit is computed on
        the auditor's thread. Raises ValidationError (nothing held) for a block that does not fit
        the manifest or the blocks already held, or that the memory cap cannot hold."""
        entry = next((e for e in self._manifest(run) or () if e.matrix == piece.matrix), None)
        if entry is None:
            raise invalid(f"audit.matrix: {piece.matrix[:200]!r} is not in the manifest of {run!r}")
        shape = tuple(entry.shape)
        h, w = piece.delta.shape
        rect = (piece.row_offset, piece.col_offset, h, w)
        try:
            check_block(piece.matrix, shape, *rect)
        except AuditError as exc:
            raise invalid(str(exc)) from None
        if self.store.has_audit(run, piece.matrix, piece.step):
            return False
        key = (run, incarnation, piece.matrix, piece.step)
        nbytes = piece.delta.element_size() * h * w
        with self._lock:
            self._evict_expired()
            a = self._pending.get(key)
            if a is not None and rect in a.blocks:
                return False
            if a is not None:
                other = next((r for r in a.blocks if _overlaps(r, rect)), None)
                if other is not None:
                    raise invalid(
                        f"audit of {piece.matrix} step {piece.step}: rows {rect[0]}:{rect[0] + h}, "
                        f"cols {rect[1]}:{rect[1] + w} overlap the block at rows "
                        f"{other[0]}:{other[0] + other[2]}, cols {other[1]}:{other[1] + other[3]}"
                    )
            self._make_room(key, nbytes, piece)
            if a is None:
                a = self._pending[key] = Assembly(shape, self._clock())
            self.skipped[run] += skipped
            a.blocks[rect] = piece.delta
            a.covered += h * w
            a.nbytes += nbytes
            if a.covered < shape[0] * shape[1]:
                return True
            del self._pending[key]
        self._executor.submit(self._audit, key, a)
        return True

    def _evict_expired(self) -> None:
        now = self._clock()
        for key in [k for k, a in self._pending.items() if now - a.started > self.timeout_s]:
            del self._pending[key]
            self.evicted += 1
            log.warning("audit of %s/%s step %d: a block never came; evicted", key[0], *key[2:])

    def _make_room(self, key: Key, nbytes: int, piece: AuditPiece) -> None:
        """Evict the oldest other assemblies until `nbytes` more fit the cap (counted); refuse a
        block the cap cannot hold at all."""
        held = self._pending[key].nbytes if key in self._pending else 0
        if held + nbytes > self.max_bytes:
            raise ValidationError(
                FAILED_PRECONDITION,
                f"audit of {piece.matrix}: {held + nbytes} bytes of blocks, over the sidecar's "
                f"audit memory cap of {self.max_bytes} bytes; audit smaller matrices",
            )
        total = sum(a.nbytes for a in self._pending.values())
        while total + nbytes > self.max_bytes:
            oldest = next(k for k in self._pending if k != key)
            total -= self._pending.pop(oldest).nbytes
            self.evicted += 1
            log.warning("audit of %s/%s step %d evicted (memory cap)", oldest[0], *oldest[2:])

    # -- the auditor's thread -----------------------------------------------------------------

    def _audit(self, key: Key, a: Assembly) -> None:
        run, incarnation, matrix, step = key
        try:
            blocks = [(r[0], r[1], t) for r, t in a.blocks.items()]
            start = time.perf_counter()
            D = assemble(a.shape, blocks)
            exact = exact_update_keys(D, self._channel_rank(run))
            seconds = time.perf_counter() - start
            with self._lock:  # against on_check: the live check is read, or awaited, not both
                live = self.store.check_keys(run, matrix, step)
                ratios = error_ratios(live or {}, exact)
                live_keys = {k: (live or {}).get(k) for k in AUDITED_KEYS}
                stored = self.store.save_audit(
                    run, matrix, step, incarnation, seconds, exact, live_keys, ratios
                )
                if stored and live is None:
                    self._awaiting[(run, matrix, step)] = exact
                    while len(self._awaiting) > MAX_AWAITING:
                        self._awaiting.popitem(last=False)
        except Exception:
            self.failed += 1
            log.exception("the audit of %s/%s step %d failed", run, matrix, step)
            return
        self.completed += 1
        self.last_seconds = seconds
        if stored:
            self._tell(run, matrix, step, ratios)

    def on_check(self, run: str, matrix: str, step: int, keys: dict[str, Any]) -> None:
        """The engine's listener after every stored check: an audit that completed before the
        report of its check was stored (the owner's block may be empty, so another rank's block
        can complete it first) gets its live keys and ratios now."""
        with self._lock:
            exact = self._awaiting.pop((run, matrix, step), None)
            if exact is None:
                return
            ratios = error_ratios(keys, exact)
            live = {k: keys.get(k) for k in AUDITED_KEYS}
            self.store.set_audit_live(run, matrix, step, live, ratios)
        self._tell(run, matrix, step, ratios)

    def _tell(self, run: str, matrix: str, step: int, ratios: dict[str, float]) -> None:
        """The listeners get the audit's worst ratio (nothing when no key has one)."""
        if not ratios:
            return
        worst = max(ratios, key=ratios.get)
        for cb in list(self._listeners):
            try:
                cb(run, matrix, step, {WORST_RATIO: ratios[worst], WORST_KEY: worst})
            except Exception:
                log.exception("audit listener %r failed on %s/%s step %d", cb, run, matrix, step)

    def latest(self, run: str) -> dict[str, Any]:
        """The API's `audit` block of a run: each matrix's latest audit with, per key, the live
        value, the exact one, the error, the bound and their ratio; the run's incomplete
        assemblies and the audits its clients skipped."""
        items = []
        for row in self.store.latest_audits(run):
            items.append(
                {
                    "matrix": row["matrix"],
                    "step": row["step"],
                    "seconds": row["seconds"],
                    "keys": audit_keys(row["live"], row["exact"], row["ratios"]),
                }
            )
        return {"matrices": items, "pending": self.pending(run), "skipped": self.skipped[run]}

    def drain(self, timeout: float | None = None) -> None:
        """Wait for the audits being computed (shutdown, tests)."""
        self._executor.submit(lambda: None).result(timeout)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

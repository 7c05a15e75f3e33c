"""The sidecar's engine: runs, manifests, one `MatrixGeometry` per matrix, run aggregates.

Write side (called by the gRPC ingest from one worker thread, never on the event loop):
`hello`, `baseline`, `ingest`, `record_dropped`. Every method validates first and raises
`ValidationError` without changing anything; `ingest` returns only after the store committed the
check (persist, then acknowledge).

Read side (HTTP, metrics, alerts): `runs`, `run_detail`, `history`, `latest`, `aggregate`,
`dropped_reports`. Readers see immutable `MatrixRow`s published after each commit; they never
wait on linear algebra or on an fsync.

Resume (DESIGN §5): a hello with a newer incarnation and resume step s hides the older
incarnations' history from step s on (the store's visibility rule), drops lock references taken at
or after s, and rewinds each matrix's geometry to its state before s (log-spaced V_K snapshots
before s are kept in the store for exactly this).

Run aggregates (DESIGN §2): count ratios pooled over matrices, i.e. weighted by parameter count:
bf16_visible_ratio = Σ visible / Σ numel, low_magnitude_overlap = Σ |M_vis ∩ M_low| / Σ |M_vis|,
principal_overlap likewise; geometry keys as the plain mean over matrices, ignoring nulls;
locked_ratio = share of reported matrices that are locked; lock_step = median lock step over
locked matrices; convergence = the worst (largest) error bound.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from deltawatch.client import wire
from deltawatch.client.config import RUN_NAME, RUN_NAME_RULE
from deltawatch.client.records import ManifestEntry
from deltawatch.client.schedule import cycle_label

from .alerts.state import rfc3339
from .audit import Auditor
from .errors import RETRYABLE, ValidationError, invalid, precondition
from .geometry import MatrixGeometry, baseline_pairs, ingest_batch, stored_channel_rank
from .keys import MATRIX_KEYS
from .store import CheckCounts, CheckWrite, StateUpdate, Store

log = logging.getLogger("deltawatch.engine")


# Count ratios pooled over matrices: key -> (numerator count, denominator count).
POOLED_KEYS: dict[str, tuple[str, str]] = {
    "bf16_visible_ratio": ("visible_count", "numel"),
    "low_magnitude_overlap": ("visible_low_count", "visible_count"),
    "principal_overlap": ("visible_principal_count", "visible_count"),
}
# Geometry keys averaged over matrices (plain mean, nulls ignored): the §2 keys but the pooled
# ratios and those `aggregate_rows` takes otherwise (locked share, median lock step, worst bound).
MEAN_KEYS: tuple[str, ...] = tuple(
    k for k in MATRIX_KEYS if k not in {*POOLED_KEYS, "locked", "lock_step", "convergence"}
)
# A run has a share of locked matrices (`locked_ratio`), not a `locked` flag.
AGGREGATE_KEYS: tuple[str, ...] = (*(k for k in MATRIX_KEYS if k != "locked"), "locked_ratio")

Listener = Callable[[str, str, int, dict[str, Any]], None]


@dataclass(frozen=True)
class HelloResult:
    """What the sidecar tells a trainer after its hello."""

    run: str
    incarnation: int
    created: bool  # the run was new
    lock_references: dict[str, tuple[int, torch.Tensor]]  # matrix -> (lock_step, V_ref (n, K))
    last_steps: dict[str, int]  # matrix -> its last visible step
    channel_rank: int  # the run's K


@dataclass(frozen=True)
class MatrixRow:
    """A matrix's latest visible check, as readers see it."""

    run: str
    matrix: str
    layer: int | None
    module: str
    shape: tuple[int, int]
    numel: int
    step: int
    incarnation: int
    visible_count: int
    visible_low_count: int
    visible_principal_count: int
    keys: Mapping[str, Any]
    expert: int | None = None  # the MoE expert index (DESIGN §2 "Experts"), else None


@dataclass
class _Matrix:
    entry: ManifestEntry
    geometry: Any  # MatrixGeometry
    last_step: int | None = None
    persisted: dict[str, torch.Tensor] = field(default_factory=dict)  # state tensors as stored
    archived: set[int] = field(default_factory=set)  # steps of the archived V_K snapshots (store)


@dataclass(frozen=True)
class _Prepared:
    """An admitted check as the store will write it, and the matrix's persisted state after."""

    write: CheckWrite
    tensors: dict[str, torch.Tensor]  # the state tensors as stored once it is committed
    archived: set[int]


@dataclass
class _Run:
    name: str
    created_at: float
    updated_at: float
    config: dict[str, Any]
    incarnation: int
    manifest: dict[str, ManifestEntry]
    matrices: dict[str, _Matrix]
    rows: dict[str, MatrixRow]
    dropped: int = 0
    version: int = 0  # counts the changes of `rows` (the cached aggregate's key)
    aggregate_cache: tuple[int, dict[str, Any]] | None = None


def resolve_device(device: str) -> torch.device:
    """ "cpu", "cuda" (refused when CUDA is absent) or "auto" (CUDA when available)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available; use cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {device!r}")
    return torch.device(device)


def json_value(v: Any) -> Any:
    """A key value as JSON wants it: finite float, int, bool or None (non-finite -> None)."""
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, bool) or v is None or isinstance(v, int):
        return v
    v = float(v)
    return v if math.isfinite(v) else None


def aggregate_rows(rows: Iterable[MatrixRow]) -> dict[str, Any]:
    """Run aggregates of DESIGN §2 over matrices' latest checks (see the module docstring)."""
    rows = list(rows)
    out: dict[str, Any] = {}
    for key in MEAN_KEYS:
        values = [float(r.keys[key]) for r in rows if r.keys.get(key) is not None]
        out[key] = math.fsum(values) / len(values) if values else None
    for key, (num, den) in POOLED_KEYS.items():
        n = sum(getattr(r, num) for r in rows)
        d = sum(getattr(r, den) for r in rows)
        out[key] = n / d if d else None
    locked = [r for r in rows if r.keys.get("locked")]
    out["locked_ratio"] = len(locked) / len(rows) if rows else None
    lock_steps = [r.keys["lock_step"] for r in locked if r.keys.get("lock_step") is not None]
    out["lock_step"] = statistics.median(lock_steps) if lock_steps else None
    conv = [float(r.keys["convergence"]) for r in rows if r.keys.get("convergence") is not None]
    out["convergence"] = max(conv) if conv else None
    return {k: out[k] for k in AGGREGATE_KEYS}


def run_channel_rank(config: Mapping[str, Any], default: int) -> int:
    """K of a run: its config's `channel_rank` (the hello's field, recorded there, or an older
    client's config_json value), else the engine's default."""
    k = config.get("channel_rank", default)
    return k if isinstance(k, int) and not isinstance(k, bool) and k > 0 else default


# State tensors named archive.<step>: every log-spaced V_K snapshot ever taken (O(log T) per
# matrix), kept so a resume can give the lock state back the snapshots before its resume step.
ARCHIVE = "archive."
# The lock state's live snapshots (n×K each) and their steps, as MatrixGeometry.state() names them.
SNAPSHOT_V, SNAPSHOT_STEP = "lock.snapshot_V", "lock.snapshot_step"


class Engine:
    """Runs, manifests and per-matrix geometry, backed by a `Store` (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        channel_rank: int = 16,
        tolerance: float | None = None,
        device: str = "cpu",
    ) -> None:
        self.store = store
        self.channel_rank = channel_rank
        self.tolerance = tolerance
        self.device = resolve_device(device)
        self._write = threading.RLock()  # serialises hello / baseline / ingest / record_dropped
        self._view = threading.Lock()  # guards the published rows readers see
        self._runs: dict[str, _Run] = {}
        self.quarantined: dict[str, str] = {}  # run -> why its stored rows could not be loaded
        self._listeners: list[Listener] = []
        self._load()
        # the live self-audit's assemblies, exact keys and results (sidecar/audit.py)
        self.audit = Auditor(store, self.manifest, self.run_channel_rank)
        self.subscribe(self.audit.on_check)

    # ---------------------------------------------------------------- start-up

    def _load(self) -> None:
        """Rebuild every run from the store (kill -9 safe: the store only holds committed data).
        A run whose rows cannot be loaded is quarantined (logged, in `quarantined`), never a
        crash: the other runs serve, and a hello for a quarantined run is refused."""
        for rec in self.store.runs():
            name = rec["run"]
            try:
                self._runs[name] = self._load_run(rec)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"[:500]
                self.quarantined[name] = reason
                log.error("run %r quarantined: its stored rows cannot be loaded (%s)", name, reason)

    def _load_run(self, rec: dict[str, Any]) -> _Run:
        name = rec["run"]
        if rec["config_error"] is not None:
            raise ValueError(f"stored config: {rec['config_error']}")
        config = self._checked(wire.check_config, dict(rec["config"]))
        entries = [ManifestEntry(**m) for m in self.store.manifest(name)]
        manifest = {e.matrix: e for e in self._checked(wire.check_manifest, entries)}
        incs = self.store.incarnations(name)
        run = _Run(
            name=name,
            created_at=rec["created_at"],
            updated_at=rec["updated_at"],
            config=config,
            incarnation=incs[-1][0] if incs else 0,
            manifest=manifest,
            matrices={},
            rows={},
            dropped=rec["dropped_reports"],
        )
        states = self.store.load_states(name)
        latest = self.store.latest(name)
        for matrix, entry in manifest.items():
            mat = _Matrix(entry, self._geometry(entry, run.config))
            if matrix in states:
                self._adopt_state(mat, states[matrix][2], states[matrix][3])
            if matrix in latest:
                mat.last_step = latest[matrix].step
            run.matrices[matrix] = mat
        run.rows = {m: self._row(run, h) for m, h in latest.items() if m in manifest}
        # A resume whose hello was persisted but whose rewind was not (killed in between):
        # the geometry state of an older incarnation still reaches the resume step.
        resume_step = incs[-1][1] if incs else None
        if resume_step is not None:
            stale = [
                m
                for m, (inc, last, _, _) in states.items()
                if m in manifest
                and inc < run.incarnation
                and last is not None
                and last >= resume_step
            ]
            if stale:
                self._rewind(run, resume_step, stale)
        return run

    @staticmethod
    def _checked(check: Callable, value: Any) -> Any:
        """A wire-level check (`deltawatch.client.wire`) as the engine's ValidationError."""
        try:
            return check(value)
        except wire.WireError as exc:
            raise ValidationError(exc.code, exc.message) from None

    # ---------------------------------------------------------------- listeners

    def subscribe(self, callback: Listener) -> Callable[[], None]:
        """Call `callback(run, matrix, step, keys)` after every persisted check (on the ingest
        thread; exceptions are logged, never raised into ingest). Returns an unsubscribe."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def _emit(self, run: str, matrix: str, step: int, keys: dict[str, Any]) -> None:
        for cb in list(self._listeners):
            try:
                cb(run, matrix, step, dict(keys))
            except Exception:
                log.exception("listener %r failed on %s/%s step %d", cb, run, matrix, step)

    # ---------------------------------------------------------------- write side

    def hello(
        self,
        run: str,
        incarnation: int,
        resume_step: int | None,
        manifest: list[ManifestEntry],
        config: dict,
        channel_rank: int | None = None,
    ) -> HelloResult:
        """Register a run (or a new incarnation of one) with its manifest and config.

        K is the hello's `channel_rank` field; when it is None (an older client), the config's
        `channel_rank`, else the engine's default. The run's stored config records a field's K.
        Refused (nothing changes): a bad run name or manifest (INVALID_ARGUMENT); an incarnation
        older than the run's latest, a K other than the run's, or a matrix whose shape differs
        from the run's first hello (FAILED_PRECONDITION). A newer incarnation with resume step s
        rewinds the run to s."""
        _check_run_name(run)
        self._checked(lambda v: wire.check_int("hello.incarnation", v, 1), incarnation)
        if resume_step is not None:
            self._checked(lambda v: wire.check_int("hello.resume_step", v), resume_step)
        entries = self._checked(wire.check_manifest, manifest)
        config = self._checked(wire.check_config, dict(config))
        if channel_rank is not None:
            config["channel_rank"] = self._checked(
                lambda v: wire.check_int("hello.channel_rank", v, 1, wire.MAX_COLUMNS), channel_rank
            )
        if run in self.quarantined:
            raise precondition(
                f"run {run}: its stored rows could not be loaded at start-up "
                f"({self.quarantined[run]}); it is quarantined, use a new run name"
            )
        with self._write:
            old = self._runs.get(run)
            if old is not None:
                if incarnation < old.incarnation:
                    raise precondition(
                        f"run {run}: hello from incarnation {incarnation}, but incarnation "
                        f"{old.incarnation} has already said hello; a restarted trainer uses a "
                        "newer incarnation"
                    )
                k_old = run_channel_rank(old.config, self.channel_rank)
                k_new = run_channel_rank(config, self.channel_rank)
                if k_old != k_new:
                    raise precondition(
                        f"run {run}: the hello's channel_rank (K) is {k_new}, but the run was "
                        f"started with K = {k_old}; K must stay the same within a run (use a new "
                        "run name)"
                    )
                for e in entries:
                    known = old.manifest.get(e.matrix)
                    if known is not None and tuple(known.shape) != tuple(e.shape):
                        raise precondition(
                            f"run {run}: matrix {e.matrix} has shape {list(e.shape)} in this "
                            f"hello, but {list(known.shape)} since the run's first hello; "
                            "use a new run name for a different model"
                        )
            now = time.time()
            if not _same_hello(old, incarnation, config, entries):  # a reconnect writes nothing
                self.store.save_hello(run, incarnation, resume_step, config, entries, now=now)
            created = old is None
            if old is None:
                old = _Run(run, now, now, dict(config), incarnation, {}, {}, {})
            r = old
            new = {
                e.matrix: _Matrix(e, self._geometry(e, config))
                for e in entries
                if e.matrix not in r.manifest
            }
            newer = incarnation > r.incarnation
            with self._view:  # readers iterate the manifest under this lock
                r.config = dict(config)
                r.incarnation = incarnation
                for e in entries:
                    r.manifest[e.matrix] = e
                    if e.matrix in new:
                        r.matrices[e.matrix] = new[e.matrix]
                    else:
                        r.matrices[e.matrix].entry = e
            if newer and resume_step is not None and not created:
                self._rewind(r, resume_step)
            with self._view:
                self._runs[run] = r
            return HelloResult(
                run=run,
                incarnation=incarnation,
                created=created,
                lock_references=self.store.lock_refs(run),
                last_steps={
                    m: x.last_step for m, x in r.matrices.items() if x.last_step is not None
                },
                channel_rank=run_channel_rank(r.config, self.channel_rank),
            )

    def _geometry(self, entry: ManifestEntry, config: Mapping[str, Any]) -> MatrixGeometry:
        return MatrixGeometry(
            tuple(entry.shape),
            channel_rank=run_channel_rank(config, self.channel_rank),
            alpha=wire.config_value(config, "alpha"),
            tolerance=self.tolerance,
            device=self.device,
        )

    def _adopt_state(self, mat: _Matrix, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Load a matrix's geometry from its stored state: the lock's live snapshots come from
        the archive (they are stored once, as archive.<step>), the rest as the geometry wrote it.
        Archived snapshots are not kept in memory afterwards (only their steps)."""
        live = {k: v for k, v in tensors.items() if not k.startswith(ARCHIVE)}
        archive = {int(k[len(ARCHIVE) :]): v for k, v in tensors.items() if k.startswith(ARCHIVE)}
        stored = dict(live)  # a stored SNAPSHOT_V (older layout) is deleted on the next write
        steps = [int(s) for s in live[SNAPSHOT_STEP].tolist()] if SNAPSHOT_STEP in live else None
        if steps is not None and all(s in archive for s in steps):
            n, k = mat.entry.shape[1], int(meta.get("lock", {}).get("k", stored_channel_rank(meta)))
            live[SNAPSHOT_V] = (
                torch.stack([archive[s] for s in steps]) if steps else torch.zeros((0, n, k))
            )
        mat.geometry = MatrixGeometry.from_state(live, meta, self.device)
        mat.persisted = stored
        mat.archived = set(archive)

    def _state_update(
        self, mat: _Matrix, drop_from: int | None = None
    ) -> tuple[StateUpdate, dict[str, torch.Tensor], set[int]]:
        """What to write for a matrix's geometry state: the JSON half, the tensors that changed,
        each newly taken V_K snapshot as archive.<step> (written once, kept until a rewind to a
        step at or before it: `drop_from`), and what was removed. Returns the update, the
        non-archive tensors as they will be stored, and the archived steps."""
        tensors, meta = mat.geometry.state(snapshots=False)  # archived instead: not twice
        changed = {k: t for k, t in tensors.items() if not _same(mat.persisted.get(k), t)}
        removed = [k for k in mat.persisted if k not in tensors]
        archived = set(mat.archived)
        if drop_from is not None:
            dropped = {s for s in archived if s >= drop_from}
            removed += [f"{ARCHIVE}{s}" for s in sorted(dropped)]
            archived -= dropped
        for _, step, V in mat.geometry.horizon.snapshots:
            if step not in archived:
                changed[f"{ARCHIVE}{step}"] = V.detach().to("cpu")
                archived.add(step)
        return StateUpdate(meta, changed, tuple(removed)), tensors, archived

    def _persisted(self, mat: _Matrix, tensors: dict[str, torch.Tensor], archived: set[int]):
        mat.persisted, mat.archived = tensors, archived

    def _reload_matrix(self, run: str, mat: _Matrix) -> None:
        """After a failed commit: the geometry back to what the store holds."""
        r = self._runs[run]
        mat.geometry = self._geometry(mat.entry, r.config)
        mat.persisted, mat.archived = {}, set()
        saved = self.store.load_states(run, mat.entry.matrix, writer=True).get(mat.entry.matrix)
        if saved is not None:
            self._adopt_state(mat, saved[2], saved[3])

    def _rewind(self, r: _Run, resume_step: int, matrices: list[str] | None = None) -> None:
        """Make the run's state what it was before `resume_step`: the store hides the older
        incarnations' history from it on and drops later lock references; each matrix's lock
        state gets back its check count and the archived V_K snapshots taken before it, so the
        horizon of the resumed checks is the one an uninterrupted run would have had."""
        self.store.rewind(r.name, resume_step)
        latest = self.store.latest(r.name)
        if matrices is None:
            matrices = [
                m
                for m, x in r.matrices.items()
                if x.last_step is not None and x.last_step >= resume_step
            ]
        for name in matrices:
            mat = r.matrices[name]
            visible = self.store.history(r.name, name)
            archive = self.store.load_tensors(r.name, name, prefix=ARCHIVE)
            archive = {int(k[len(ARCHIVE) :]): t for k, t in archive.items()}
            rewind_geometry(mat.geometry, resume_step, visible, archive)
            mat.last_step = latest[name].step if name in latest else None
            update, tensors, archived = self._state_update(mat, drop_from=resume_step)
            self.store.save_states([(r.name, name, r.incarnation, mat.last_step, update)])
            self._persisted(mat, tensors, archived)
        with self._view:
            r.rows = {m: self._row(r, h) for m, h in latest.items() if m in r.manifest}
            r.version += 1

    def _matrix_for(
        self, run: str, incarnation: int, matrix: str, what: str
    ) -> tuple[_Run, _Matrix]:
        r = self._runs.get(run)
        if r is None:
            raise precondition(f"{what} for run {run!r} before its hello")
        if incarnation != r.incarnation:
            rel = "older" if incarnation < r.incarnation else "newer"
            raise precondition(
                f"run {run}: {what} from incarnation {incarnation}, {rel} than the incarnation "
                f"that said hello last ({r.incarnation})"
            )
        mat = r.matrices.get(matrix)
        if mat is None:
            raise invalid(
                f"run {run}: {what} names matrix {matrix!r}, which is not in the run's manifest "
                f"({len(r.manifest)} matrices)"
            )
        return r, mat

    def baseline(self, run: str, incarnation: int, matrix: str, sketch: Any) -> None:
        """W0's Ritz data for the W_t tracker of one matrix (sent once per incarnation):
        `baseline_many` of one."""
        (result,) = self.baseline_many([(run, incarnation, matrix, sketch)])
        if isinstance(result, ValidationError):
            raise result

    def baseline_many(
        self, items: Iterable[tuple[str, int, str, Any]]
    ) -> list[bool | ValidationError]:
        """Group commit of baselines ((run, incarnation, matrix, sketch) items): True when
        stored, or the ValidationError refusing it. Their Rayleigh–Ritz is batched over the
        sketches of one shape (sidecar/geometry.py `baseline_pairs`) and their states written in
        one transaction (`Store.save_states`). When the store cannot write, every item gets the
        retryable error and its matrix goes back to what the store holds. (An MoE model's first
        hello brings tens of thousands of baselines: one fsync each would take minutes.)"""
        items = list(items)
        results: list[bool | ValidationError] = [True] * len(items)
        with self._write:
            admitted: list[tuple[int, _Matrix]] = []
            for i, (run, incarnation, matrix, sketch) in enumerate(items):
                try:
                    _, mat = self._matrix_for(run, incarnation, matrix, "baseline")
                    _check_sketch(f"matrix {matrix}: baseline", sketch, mat.entry.shape[1])
                except ValidationError as e:
                    results[i] = e
                    continue
                admitted.append((i, mat))
            pairs = baseline_pairs([(mat.geometry, items[i][3]) for i, mat in admitted])
            updates = []
            for (i, mat), p in zip(admitted, pairs, strict=True):
                run, incarnation, matrix, sketch = items[i]
                try:
                    mat.geometry.baseline(sketch, p)
                    updates.append((i, mat, *self._state_update(mat)))
                except Exception as e:
                    self._reload_matrix(run, mat)
                    if not isinstance(e, (ValueError, RuntimeError)):
                        raise
                    results[i] = invalid(f"matrix {matrix}: baseline refused: {e}")
            try:
                self.store.save_states(
                    [(items[i][0], mat.entry.matrix, items[i][1], mat.last_step, update)
                     for i, mat, update, _, _ in updates]
                )  # fmt: skip
            except ValidationError as e:
                if e.code not in RETRYABLE:
                    raise
                for i, mat, *_ in updates:
                    self._reload_matrix(items[i][0], mat)
                return [r if isinstance(r, ValidationError) else e for r in results]
            for _, mat, _, tensors, archived in updates:
                self._persisted(mat, tensors, archived)
        return results

    def ingest(self, run: str, incarnation: int, check: Any, dropped: int = 0) -> bool:
        """Validate, compute the §2 keys, persist; True when stored, False for a duplicate
        (run, matrix, step, incarnation), which is acknowledged but changes nothing. `dropped`:
        the client's count of reports it dropped, added to the run's total with the check."""
        (result,) = self.ingest_many([(run, incarnation, check, dropped)])
        if isinstance(result, ValidationError):
            raise result
        return result

    def ingest_many(
        self, items: Iterable[tuple[str, int, Any, int]]
    ) -> list[bool | ValidationError]:
        """Group commit: (run, incarnation, check, dropped) items in one store transaction, so
        they share one COMMIT (one fsync). Each item is a SAVEPOINT: a refused one (its
        ValidationError in the result) rolls back alone. When the store cannot write (disk full,
        locked), every item that was to be stored gets the retryable error and the touched
        matrices go back to what the store holds. Readers and listeners see the checks only
        after the commit.

        The geometry of the batch is computed in waves (`_waves`: runs of items that name each
        matrix once), each wave's Rayleigh–Ritz batched over its sketches of one shape
        (sidecar/geometry.py `ingest_batch`); a matrix's later check in the batch sees the
        state its earlier one left."""
        items = list(items)
        results: list[bool | ValidationError | None] = [None] * len(items)
        published: list[tuple[_Run, MatrixRow, int]] = []
        touched: dict[tuple[str, str], tuple[_Matrix, int | None]] = {}
        now = time.time()  # the batch's received_at and the runs' updated_at
        with self._write:
            try:
                with self.store.transaction():
                    for wave in _waves(items):
                        self._ingest_wave(items, wave, results, published, touched, now)
            except ValidationError as e:
                if e.code not in RETRYABLE:
                    raise
                for (run, _), (mat, last_step) in touched.items():
                    self._reload_matrix(run, mat)
                    mat.last_step = last_step
                return [r if isinstance(r, ValidationError) else e for r in results]
            with self._view:
                for r, row, dropped in published:
                    r.rows[row.matrix] = row
                    r.version += 1
                    r.updated_at = now
                    r.dropped += dropped
        for r, row, _ in published:
            self._emit(r.name, row.matrix, row.step, dict(row.keys))
        return results  # type: ignore[return-value]  # every item has its result now

    def _ingest_wave(
        self,
        items: list[tuple[str, int, Any, int]],
        wave: list[int],
        results: list[bool | ValidationError | None],
        published: list[tuple[_Run, MatrixRow, int]],
        touched: dict[tuple[str, str], tuple[_Matrix, int | None]],
        now: float,
    ) -> None:
        """One wave inside the batch transaction: admit each item, the wave's geometry at once,
        then each admitted check stored in its own savepoint. A retryable refusal is raised (the
        whole batch is retried); any other refusal is the item's result."""
        admitted: list[tuple[int, _Matrix]] = []
        for i in wave:
            run, incarnation, check, dropped = items[i]
            try:
                mat = self._admit(run, incarnation, check, dropped, touched)
            except ValidationError as e:
                if e.code in RETRYABLE:
                    raise
                results[i] = e
                continue
            if mat is None:
                results[i] = False
            else:
                admitted.append((i, mat))
        computed = ingest_batch([(mat.geometry, items[i][2]) for i, mat in admitted])
        prepared: list[tuple[int, _Matrix, _Prepared]] = []
        for (i, mat), keys in zip(admitted, computed, strict=True):
            try:
                prepared.append((i, mat, self._prepare(items[i], now, mat, keys)))
            except ValidationError as e:
                if e.code in RETRYABLE:
                    raise
                results[i] = e
        for i, mat, p in self._commit(prepared, now, results):
            results[i] = True
            published.append((self._runs[p.write.run], self._stored(mat, p), p.write.dropped))

    def _commit(
        self,
        prepared: list[tuple[int, _Matrix, _Prepared]],
        now: float,
        results: list[bool | ValidationError | None],
    ) -> list[tuple[int, _Matrix, _Prepared]]:
        """The wave's checks in one `Store.commit_checks`; the stored ones. Should that refuse
        (a fault of one check, or a duplicate the admission did not see), one at a time, so a
        refused check is refused alone and a duplicate acknowledged without change, as before
        the group commit. A retryable store fault is raised: the whole batch is retried."""
        if not prepared:
            return []
        try:
            if self.store.commit_checks([p.write for _, _, p in prepared], now=now):
                return prepared
        except ValidationError as e:
            if e.code in RETRYABLE:
                raise
        except Exception:  # noqa: S110 - found below, one check at a time
            pass
        stored = []
        for i, mat, p in prepared:
            try:
                if self.store.commit_checks([p.write], now=now):
                    stored.append((i, mat, p))
                    continue
                results[i] = False
            except Exception as e:
                self._reload_matrix(p.write.run, mat)
                refusal = _refusal(p.write, e)
                if not isinstance(refusal, ValidationError) or refusal.code in RETRYABLE:
                    raise
                results[i] = refusal
                continue
            self._reload_matrix(p.write.run, mat)
        return stored

    def _admit(
        self,
        run: str,
        incarnation: int,
        check: Any,
        dropped: int,
        touched: dict[tuple[str, str], tuple[_Matrix, int | None]],
    ) -> _Matrix | None:
        """A check's matrix once the check is valid for it; None for a duplicate."""
        r, mat = self._matrix_for(run, incarnation, check.matrix, f"report of step {check.step}")
        _check_report(r.name, mat.entry, check)
        self._checked(lambda v: wire.check_int("report.dropped_reports", v), dropped)
        if mat.last_step is not None and check.step <= mat.last_step:
            # a later step cannot be stored yet: its row and the last step commit together
            if self.store.has_check(run, check.matrix, check.step, incarnation):
                return None
            raise precondition(
                f"run {run}: matrix {check.matrix} step {check.step} is not after its last "
                f"step {mat.last_step}; a trainer restarted from a checkpoint says hello with "
                "a new incarnation and resume_step"
            )
        touched.setdefault((run, check.matrix), (mat, mat.last_step))
        return mat

    def _prepare(
        self,
        item: tuple[str, int, Any, int],
        now: float,
        mat: _Matrix,
        computed: dict[str, Any] | Exception,
    ) -> _Prepared:
        """An admitted check with its computed keys (or the exception computing them raised) as
        the store will write it; a refusal puts the matrix back as the store holds it."""
        run, incarnation, check, dropped = item
        try:
            if isinstance(computed, Exception):
                raise computed
            keys = {k: json_value(v) for k, v in computed.items()}
            missing = [k for k in MATRIX_KEYS if k not in keys]
            if missing:
                raise RuntimeError(f"geometry returned no {missing}")
            keys = {k: keys[k] for k in MATRIX_KEYS}
            counts = CheckCounts(
                mat.entry.numel,
                int(check.visible_count),
                int(check.visible_low_count),
                int(check.visible_principal_count),
            )
            lock_ref = None
            if check.locked_now and check.v_ref is not None:
                lock_step = check.lock_step if check.lock_step is not None else check.step
                lock_ref = (int(lock_step), check.v_ref)
            update, tensors, archived = self._state_update(mat)
        except Exception as e:
            self._reload_matrix(run, mat)
            refusal = _refusal(check, e)
            if refusal is e:
                raise
            raise refusal from e
        write = CheckWrite(
            run, check.matrix, check.step, incarnation, keys, counts, update, lock_ref, dropped
        )
        return _Prepared(write, tensors, archived)

    def _stored(self, mat: _Matrix, p: _Prepared) -> MatrixRow:
        """A committed check: the matrix's persisted state and last step; the row to publish
        after the batch's commit."""
        self._persisted(mat, p.tensors, p.archived)
        w = p.write
        mat.last_step = w.step
        return MatrixRow(
            w.run,
            w.matrix,
            mat.entry.layer,
            mat.entry.module,
            tuple(mat.entry.shape),
            mat.entry.numel,
            w.step,
            w.incarnation,
            w.counts.visible_count,
            w.counts.visible_low_count,
            w.counts.visible_principal_count,
            w.keys,
            mat.entry.expert,
        )

    def record_dropped(self, run: str, count: int) -> None:
        """Add a client's count of reports it dropped (queue full) to the run's total (the
        gRPC ingest passes the count with its report to `ingest_many` instead)."""
        self._checked(lambda v: wire.check_int("dropped_reports", v), count)
        if count == 0:
            return
        with self._write:
            r = self._runs.get(run)
            if r is None:
                raise precondition(f"dropped-report count for run {run!r} before its hello")
            self.store.add_dropped(run, count)
            with self._view:
                r.dropped += count

    # ---------------------------------------------------------------- read side

    def _row(self, r: _Run, h: Any) -> MatrixRow:
        e = r.manifest[h.matrix]
        keys = {k: h.keys.get(k) for k in MATRIX_KEYS}
        return MatrixRow(
            r.name,
            h.matrix,
            e.layer,
            e.module,
            tuple(e.shape),
            e.numel,
            h.step,
            h.incarnation,
            h.visible_count,
            h.visible_low_count,
            h.visible_principal_count,
            keys,
            e.expert,
        )

    def _snapshot(self) -> list[tuple[_Run, list[MatrixRow]]]:
        with self._view:
            return [(r, list(r.rows.values())) for r in self._runs.values()]

    def run_names(self) -> list[str]:
        """Every run's name, sorted."""
        with self._view:
            return sorted(self._runs)

    def runs(self) -> list[dict[str, Any]]:
        """DESIGN §4 `/api/v1/runs` items, sorted by run name."""
        out = []
        for r, rows in sorted(self._snapshot(), key=lambda x: x[0].name):
            locked = sum(1 for row in rows if row.keys.get("locked"))
            out.append(
                {
                    "run": r.name,
                    "last_step": max((row.step for row in rows), default=None),
                    "matrices": len(r.manifest),
                    "locked_ratio": locked / len(rows) if rows else None,
                    "created_at": rfc3339(r.created_at),
                    "updated_at": rfc3339(r.updated_at),
                }
            )
        return out

    def _published(self, run: str) -> tuple[dict[str, MatrixRow], list[ManifestEntry]] | None:
        """A run's latest rows by matrix and its manifest in hello order (None: unknown run)."""
        with self._view:
            r = self._runs.get(run)
            if r is None:
                return None
            return dict(r.rows), list(r.manifest.values())

    def run_detail(
        self,
        run: str,
        *,
        offset: int = 0,
        limit: int | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """DESIGN §4 `/api/v1/runs/{run}`; matrices in manifest order, unreported ones all null.
        `where`: only the matrices whose manifest fields equal these (`layer`, `module`,
        `expert`). One page of them: `offset`, at most `limit` (None: all); the aggregate and
        last_step are over the whole run. A page that is not every matching matrix says so:
        `page: {offset, limit, total, next_offset}` (total: the matching matrices; next_offset
        null on the last page)."""
        published = self._published(run)
        if published is None:
            return None
        rows, manifest = published
        if where:
            manifest = [e for e in manifest if all(getattr(e, k) == v for k, v in where.items())]
        total = len(manifest)
        end = total if limit is None else min(total, offset + limit)
        matrices = []
        for e in manifest[offset:end]:
            row = rows.get(e.matrix)
            item: dict[str, Any] = {
                "matrix": e.matrix,
                "layer": e.layer,
                "module": e.module,
                "expert": e.expert,
                "shape": list(e.shape),
                "step": row.step if row else None,
            }
            for k in MATRIX_KEYS:
                item[k] = row.keys.get(k) if row else None
            matrices.append(item)
        out = {
            "run": run,
            "last_step": max((row.step for row in rows.values()), default=None),
            "aggregate": self.aggregate(run),
            "matrices": matrices,
            "audit": self.audit.latest(run),  # the live self-audit (sidecar/audit.py)
        }
        if offset > 0 or end < total:
            out["page"] = {
                "offset": offset,
                "limit": limit,
                "total": total,
                "next_offset": end if end < total else None,
            }
        return out

    def modules(self, run: str, layer: int | None = None) -> dict[str, Any] | None:
        """`/api/v1/runs/{run}/modules`: one item per (layer, module) of the run's manifest (only
        `layer`'s when given), in manifest order, with the DESIGN §2 aggregate over its matrices'
        latest checks (`aggregate_rows`): over the experts for an MoE expert module, the matrix
        itself otherwise. `matrices`: in the manifest, `reported`: with a check, `experts`: the
        distinct expert indices, `step`: the latest step of any of them. None for an unknown run."""
        published = self._published(run)
        if published is None:
            return None
        rows, manifest = published
        groups: dict[tuple[int | None, str], list[ManifestEntry]] = {}
        for e in manifest:
            if layer is None or e.layer == layer:
                groups.setdefault((e.layer, e.module), []).append(e)
        items = []
        for (lay, module), entries in groups.items():
            members = [rows[e.matrix] for e in entries if e.matrix in rows]
            items.append(
                {
                    "layer": lay,
                    "module": module,
                    "matrices": len(entries),
                    "experts": len({e.expert for e in entries if e.expert is not None}),
                    "reported": len(members),
                    "step": max((m.step for m in members), default=None),
                    "aggregate": aggregate_rows(members),
                }
            )
        return {"run": run, "modules": items}

    def history(self, run: str, matrix: str) -> dict[str, Any] | None:
        """DESIGN §4 `/api/v1/runs/{run}/history?matrix=NAME`; None for an unknown run/matrix."""
        with self._view:
            r = self._runs.get(run)
            if r is None or matrix not in r.manifest:
                return None
        points = []
        for h in self.store.history(run, matrix):
            point: dict[str, Any] = {"step": h.step}
            for k in MATRIX_KEYS:
                point[k] = h.keys.get(k)
            points.append(point)
        return {"matrix": matrix, "points": points}

    def latest(self) -> list[MatrixRow]:
        """Every matrix's latest visible check, over all runs (for the Prometheus collector)."""
        return [row for _, rows in self._snapshot() for row in rows]

    def aggregate(self, run: str) -> dict[str, Any] | None:
        """The run aggregates of DESIGN §2 (None for an unknown run); computed once per change
        of the run's rows (a 100k-matrix run's aggregate is a second of Python)."""
        with self._view:
            r = self._runs.get(run)
            if r is None:
                return None
            version, cached = r.version, r.aggregate_cache
            if cached is not None and cached[0] == version:
                return dict(cached[1])
            rows = list(r.rows.values())
        agg = aggregate_rows(rows)
        with self._view:
            if r.version == version:
                r.aggregate_cache = (version, agg)
        return dict(agg)

    def dropped_reports(self) -> dict[str, int]:
        """run -> reports its clients dropped (queue full), as they reported."""
        with self._view:
            return {name: r.dropped for name, r in self._runs.items()}

    def run_channel_rank(self, run: str) -> int:
        """K of a run (the engine's default for an unknown one)."""
        with self._view:
            r = self._runs.get(run)
            return run_channel_rank(r.config if r else {}, self.channel_rank)

    def check_label(self, run: str, step: int) -> int:
        """The step labelling the run's check that a report of `step` belongs to
        (client/schedule.py): the step itself under schedule="every"; under "spread", where each
        step checks a slice of the matrices, the last step of its cycle, so the run's check of a
        cycle is complete once every matrix has reported in it (sidecar/progress.py)."""
        with self._view:
            r = self._runs.get(run)
            config = r.config if r is not None else {}
        if config.get("schedule") != "spread":
            return step
        return cycle_label(step, wire.config_value(config, "every"))

    def manifest(self, run: str) -> list[ManifestEntry] | None:
        """A run's manifest in hello order (None for an unknown run)."""
        with self._view:
            r = self._runs.get(run)
            return None if r is None else list(r.manifest.values())


def _refusal(check: Any, e: Exception) -> Exception:
    """What refuses a check whose keys or state could not be made or stored: its
    ValidationError, a ValueError (a value the store refuses) as INVALID_ARGUMENT naming the
    check; any other exception is the sidecar's fault, raised as it is."""
    if isinstance(e, ValueError):
        return invalid(f"matrix {check.matrix} step {check.step}: {e}")
    return e


def _waves(items: list[tuple[str, int, Any, int]]) -> list[list[int]]:
    """The batch's item indices cut, in order, into runs that name each (run, matrix) once."""
    waves: list[list[int]] = []
    seen: set[tuple[str, str]] = set()
    for i, (run, _, check, _) in enumerate(items):
        key = (run, getattr(check, "matrix", None))
        if not waves or key in seen:
            waves.append([])
            seen = set()
        waves[-1].append(i)
        seen.add(key)
    return waves


# -------------------------------------------------------------------- validation


def _same_hello(
    r: _Run | None, incarnation: int, config: dict, entries: list[ManifestEntry]
) -> bool:
    """Whether a hello says nothing the run does not hold already (a reconnect or another rank
    of the same incarnation): then it needs no write, and a store that cannot write (disk full)
    does not turn the client away."""
    return (
        r is not None
        and incarnation == r.incarnation
        and config == r.config
        and len(entries) == len(r.manifest)
        and all(r.manifest.get(e.matrix) == e for e in entries)
    )


def _check_run_name(run: Any) -> None:
    if not isinstance(run, str) or not RUN_NAME.fullmatch(run):
        raise invalid(f"run name {run!r} does not match {RUN_NAME_RULE}")


def _check_tensor(where: str, t: Any, shape: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise invalid(f"{where} is {type(t).__name__}; expected a tensor of shape {list(shape)}")
    if tuple(t.shape) != tuple(shape):
        raise invalid(f"{where} has shape {list(t.shape)}, expected {list(shape)}")
    if not t.dtype.is_floating_point:
        raise invalid(f"{where} has dtype {t.dtype}, expected float32")
    if not wire.finite(t):
        raise invalid(f"{where} has non-finite values")


def _check_sketch(where: str, sketch: Any, n: int) -> None:
    if sketch is None:
        raise invalid(f"{where}: sketch missing")
    G = sketch.G
    if not isinstance(G, torch.Tensor) or G.dim() != 2:
        raise invalid(f"{where}: G is not a 2-D tensor")
    r = G.shape[1]
    if r < 1 or r > n:
        raise invalid(f"{where}: G has {r} columns; expected 1..{n} (r = K + p, at most n)")
    _check_tensor(f"{where}: G", G, (n, r))
    _check_tensor(f"{where}: C", sketch.C, (r, r))
    conv = sketch.convergence
    if not isinstance(conv, (int, float)) or not math.isfinite(conv) or conv < 0:
        raise invalid(f"{where}: convergence is {conv!r}; expected a finite number >= 0")


def _check_report(run: str, e: ManifestEntry, check: Any) -> None:
    where = f"run {run}: matrix {e.matrix} step {check.step}"
    if not isinstance(check.step, int) or check.step < 0:
        raise invalid(f"{where}: step {check.step!r}; expected an integer >= 0")
    if tuple(check.shape) != tuple(e.shape):
        raise invalid(f"{where}: report.shape {list(check.shape)}, manifest says {list(e.shape)}")
    if check.numel != e.numel:
        raise invalid(f"{where}: report.numel {check.numel}, manifest says {e.numel}")
    n = e.shape[1]
    fro = check.frobenius_sq
    if not isinstance(fro, (int, float)) or not math.isfinite(fro) or fro < 0:
        raise invalid(f"{where}: frobenius_sq is {fro!r}; expected a finite number >= 0")
    counts = (
        ("visible_count", check.visible_count, e.numel),
        ("visible_low_count", check.visible_low_count, check.visible_count),
        ("visible_principal_count", check.visible_principal_count, check.visible_count),
    )
    for name, v, hi in counts:
        if not isinstance(v, int) or v < 0 or (isinstance(hi, int) and v > hi):
            raise invalid(f"{where}: {name} is {v!r}; expected an integer in [0, {hi}]")
    ce = check.channel_energy_sq
    if ce is not None and (not isinstance(ce, (int, float)) or not math.isfinite(ce) or ce < 0):
        raise invalid(f"{where}: channel_energy_sq is {ce!r}; expected a finite number >= 0")
    if check.update is not None:
        _check_sketch(f"{where}: update", check.update, n)
    elif fro != 0:
        raise invalid(f"{where}: update sketch missing while frobenius_sq = {fro} > 0")
    if check.weight is not None:  # absent: the client skipped the W_t tracker (weight_every)
        _check_sketch(f"{where}: weight", check.weight, n)
    if check.locked_now:
        if check.v_ref is None:
            raise invalid(f"{where}: locked_now without v_ref; expected v_ref of shape [{n}, K]")
        _check_tensor(f"{where}: v_ref", check.v_ref, (n, check.v_ref.shape[1]))
        if check.lock_step is not None and check.lock_step != check.step:
            raise invalid(
                f"{where}: locked_now with lock_step {check.lock_step}; expected the check's step"
            )
    if check.lock_step is not None and (
        not isinstance(check.lock_step, int) or check.lock_step < 0 or check.lock_step > check.step
    ):
        raise invalid(f"{where}: lock_step {check.lock_step!r}; expected 0..{check.step}")


def _same(old: torch.Tensor | None, new: torch.Tensor) -> bool:
    """Whether a state tensor is unchanged since it was written (same storage, or equal)."""
    if old is None or old.shape != new.shape or old.dtype != new.dtype:
        return False
    if old.device == new.device and old.data_ptr() == new.data_ptr():
        return True
    return bool(torch.equal(old, new.detach().to(old.device)))


def rewind_geometry(
    geometry: MatrixGeometry,
    resume_step: int,
    visible: list[Any],
    archive: Mapping[int, torch.Tensor],
) -> None:
    """A matrix's geometry as it was after its last visible check before `resume_step`.

    visible: the matrix's visible history (HistoryRow, ascending steps, all before the resume
    step); archive: step -> V_K of every log-spaced snapshot ever taken. The horizon gets back
    its check count (= the visible checks) and the snapshots taken before the resume step (the
    next check prunes those that can no longer be its horizon, as an uninterrupted run would
    have); a lock taken at or after the resume step is undone. W0's baseline is kept (the resumed trainer uses the same anchor)."""
    horizon = geometry.horizon
    rows = [h for h in visible if h.step < resume_step]
    position = {h.step: i + 1 for i, h in enumerate(rows)}
    horizon.checks = len(rows)
    horizon.snapshots = [
        (position[step], step, V.to(geometry.device))
        for step, V in sorted(archive.items())
        if step < resume_step and step in position
    ]
    last_lock = rows[-1].keys.get("lock_step") if rows else None
    if last_lock is None or last_lock >= resume_step:
        geometry.lock_step, geometry.v_ref = None, None
    else:
        geometry.lock_step = int(last_lock)

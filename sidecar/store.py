"""The sidecar's durable state: one SQLite file (WAL mode) in the data dir.

Layout (`deltawatch.sqlite3`, schema version in `meta`):

* `runs`          one row per run: created/updated times, the latest hello's config, dropped-report
                  count reported by clients.
* `incarnations`  every (run, incarnation) with its resume step: a newer incarnation with resume
                  step s hides the older incarnations' history from step s on.
* `manifests`     every run's matrices: shape, numel, dtype, layer, module, shard layout, owner,
                  expert (MoE expert index, NULL otherwise; a data dir written before the column
                  existed gets it, NULL, when it is opened: `_COLUMNS_ADDED`).
* `history`       one row per (run, matrix, step, incarnation): every §2 key (JSON object, floats
                  written with `repr`, so they round-trip exactly) and the counts behind the ratios.
* `tensors`       the geometry state needed to resume, per (run, matrix, name): raw little-endian
                  bytes + dtype + shape (never pickle). Holds W0's baseline Ritz data, the
                  log-spaced V_K snapshots and the lock reference V_ref, not every G or V.
* `geometry`      the JSON half of each matrix's geometry state.
* `lock_refs`     (run, matrix) -> lock_step, incarnation and V_ref, for `HelloResult`.
* `audits`        the live self-audit (sidecar/audit.py), one row per (run, matrix, step): the
                  exact float64 keys, the live ones of that check, the error ratios (JSON) and
                  the SVD's seconds; a data dir written before the table gets it when opened
                  (CREATE TABLE IF NOT EXISTS, like every table).
* `alerts`, `kv`  alert state/history and a generic namespaced key/value table for the alert engine.

Durability: `PRAGMA journal_mode=WAL` and `synchronous=FULL` by default. In WAL mode a commit
appends to the WAL file; with FULL the WAL is fsync'ed at every commit, so a report acknowledged
after `commit_check` returns survives kill -9 *and* a power loss or kernel crash. NORMAL in WAL
mode is also kill -9 safe (the written WAL frames live in the OS page cache) but may lose the last
commits on a power loss, which would break "persist, then acknowledge"; it is available as
`Store(..., synchronous="NORMAL")` for throwaway data dirs.

Group commit: `transaction()` nests. The engine opens one transaction around a batch of reports
and writes each wave of them with one `commit_checks` (a SAVEPOINT, one `executemany` per table),
so the batch shares one COMMIT (one WAL fsync); a check refused there is found by writing the
wave one check per savepoint, and rolls back alone.

Faults: a write the store cannot make now (SQLITE_FULL: the disk is full; SQLITE_BUSY / LOCKED /
IOERR) raises a `ValidationError` with a retryable code (RESOURCE_EXHAUSTED / UNAVAILABLE, see
`store_fault`); nothing of the transaction stays. `writable` and `unwritable_reason` say how the
last write went (readyz and `deltawatch_store_writable`); `probe()` tries a tiny write.

Concurrency: one writer connection (the engine's ingest thread, serialised by a lock) and one
reader connection (HTTP, metrics); WAL lets the reader run while a write is in progress.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from deltawatch.client.wire import tensor_from_bytes, tensor_to_bytes

from .errors import RESOURCE_EXHAUSTED, UNAVAILABLE, ValidationError

log = logging.getLogger("deltawatch.store")

DB_NAME = "deltawatch.sqlite3"
BUSY_TIMEOUT_MS = 5_000  # a locked database: wait this long, then refuse the write (retryable)
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    config TEXT NOT NULL DEFAULT '{}',
    dropped_reports INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS incarnations (
    run TEXT NOT NULL,
    incarnation INTEGER NOT NULL,
    resume_step INTEGER,
    started_at REAL NOT NULL,
    PRIMARY KEY (run, incarnation)
);
CREATE TABLE IF NOT EXISTS manifests (
    run TEXT NOT NULL,
    matrix TEXT NOT NULL,
    position INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    cols INTEGER NOT NULL,
    numel INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    layer INTEGER,
    module TEXT NOT NULL,
    shard_layout TEXT NOT NULL,
    owner_rank INTEGER NOT NULL,
    expert INTEGER,
    PRIMARY KEY (run, matrix)
);
CREATE TABLE IF NOT EXISTS history (
    run TEXT NOT NULL,
    matrix TEXT NOT NULL,
    step INTEGER NOT NULL,
    incarnation INTEGER NOT NULL,
    received_at REAL NOT NULL,
    numel INTEGER NOT NULL,
    visible_count INTEGER NOT NULL,
    visible_low_count INTEGER NOT NULL,
    visible_principal_count INTEGER NOT NULL,
    keys TEXT NOT NULL,
    PRIMARY KEY (run, matrix, step, incarnation)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tensors (
    run TEXT NOT NULL,
    matrix TEXT NOT NULL,
    name TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (run, matrix, name)
);
CREATE TABLE IF NOT EXISTS geometry (
    run TEXT NOT NULL,
    matrix TEXT NOT NULL,
    incarnation INTEGER NOT NULL,
    last_step INTEGER,
    state TEXT NOT NULL,
    PRIMARY KEY (run, matrix)
);
CREATE TABLE IF NOT EXISTS lock_refs (
    run TEXT NOT NULL,
    matrix TEXT NOT NULL,
    lock_step INTEGER NOT NULL,
    incarnation INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (run, matrix)
);
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    run TEXT NOT NULL,
    matrix TEXT,
    state TEXT NOT NULL,
    severity TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    value REAL,
    summary TEXT NOT NULL,
    extra TEXT NOT NULL DEFAULT '{}',
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_by_state ON alerts (state, run, rule);
CREATE TABLE IF NOT EXISTS audits (
    run TEXT NOT NULL,
    matrix TEXT NOT NULL,
    step INTEGER NOT NULL,
    incarnation INTEGER NOT NULL,
    computed_at REAL NOT NULL,
    seconds REAL NOT NULL,
    exact TEXT NOT NULL,
    live TEXT NOT NULL,
    ratios TEXT NOT NULL,
    PRIMARY KEY (run, matrix, step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (namespace, key)
);
"""

# Nullable columns added after a table's first layout: (table, column, SQL type). A data dir
# written before them gets them (NULL in every old row) when it is opened; the schema version
# stays, since an older deltawatch reads such a file by column name and ignores them.
_COLUMNS_ADDED: tuple[tuple[str, str, str], ...] = (("manifests", "expert", "INTEGER"),)


def dumps_keys(keys: Mapping[str, Any]) -> str:
    """JSON of a key dict; non-finite floats are refused (they are null by contract)."""
    for k, v in keys.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"key {k} is {v}; non-finite values are stored as null")
    return json.dumps(dict(keys), allow_nan=False, separators=(",", ":"))


_RETRYABLE_SQLITE = {
    sqlite3.SQLITE_FULL: (RESOURCE_EXHAUSTED, "the disk of the data dir is full"),
    sqlite3.SQLITE_BUSY: (UNAVAILABLE, "the database is busy"),
    sqlite3.SQLITE_LOCKED: (UNAVAILABLE, "the database is locked"),
    sqlite3.SQLITE_IOERR: (UNAVAILABLE, "an I/O error in the data dir"),
}


def store_fault(exc: BaseException) -> ValidationError | None:
    """The retryable refusal for a SQLite error the store may recover from (disk full, busy,
    locked, I/O error; by its primary result code), else None."""
    if not isinstance(exc, sqlite3.Error):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc).lower()
    if code is None:  # an error raised without a code: recognise the two common texts
        code = sqlite3.SQLITE_FULL if "disk is full" in text else None
        code = sqlite3.SQLITE_LOCKED if "locked" in text else code
    found = _RETRYABLE_SQLITE.get(code & 0xFF) if code is not None else None
    if found is None:
        return None
    status, reason = found
    return ValidationError(status, f"the store could not write ({reason}: {exc}); retry later")


@dataclass(frozen=True)
class HistoryRow:
    """One persisted check of one matrix."""

    run: str
    matrix: str
    step: int
    incarnation: int
    received_at: float
    numel: int
    visible_count: int
    visible_low_count: int
    visible_principal_count: int
    keys: dict[str, Any]


def _history_row(r: tuple) -> HistoryRow:
    return HistoryRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], json.loads(r[9]))


@dataclass(frozen=True)
class CheckCounts:
    """The exact counts behind the ratio keys, kept for parameter-weighted run aggregates."""

    numel: int
    visible_count: int
    visible_low_count: int
    visible_principal_count: int


@dataclass(frozen=True)
class StateUpdate:
    """A matrix's geometry state to persist with a check: JSON half, tensors that changed or were
    added (written), names of tensors that disappeared (deleted)."""

    meta: dict[str, Any]
    tensors: Mapping[str, torch.Tensor]
    removed: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckWrite:
    """One check as `Store.commit_checks` persists it."""

    run: str
    matrix: str
    step: int
    incarnation: int
    keys: Mapping[str, Any]
    counts: CheckCounts
    state: StateUpdate | None
    lock_ref: tuple[int, torch.Tensor] | None = None  # (lock_step, V_ref) on the locking check
    dropped: int = 0  # the client's dropped-report count this check carries


class _Duplicate(Exception):
    """A check of `commit_checks` was stored already: its transaction is rolled back."""


BLOB_STREAM_BYTES = 1 << 20  # a tensor this large is written into its row in pieces
BLOB_PIECE_BYTES = 1 << 20


def _insert_tensors(
    c: sqlite3.Connection, table: str, key: tuple[str, ...], rows: Sequence[tuple]
) -> None:
    """INSERT OR REPLACE rows of `table` given as (*key values, tensor), the tensor into the
    columns dtype, shape (JSON) and data. Small tensors in one `executemany`; one of
    `BLOB_STREAM_BYTES` or more is inserted as a zeroblob and written into its row in pieces
    (incremental BLOB I/O), because a bound BLOB is copied by SQLite and copied again into the
    row's record: two transient copies of an n-sized tensor (issue: a 64 MiB report's peak)."""
    columns = ", ".join((*key, "dtype", "shape", "data"))
    marks = ", ".join("?" * (len(key) + 2))
    small = []
    for *values, t in rows:
        dtype, shape, data = tensor_to_bytes(t)
        if len(data) < BLOB_STREAM_BYTES:
            small.append((*values, dtype, json.dumps(shape), data))
            continue
        cur = c.execute(
            f"INSERT OR REPLACE INTO {table} ({columns}) VALUES ({marks}, zeroblob(?))",
            (*values, dtype, json.dumps(shape), len(data)),
        )
        with c.blobopen(table, "data", cur.lastrowid) as blob:
            for start in range(0, len(data), BLOB_PIECE_BYTES):
                blob.write(data[start : start + BLOB_PIECE_BYTES])
    c.executemany(f"INSERT OR REPLACE INTO {table} ({columns}) VALUES ({marks}, ?)", small)


_VISIBLE_SQL = """
SELECT h.run, h.matrix, h.step, h.incarnation, h.received_at, h.numel, h.visible_count,
       h.visible_low_count, h.visible_principal_count, h.keys
FROM history h
WHERE h.run = ? {matrix_filter}
  AND NOT EXISTS (SELECT 1 FROM incarnations i
                  WHERE i.run = h.run AND i.incarnation > h.incarnation
                    AND i.resume_step IS NOT NULL AND i.resume_step <= h.step)
  AND NOT EXISTS (SELECT 1 FROM history h2
                  WHERE h2.run = h.run AND h2.matrix = h.matrix AND h2.step = h.step
                    AND h2.incarnation > h.incarnation)
ORDER BY {order}
"""


class Store:
    """SQLite persistence of runs, manifests, history, geometry state, lock references, alerts."""

    def __init__(self, data_dir: str | Path, *, synchronous: str = "FULL") -> None:
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, EXTRA or NORMAL, got {synchronous!r}")
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / DB_NAME
        self.synchronous = synchronous
        self._wlock = threading.RLock()
        self._rlock = threading.Lock()
        self._depth = 0  # open transaction() levels on the writer connection
        self.writable = True
        self.unwritable_reason: str | None = None
        self._w = self._connect()
        with self._wlock:
            self._w.executescript(_SCHEMA)
            row = self._w.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                self._w.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            elif int(row[0]) != SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has schema version {row[0]}, this deltawatch reads "
                    f"{SCHEMA_VERSION}; use a new --data-dir"
                )
            for table, column, kind in _COLUMNS_ADDED:
                have = {r[1] for r in self._w.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self._w.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                    log.info("%s: added the column %s.%s", self.path, table, column)
        self._r = self._connect()

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
        con.execute("PRAGMA journal_mode=WAL")
        con.execute(f"PRAGMA synchronous={self.synchronous}")
        con.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return con

    def close(self) -> None:
        """Close both connections (a checkpoint of the WAL happens on the last close)."""
        with self._rlock:
            self._r.close()
        with self._wlock:
            self._w.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on any exception;
        inside an open one, a SAVEPOINT (rolled back alone). A SQLite error the store may recover
        from is raised as the retryable `ValidationError` of `store_fault`."""
        with self._wlock:
            outer = self._depth == 0
            name = f"sp{self._depth}"
            try:
                self._w.execute("BEGIN IMMEDIATE" if outer else f"SAVEPOINT {name}")
                self._depth += 1
                try:
                    yield self._w
                except BaseException:
                    self._rollback(None if outer else name)
                    raise
                finally:
                    self._depth -= 1
                if outer:
                    self._w.execute("COMMIT")
                else:
                    self._w.execute(f"RELEASE {name}")
            except sqlite3.Error as exc:
                fault = store_fault(exc)
                if outer:
                    self._rollback(None)
                    if fault is not None:
                        self._set_writable(False, fault.message)
                if fault is None:
                    raise
                raise fault from exc
        if outer:
            self._set_writable(True, None)

    def _rollback(self, savepoint: str | None) -> None:
        """Undo the open transaction (or back to a savepoint); SQLite may have rolled back
        itself already (a full disk at COMMIT), which is fine."""
        sql = "ROLLBACK" if savepoint is None else f"ROLLBACK TO {savepoint}"
        if self._w.in_transaction:
            try:
                self._w.execute(sql)
                if savepoint is not None:
                    self._w.execute(f"RELEASE {savepoint}")
            except sqlite3.Error:
                log.warning("rollback failed", exc_info=True)

    def _set_writable(self, writable: bool, reason: str | None) -> None:
        if writable == self.writable:
            return
        self.writable, self.unwritable_reason = writable, reason
        if writable:
            log.warning("the store in %s can write again", self.data_dir)
        else:
            log.error("the store in %s cannot write: %s", self.data_dir, reason)

    def probe(self) -> bool:
        """Try a tiny write (the `store` namespace of kv); whether the store can write now."""
        try:
            self.kv_put("store", "probe", time.time())
        except ValidationError:
            return False
        return True

    def _read(self, sql: str, params: tuple = (), *, writer: bool = False) -> list[tuple]:
        """Rows of a query on the reader connection (committed data), or on the writer's
        (`writer=True`: what the open write transaction sees, for the engine's write thread)."""
        if writer:
            with self._wlock:
                return self._w.execute(sql, params).fetchall()
        with self._rlock:
            return self._r.execute(sql, params).fetchall()

    # ---------------------------------------------------------------- runs and manifests

    def save_hello(
        self,
        run: str,
        incarnation: int,
        resume_step: int | None,
        config: Mapping[str, Any],
        manifest: Iterable[Any],
        *,
        now: float | None = None,
    ) -> None:
        """Persist a hello: the run (created if new), its incarnation and resume step, the config
        and the manifest entries (objects with ManifestEntry's fields), in one transaction."""
        now = time.time() if now is None else now
        cfg = json.dumps(dict(config), sort_keys=True, default=str)
        with self.transaction() as c:
            c.execute(
                "INSERT INTO runs (run, created_at, updated_at, config) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (run) DO UPDATE SET config = excluded.config",
                (run, now, now, cfg),
            )
            c.execute(
                "INSERT INTO incarnations (run, incarnation, resume_step, started_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (run, incarnation) DO NOTHING",
                (run, incarnation, resume_step, now),
            )
            (start,) = c.execute(
                "SELECT COALESCE(MAX(position) + 1, 0) FROM manifests WHERE run = ?", (run,)
            ).fetchone()
            c.executemany(
                "INSERT INTO manifests (run, matrix, position, rows, cols, numel, dtype, layer, "
                "module, shard_layout, owner_rank, expert) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (run, matrix) DO UPDATE SET dtype = excluded.dtype, "
                "shard_layout = excluded.shard_layout, owner_rank = excluded.owner_rank, "
                "expert = excluded.expert",
                [
                    (run, e.matrix, start + i, e.shape[0], e.shape[1], e.numel, e.dtype, e.layer,
                     e.module, e.shard_layout, e.owner_rank, getattr(e, "expert", None))
                    for i, e in enumerate(manifest)
                ],
            )  # fmt: skip

    def rewind(self, run: str, resume_step: int) -> list[str]:
        """Drop the lock references taken at or after `resume_step` (a newer incarnation resumes
        from a checkpoint before them); returns the matrices whose lock was dropped."""
        with self.transaction() as c:
            rows = c.execute(
                "SELECT matrix FROM lock_refs WHERE run = ? AND lock_step >= ?", (run, resume_step)
            ).fetchall()
            c.execute("DELETE FROM lock_refs WHERE run = ? AND lock_step >= ?", (run, resume_step))
        return [r[0] for r in rows]

    def runs(self) -> list[dict[str, Any]]:
        """Every run: run, created_at, updated_at, config (dict), dropped_reports, and
        config_error (why the stored config does not parse, else None: the engine quarantines
        such a run rather than failing to start)."""
        rows = self._read(
            "SELECT run, created_at, updated_at, config, dropped_reports FROM runs ORDER BY run"
        )
        out = []
        for r in rows:
            try:
                config, error = json.loads(r[3]), None
            except (ValueError, RecursionError, TypeError) as exc:
                config, error = {}, f"{type(exc).__name__}: {str(exc)[:200]}"
            if error is None and not isinstance(config, dict):
                config, error = {}, f"a JSON {type(config).__name__}, expected an object"
            out.append(
                {
                    "run": r[0],
                    "created_at": r[1],
                    "updated_at": r[2],
                    "config": config,
                    "dropped_reports": r[4],
                    "config_error": error,
                }
            )
        return out

    def incarnations(self, run: str) -> list[tuple[int, int | None]]:
        """(incarnation, resume_step) of a run, oldest first."""
        return [
            (r[0], r[1])
            for r in self._read(
                "SELECT incarnation, resume_step FROM incarnations WHERE run = ? "
                "ORDER BY incarnation",
                (run,),
            )
        ]

    def manifest(self, run: str) -> list[dict[str, Any]]:
        """A run's manifest rows in hello order: matrix, shape, numel, dtype, layer, module,
        shard_layout, owner_rank, expert."""
        rows = self._read(
            "SELECT matrix, rows, cols, numel, dtype, layer, module, shard_layout, owner_rank, "
            "expert FROM manifests WHERE run = ? ORDER BY position",
            (run,),
        )
        return [
            {
                "matrix": r[0],
                "shape": (r[1], r[2]),
                "numel": r[3],
                "dtype": r[4],
                "layer": r[5],
                "module": r[6],
                "shard_layout": r[7],
                "owner_rank": r[8],
                "expert": r[9],
            }
            for r in rows
        ]

    def add_dropped(self, run: str, count: int) -> None:
        """Add a client's dropped-report count to the run's total."""
        with self.transaction() as c:
            c.execute(
                "UPDATE runs SET dropped_reports = dropped_reports + ? WHERE run = ?", (count, run)
            )

    # ---------------------------------------------------------------- checks and state

    def has_check(self, run: str, matrix: str, step: int, incarnation: int) -> bool:
        """Whether (run, matrix, step, incarnation) is persisted already (a duplicate)."""
        with self._wlock:
            row = self._w.execute(
                "SELECT 1 FROM history WHERE run = ? AND matrix = ? AND step = ? AND incarnation = ?",
                (run, matrix, step, incarnation),
            ).fetchone()
        return row is not None

    def commit_check(
        self,
        run: str,
        matrix: str,
        step: int,
        incarnation: int,
        keys: Mapping[str, Any],
        counts: CheckCounts,
        state: StateUpdate | None,
        *,
        lock_ref: tuple[int, torch.Tensor] | None = None,
        now: float | None = None,
        dropped: int = 0,
    ) -> bool:
        """Persist one check (`commit_checks` of one). Returns False (and writes nothing) for a
        duplicate."""
        write = CheckWrite(run, matrix, step, incarnation, keys, counts, state, lock_ref, dropped)
        return self.commit_checks([write], now=now)

    def commit_checks(self, writes: Sequence[CheckWrite], *, now: float | None = None) -> bool:
        """Persist checks, each with its matrix's geometry state, (on the locking check) its lock
        reference and the client's dropped-report count it carries, in one transaction (a
        savepoint inside the engine's batch): one statement per table for all of them
        (`executemany`), one `runs` update per run. Returns False, and writes nothing, when any
        of them is a duplicate of a stored (run, matrix, step, incarnation): the caller, who
        checked for duplicates before, writes them one at a time to find it."""
        now = time.time() if now is None else now
        history = [
            (w.run, w.matrix, w.step, w.incarnation, now, w.counts.numel, w.counts.visible_count,
             w.counts.visible_low_count, w.counts.visible_principal_count, dumps_keys(w.keys))
            for w in writes
        ]  # fmt: skip
        dropped: dict[str, int] = {}
        for w in writes:
            dropped[w.run] = dropped.get(w.run, 0) + w.dropped
        try:
            with self.transaction() as c:
                cur = c.executemany(
                    "INSERT OR IGNORE INTO history (run, matrix, step, incarnation, received_at, "
                    "numel, visible_count, visible_low_count, visible_principal_count, keys) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    history,
                )
                if cur.rowcount != len(writes):
                    raise _Duplicate
                self._write_states(
                    c, [(w.run, w.matrix, w.incarnation, w.step, w.state) for w in writes]
                )
                _insert_tensors(
                    c,
                    "lock_refs",
                    ("run", "matrix", "lock_step", "incarnation"),
                    [
                        (w.run, w.matrix, w.lock_ref[0], w.incarnation, w.lock_ref[1])
                        for w in writes
                        if w.lock_ref is not None
                    ],
                )
                c.executemany(
                    "UPDATE runs SET updated_at = ?, dropped_reports = dropped_reports + ? "
                    "WHERE run = ?",
                    [(now, count, run) for run, count in dropped.items()],
                )
        except _Duplicate:
            return False
        return True

    def save_states(
        self, states: Sequence[tuple[str, str, int, int | None, StateUpdate | None]]
    ) -> None:
        """Persist matrices' geometry states alone ((run, matrix, incarnation, last_step, state)
        each: after baselines or a rewind), in one transaction."""
        with self.transaction() as c:
            self._write_states(c, states)

    @staticmethod
    def _write_states(
        c: sqlite3.Connection,
        states: Sequence[tuple[str, str, int, int | None, StateUpdate | None]],
    ) -> None:
        """(run, matrix, incarnation, last_step, state) rows: each state's JSON half, its removed
        tensors deleted, its changed ones written; a None state writes nothing."""
        states = [x for x in states if x[4] is not None]
        c.executemany(
            "INSERT OR REPLACE INTO geometry (run, matrix, incarnation, last_step, state) "
            "VALUES (?, ?, ?, ?, ?)",
            [
                (run, matrix, inc, last, json.dumps(state.meta, allow_nan=False))
                for run, matrix, inc, last, state in states
            ],
        )
        c.executemany(
            "DELETE FROM tensors WHERE run = ? AND matrix = ? AND name = ?",
            [(run, matrix, name) for run, matrix, _, _, state in states for name in state.removed],
        )
        _insert_tensors(
            c,
            "tensors",
            ("run", "matrix", "name"),
            [
                (run, matrix, name, t)
                for run, matrix, _, _, state in states
                for name, t in state.tensors.items()
            ],
        )

    def load_states(
        self, run: str, matrix: str | None = None, *, writer: bool = False
    ) -> dict[str, tuple[int, int | None, dict[str, Any], dict[str, torch.Tensor]]]:
        """matrix -> (incarnation, last_step, meta, tensors) for every matrix with saved state
        (or just `matrix`); `writer`: as the open write transaction sees it (see `_read`)."""
        out: dict[str, tuple[int, int | None, dict[str, Any], dict[str, torch.Tensor]]] = {}
        where, params = (
            ("run = ?", (run,)) if matrix is None else ("run = ? AND matrix = ?", (run, matrix))
        )
        for name_, inc, last, state in self._read(
            f"SELECT matrix, incarnation, last_step, state FROM geometry WHERE {where}",
            params,
            writer=writer,
        ):
            out[name_] = (inc, last, json.loads(state), {})
        for matrix, name, dtype, shape, data in self._read(
            f"SELECT matrix, name, dtype, shape, data FROM tensors WHERE {where}",
            params,
            writer=writer,
        ):
            if matrix in out:
                out[matrix][3][name] = tensor_from_bytes(dtype, json.loads(shape), data)
        return out

    def load_tensors(self, run: str, matrix: str, *, prefix: str = "") -> dict[str, torch.Tensor]:
        """name -> tensor of one matrix's stored state tensors whose name starts with prefix."""
        rows = self._read(
            "SELECT name, dtype, shape, data FROM tensors WHERE run = ? AND matrix = ? "
            "AND substr(name, 1, ?) = ?",
            (run, matrix, len(prefix), prefix),
        )
        return {r[0]: tensor_from_bytes(r[1], json.loads(r[2]), r[3]) for r in rows}

    def lock_refs(self, run: str) -> dict[str, tuple[int, torch.Tensor]]:
        """matrix -> (lock_step, V_ref) of a run's locked matrices."""
        return {
            r[0]: (r[1], tensor_from_bytes(r[2], json.loads(r[3]), r[4]))
            for r in self._read(
                "SELECT matrix, lock_step, dtype, shape, data FROM lock_refs WHERE run = ?", (run,)
            )
        }

    def history(self, run: str, matrix: str | None = None) -> list[HistoryRow]:
        """The visible history of a run (or one matrix), ordered by matrix then step.

        Visible: of several incarnations' rows for one (matrix, step) the newest incarnation's;
        and no row of an incarnation at or after a newer incarnation's resume step."""
        if matrix is None:
            sql = _VISIBLE_SQL.format(matrix_filter="", order="h.matrix, h.step")
            params: tuple = (run,)
        else:
            sql = _VISIBLE_SQL.format(matrix_filter="AND h.matrix = ?", order="h.step")
            params = (run, matrix)
        return [_history_row(r) for r in self._read(sql, params)]

    def latest(self, run: str) -> dict[str, HistoryRow]:
        """matrix -> its latest visible check (one indexed lookup per matrix, newest step first,
        so start-up does not read a long run's whole history)."""
        sql = _VISIBLE_SQL.format(matrix_filter="AND h.matrix = ?", order="h.step DESC LIMIT 1")
        out: dict[str, HistoryRow] = {}
        for (matrix,) in self._read("SELECT matrix FROM manifests WHERE run = ?", (run,)):
            rows = self._read(sql, (run, matrix))
            if rows:
                out[matrix] = _history_row(rows[0])
        return out

    def check_keys(self, run: str, matrix: str, step: int) -> dict[str, Any] | None:
        """The §2 keys of the visible check of (run, matrix, step), or None when none is stored."""
        sql = _VISIBLE_SQL.format(matrix_filter="AND h.matrix = ? AND h.step = ?", order="h.step")
        rows = self._read(sql, (run, matrix, step))
        return _history_row(rows[0]).keys if rows else None

    # ---------------------------------------------------------------- audits

    def has_audit(self, run: str, matrix: str, step: int) -> bool:
        """Whether the audit of (run, matrix, step) is stored already."""
        sql = "SELECT 1 FROM audits WHERE run = ? AND matrix = ? AND step = ?"
        return bool(self._read(sql, (run, matrix, step), writer=True))

    def save_audit(
        self,
        run: str,
        matrix: str,
        step: int,
        incarnation: int,
        seconds: float,
        exact: Mapping[str, Any],
        live: Mapping[str, Any],
        ratios: Mapping[str, Any],
    ) -> bool:
        """Store one audit; idempotent on (run, matrix, step): the first stays (False after)."""
        with self.transaction() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO audits VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run, matrix, step, incarnation, time.time(), seconds, dumps_keys(exact),
                 dumps_keys(live), dumps_keys(ratios)),
            )  # fmt: skip
            return cur.rowcount == 1

    def set_audit_live(
        self,
        run: str,
        matrix: str,
        step: int,
        live: Mapping[str, Any],
        ratios: Mapping[str, Any],
    ) -> None:
        """The live keys and error ratios of an audit stored before its check's report."""
        with self.transaction() as c:
            c.execute(
                "UPDATE audits SET live = ?, ratios = ? WHERE run = ? AND matrix = ? AND step = ?",
                (dumps_keys(live), dumps_keys(ratios), run, matrix, step),
            )

    def latest_audits(self, run: str) -> list[dict[str, Any]]:
        """Each matrix's latest audit of `run` (by step), in matrix order."""
        rows = self._read(
            "SELECT matrix, step, incarnation, computed_at, seconds, exact, live, ratios "
            "FROM audits a WHERE run = ? AND step = (SELECT MAX(step) FROM audits b "
            "WHERE b.run = a.run AND b.matrix = a.matrix) ORDER BY matrix",
            (run,),
        )
        names = ("matrix", "step", "incarnation", "computed_at", "seconds")
        out = []
        for r in rows:
            item = dict(zip(names, r[:5], strict=True))
            item.update(zip(("exact", "live", "ratios"), map(json.loads, r[5:]), strict=True))
            out.append(item)
        return out

    # ---------------------------------------------------------------- alerts

    def save_alert(
        self,
        *,
        rule: str,
        run: str,
        matrix: str | None,
        state: str,
        severity: str,
        started_at: float,
        ended_at: float | None = None,
        value: float | None = None,
        summary: str = "",
        extra: Mapping[str, Any] | None = None,
        id: str | None = None,
    ) -> str:
        """Insert or update one alert (DESIGN §4 /api/v1/alerts fields); returns its id."""
        if state not in ("firing", "resolved"):
            raise ValueError(f"alert state must be 'firing' or 'resolved', got {state!r}")
        alert_id = id or uuid.uuid4().hex
        if value is not None and not math.isfinite(value):
            value = None
        with self.transaction() as c:
            c.execute(
                "INSERT INTO alerts (id, rule, run, matrix, state, severity, started_at, ended_at, "
                "value, summary, extra, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET state = excluded.state, "
                "severity = excluded.severity, ended_at = excluded.ended_at, "
                "value = excluded.value, summary = excluded.summary, extra = excluded.extra, "
                "updated_at = excluded.updated_at",
                (
                    alert_id,
                    rule,
                    run,
                    matrix,
                    state,
                    severity,
                    started_at,
                    ended_at,
                    value,
                    summary,
                    json.dumps(dict(extra or {}), default=str),
                    time.time(),
                ),
            )
        return alert_id

    def alerts(
        self, *, state: str | None = None, run: str | None = None, since: float | None = None
    ) -> list[dict[str, Any]]:
        """Alerts as dicts (id, rule, run, matrix, state, severity, started_at, ended_at, value,
        summary, extra), newest first; filtered by state, run and `ended_at >= since` for
        resolved ones."""
        sql = (
            "SELECT id, rule, run, matrix, state, severity, started_at, ended_at, value, summary, "
            "extra FROM alerts WHERE 1 = 1"
        )
        params: list[Any] = []
        if state is not None:
            sql += " AND state = ?"
            params.append(state)
        if run is not None:
            sql += " AND run = ?"
            params.append(run)
        if since is not None:
            sql += " AND (state = 'firing' OR ended_at >= ?)"
            params.append(since)
        sql += " ORDER BY started_at DESC, id"
        cols = (
            "id",
            "rule",
            "run",
            "matrix",
            "state",
            "severity",
            "started_at",
            "ended_at",
            "value",
            "summary",
            "extra",
        )
        out = []
        for r in self._read(sql, tuple(params)):
            d = dict(zip(cols, r, strict=True))
            d["extra"] = json.loads(d["extra"])
            out.append(d)
        return out

    def open_alerts(self) -> list[dict[str, Any]]:
        """Every firing alert."""
        return self.alerts(state="firing")

    def kv_put(self, namespace: str, key: str, value: Any) -> None:
        """Store a JSON value under (namespace, key)."""
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO kv (namespace, key, value) VALUES (?, ?, ?)",
                (namespace, key, json.dumps(value)),
            )

    def kv_get(self, namespace: str, key: str, default: Any = None) -> Any:
        """The JSON value under (namespace, key), or default."""
        rows = self._read("SELECT value FROM kv WHERE namespace = ? AND key = ?", (namespace, key))
        return json.loads(rows[0][0]) if rows else default

    def kv_items(self, namespace: str) -> dict[str, Any]:
        """Every key -> value of a namespace."""
        return {
            k: json.loads(v)
            for k, v in self._read("SELECT key, value FROM kv WHERE namespace = ?", (namespace,))
        }

    def kv_delete(self, namespace: str, key: str) -> None:
        """Remove (namespace, key)."""
        with self.transaction() as c:
            c.execute("DELETE FROM kv WHERE namespace = ? AND key = ?", (namespace, key))

    # ---------------------------------------------------------------- alert engine state

    def load_alert_state(self) -> dict[str, str]:
        """Every saved alert-state item (key -> JSON text), as `save_alert_state` left them."""
        return {
            k: v for k, v in self._read("SELECT key, value FROM kv WHERE namespace = 'alert_state'")
        }

    def save_alert_state(self, items: Mapping[str, str]) -> None:
        """Insert or replace alert-state items (key -> JSON text) in one transaction."""
        with self.transaction() as c:
            c.executemany(
                "INSERT OR REPLACE INTO kv (namespace, key, value) VALUES ('alert_state', ?, ?)",
                list(items.items()),
            )

"""Alert rules on the live geometry, with hysteresis counted in checks, persisted state and delivery.

Five rules (defaults in `AlertConfig`, documented in docs/alerts.md):

* SubspaceDrift        after lock, ``subspace_alignment < threshold``
* ChannelLeak          after lock, ``channel_energy_ratio < threshold``
* StableRankExcursion  after lock, ``stable_rank`` outside ``[median / factor, median · factor]``,
                       median over the last ``window`` post-lock checks of the same matrix
* VisibilitySpike      the per-step rise of ``bf16_visible_ratio`` since the previous check above
                       ``factor ×`` the median rise of the last ``window`` checks, and the check's
                       rise at least ``min_increase`` (so the fast rise at the start never fires)
* RunStalled           run level, on a timer: no report for longer than
                       ``max(min_seconds, factor · median check interval) + grace_seconds``

The four check rules are evaluated per matrix on every ingested check. Hysteresis: a matrix alert
fires after ``fire_after`` consecutive breaching checks and resolves after ``resolve_after``
consecutive healthy ones; a check where the rule cannot be evaluated (not locked yet, a null
estimate, too little history) leaves the counters alone. The run-level roll-up of a rule is one
alert per (run, rule) (``matrix`` null) that fires while at least ``rollup_min_matrices`` of the
run's matrices fire it; its ``value`` is the share of the run's matrices firing. Roll-ups are what
leaves the sidecar (webhook, gRPC stream); ``/api/v1/alerts`` lists both levels.

State (counters, the windows the rules need, open alerts) is saved through the store after every
check and restored at start, so a restart (kill -9 included) keeps open alerts and their streaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

RULES: tuple[str, ...] = (
    "SubspaceDrift",
    "ChannelLeak",
    "StableRankExcursion",
    "VisibilitySpike",
    "RunStalled",
)
CHECK_RULES: tuple[str, ...] = RULES[:4]

# Alertmanager writes this for "no end yet".
ZERO_TIME = "0001-01-01T00:00:00Z"


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubspaceDriftRule:
    """After lock: Sim_K(t, ref) = ``subspace_alignment`` below ``threshold``."""

    enabled: bool = True
    threshold: float = 0.7
    fire_after: int = 3
    resolve_after: int = 3
    severity: str = "warning"


@dataclass(frozen=True)
class ChannelLeakRule:
    """After lock: ‖ΔW·V_ref‖_F² / ‖ΔW‖_F² = ``channel_energy_ratio`` below ``threshold``.

    The lock needs ``topk_energy_ratio ≥ lock_min_energy`` (0.5), so at lock the channel holds at
    least half the update; 0.4 means it now holds less than a lock would have needed.
    """

    enabled: bool = True
    threshold: float = 0.4
    fire_after: int = 3
    resolve_after: int = 3
    severity: str = "warning"


@dataclass(frozen=True)
class StableRankExcursionRule:
    """After lock: stable rank s_t outside [m / factor, m · factor], m = median of the last
    ``window`` post-lock values (the current check excluded), once ``min_checks`` exist."""

    enabled: bool = True
    factor: float = 2.0
    window: int = 20
    min_checks: int = 5
    fire_after: int = 2
    resolve_after: int = 3
    severity: str = "info"


@dataclass(frozen=True)
class VisibilitySpikeRule:
    """Rise r_t = (v_t − v_{t−1}) / (step_t − step_{t−1}) of ``bf16_visible_ratio`` v above
    ``factor`` × the median of the last ``window`` rises, once ``min_checks`` rises exist, and the
    check's own rise v_t − v_{t−1} at least ``min_increase`` (a share of the matrix)."""

    enabled: bool = True
    factor: float = 5.0
    window: int = 10
    min_checks: int = 5
    min_increase: float = 0.01
    fire_after: int = 1
    resolve_after: int = 3
    severity: str = "warning"


@dataclass(frozen=True)
class RunStalledRule:
    """No report for longer than max(min_seconds, factor · median interval) + grace_seconds.

    The median is over the wall-clock intervals between the last ``window`` new steps of the run
    (as received); with fewer than two intervals the floor alone applies. A run silent for longer
    than ``forget_after_seconds`` is considered finished and its alert resolves.
    """

    enabled: bool = True
    factor: float = 5.0
    min_seconds: float = 60.0
    grace_seconds: float = 120.0
    window: int = 20
    evaluate_every_seconds: float = 15.0
    forget_after_seconds: float = 6 * 3600.0
    severity: str = "critical"


@dataclass(frozen=True)
class WebhookConfig:
    """Delivery of the Alertmanager webhook payload (version "4")."""

    receiver: str = "deltawatch"
    external_url: str = ""
    timeout_seconds: float = 10.0
    max_attempts: int = 10
    initial_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 60.0
    max_matrices_listed: int = 50
    headers: Mapping[str, str] = field(default_factory=dict)  # e.g. an Authorization header


@dataclass(frozen=True)
class AlertConfig:
    """Every alert setting; ``load_alert_config(path)`` reads it from a JSON or YAML file with the
    same nesting (``{"subspace_drift": {"threshold": 0.6}, ...}``); absent keys keep defaults."""

    subspace_drift: SubspaceDriftRule = field(default_factory=SubspaceDriftRule)
    channel_leak: ChannelLeakRule = field(default_factory=ChannelLeakRule)
    stable_rank_excursion: StableRankExcursionRule = field(default_factory=StableRankExcursionRule)
    visibility_spike: VisibilitySpikeRule = field(default_factory=VisibilitySpikeRule)
    run_stalled: RunStalledRule = field(default_factory=RunStalledRule)
    webhook: WebhookConfig = field(default_factory=WebhookConfig)
    rollup_min_matrices: int = 1
    resolved_retention_seconds: float = 3600.0
    persist_every_seconds: float = 1.0

    def __post_init__(self) -> None:
        _validate(self)

    def rule(self, name: str) -> Any:
        return getattr(self, RULE_SECTIONS[name])


RULE_SECTIONS: dict[str, str] = {
    "SubspaceDrift": "subspace_drift",
    "ChannelLeak": "channel_leak",
    "StableRankExcursion": "stable_rank_excursion",
    "VisibilitySpike": "visibility_spike",
    "RunStalled": "run_stalled",
}
_SECTION_TYPES: dict[str, type] = {
    "subspace_drift": SubspaceDriftRule,
    "channel_leak": ChannelLeakRule,
    "stable_rank_excursion": StableRankExcursionRule,
    "visibility_spike": VisibilitySpikeRule,
    "run_stalled": RunStalledRule,
    "webhook": WebhookConfig,
}


def _validate(config: AlertConfig) -> None:
    for section, cls in _SECTION_TYPES.items():
        value = getattr(config, section)
        if not isinstance(value, cls):
            raise ValueError(f"alert config: {section} must be a {cls.__name__}, got {value!r}")
        for f in fields(value):
            v = getattr(value, f.name)
            where = f"alert config: {section}.{f.name}"
            if f.name in ("fire_after", "resolve_after", "window", "min_checks", "max_attempts"):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ValueError(f"{where} must be an integer >= 1, got {v!r}")
            elif f.name == "severity":
                if not isinstance(v, str) or not v:
                    raise ValueError(f"{where} must be a non-empty string, got {v!r}")
            elif f.name == "enabled":
                if not isinstance(v, bool):
                    raise ValueError(f"{where} must be true or false, got {v!r}")
            elif f.name in ("receiver", "external_url"):
                if not isinstance(v, str):
                    raise ValueError(f"{where} must be a string, got {v!r}")
            elif f.name == "headers":
                if not isinstance(v, Mapping) or not all(
                    isinstance(k, str) and isinstance(x, str) for k, x in v.items()
                ):
                    raise ValueError(f"{where} must map header names to strings, got {v!r}")
            elif f.name == "grace_seconds":
                if not _is_number(v) or v < 0:
                    raise ValueError(f"{where} must be a number >= 0, got {v!r}")
            elif f.name == "max_matrices_listed":
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise ValueError(f"{where} must be an integer >= 0, got {v!r}")
            elif not _is_number(v) or v <= 0:
                raise ValueError(f"{where} must be a number > 0, got {v!r}")
        if section in ("subspace_drift", "channel_leak") and not 0 < value.threshold <= 1:
            raise ValueError(
                f"alert config: {section}.threshold is a ratio in (0, 1], got {value.threshold!r}"
            )
        if section in ("stable_rank_excursion", "visibility_spike") and value.factor <= 1:
            raise ValueError(f"alert config: {section}.factor must be > 1, got {value.factor!r}")
    if not isinstance(config.rollup_min_matrices, int) or config.rollup_min_matrices < 1:
        raise ValueError(
            f"alert config: rollup_min_matrices must be an integer >= 1, "
            f"got {config.rollup_min_matrices!r}"
        )
    for name in ("resolved_retention_seconds", "persist_every_seconds"):
        v = getattr(config, name)
        if not _is_number(v) or v < 0:
            raise ValueError(f"alert config: {name} must be a number >= 0, got {v!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def alert_config_from_mapping(data: Mapping[str, Any]) -> AlertConfig:
    """Build an AlertConfig from nested plain data; unknown keys are refused by name."""
    if not isinstance(data, Mapping):
        raise ValueError(f"alert config: expected a mapping at the top, got {type(data).__name__}")
    top = {f.name for f in fields(AlertConfig)}
    unknown = sorted(set(data) - top)
    if unknown:
        raise ValueError(f"alert config: unknown key(s) {unknown}; known keys: {sorted(top)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        cls = _SECTION_TYPES.get(key)
        if cls is None:
            kwargs[key] = value
            continue
        if not isinstance(value, Mapping):
            raise ValueError(f"alert config: {key} must be a mapping, got {value!r}")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(value) - known)
        if bad:
            raise ValueError(f"alert config: unknown key(s) {bad} in {key}; known: {sorted(known)}")
        kwargs[key] = cls(**value)
    return AlertConfig(**kwargs)


def load_alert_config(path: str | Path) -> AlertConfig:
    """Read an AlertConfig from a ``.json``, ``.yaml`` or ``.yml`` file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover - PyYAML ships with the dev extra
            raise ValueError(
                f"alert config {path}: reading YAML needs PyYAML (pip install PyYAML), "
                "or write the same settings as JSON"
            ) from exc
        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    try:
        return alert_config_from_mapping(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc


def alert_config_to_mapping(config: AlertConfig) -> dict[str, Any]:
    return asdict(config)


# --------------------------------------------------------------------------------------------
# The rules: one plain function each, (keys, memory, rule) -> (breach or None, value)
# --------------------------------------------------------------------------------------------


def _num(keys: Mapping[str, Any], key: str) -> float | None:
    """The key's value as a finite float, or None (null, absent or not finite)."""
    v = keys.get(key)
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _is_locked(keys: Mapping[str, Any]) -> bool:
    v = keys.get("locked")
    return bool(v) if v is not None else False


def subspace_drift(
    keys: Mapping[str, Any], rule: SubspaceDriftRule
) -> tuple[bool | None, float | None]:
    """Breach when locked and subspace_alignment < threshold; None when not evaluable."""
    a = _num(keys, "subspace_alignment")
    if not _is_locked(keys) or a is None:
        return None, a
    return a < rule.threshold, a


def channel_leak(
    keys: Mapping[str, Any], rule: ChannelLeakRule
) -> tuple[bool | None, float | None]:
    """Breach when locked and channel_energy_ratio < threshold; None when not evaluable."""
    e = _num(keys, "channel_energy_ratio")
    if not _is_locked(keys) or e is None:
        return None, e
    return e < rule.threshold, e


def stable_rank_excursion(
    keys: Mapping[str, Any], memory: dict[str, Any], rule: StableRankExcursionRule
) -> tuple[bool | None, float | None]:
    """Breach when s_t ∉ [m / factor, m · factor], m = median(last ``window`` post-lock s).

    ``memory["stable_ranks"]`` keeps the window; the current value joins it after the test.
    """
    s = _num(keys, "stable_rank")
    if not _is_locked(keys) or s is None:
        return None, s
    window: list[float] = memory.setdefault("stable_ranks", [])
    verdict: bool | None = None
    if len(window) >= rule.min_checks:
        m = statistics.median(window)
        verdict = not (m / rule.factor <= s <= m * rule.factor)
    window.append(s)
    del window[: -rule.window]
    return verdict, s


def visibility_spike(
    keys: Mapping[str, Any], step: int, memory: dict[str, Any], rule: VisibilitySpikeRule
) -> tuple[bool | None, float | None]:
    """Breach when r_t > factor · median(last ``window`` rises) and v_t − v_{t−1} ≥ min_increase.

    r_t = (v_t − v_{t−1}) / (step_t − step_{t−1}), per step so a dropped report (a longer gap)
    does not read as a spike. ``value`` is the check's rise v_t − v_{t−1}. A step that goes back
    (a resumed run) restarts the comparison from this check.
    """
    v = _num(keys, "bf16_visible_ratio")
    if v is None:
        return None, None
    prev = memory.get("visible")
    memory["visible"] = [step, v]
    if prev is None or step <= prev[0]:
        if prev is not None:
            memory["rises"] = []
        return None, None
    increase = v - prev[1]
    rise = increase / (step - prev[0])
    rises: list[float] = memory.setdefault("rises", [])
    verdict: bool | None = None
    if len(rises) >= rule.min_checks:
        typical = statistics.median(rises)
        verdict = increase >= rule.min_increase and rise > rule.factor * max(typical, 0.0)
    rises.append(rise)
    del rises[: -rule.window]
    return verdict, increase


def stall_threshold_seconds(intervals: list[float], rule: RunStalledRule) -> float:
    """max(min_seconds, factor · median(intervals)) + grace_seconds (floor alone under 2 intervals)."""
    base = rule.min_seconds
    if len(intervals) >= 2:
        base = max(base, rule.factor * statistics.median(intervals))
    return base + rule.grace_seconds


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


def rfc3339(t: float) -> str:
    """Seconds since the epoch -> RFC 3339 UTC with milliseconds ("2026-11-26T15:04:05.123Z")."""
    d = datetime.fromtimestamp(t, tz=timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


def alert_id(run: str, rule: str, matrix: str | None, started_at: float) -> str:
    """Stable id of one firing episode: sha1(run, rule, matrix, start) truncated to 16 hex."""
    raw = json.dumps([run, rule, matrix, round(started_at, 3)])
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def fingerprint(labels: Mapping[str, str]) -> str:
    """Alertmanager-style fingerprint: a hash of the sorted label set, 16 hex digits."""
    raw = "\xff".join(f"{k}\xfe{labels[k]}" for k in sorted(labels))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@dataclass
class AlertState:
    """Hysteresis and episode state of one (run, rule, matrix); matrix None for run-level."""

    run: str
    rule: str
    matrix: str | None
    state: str = "inactive"  # "inactive" | "firing" | "resolved"
    bad: int = 0
    good: int = 0
    started_at: float | None = None
    ended_at: float | None = None
    value: float | None = None
    step: int | None = None
    summary: str = ""

    def item(self, severity: str) -> dict[str, Any]:
        """The DESIGN §4 ``/api/v1/alerts`` item."""
        return {
            "id": alert_id(self.run, self.rule, self.matrix, self.started_at or 0.0),
            "rule": self.rule,
            "run": self.run,
            "matrix": self.matrix,
            "state": self.state,
            "severity": severity,
            "started_at": rfc3339(self.started_at) if self.started_at is not None else None,
            "ended_at": rfc3339(self.ended_at) if self.ended_at is not None else None,
            "value": self.value,
            "summary": self.summary,
        }


def hysteresis(
    state: AlertState, breach: bool | None, now: float, fire_after: int, resolve_after: int
) -> str | None:
    """Count consecutive breaching / healthy checks; fire after N, resolve after M.

    Returns "firing" or "resolved" on a transition, else None. None (not evaluable) counts nothing.
    """
    if breach is None:
        return None
    if breach:
        state.bad += 1
        state.good = 0
        if state.state != "firing" and state.bad >= fire_after:
            state.state, state.started_at, state.ended_at = "firing", now, None
            return "firing"
    else:
        state.good += 1
        state.bad = 0
        if state.state == "firing" and state.good >= resolve_after:
            state.state, state.ended_at = "resolved", now
            return "resolved"
    return None


@dataclass
class RunActivity:
    """What RunStalled needs of a run: the last step seen and when new steps arrived."""

    last_step: int | None = None
    last_report_at: float | None = None
    step_times: list[float] = field(default_factory=list)
    finished: bool = False  # the trainer said goodbye; a new report reopens the run

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.step_times[:-1], self.step_times[1:], strict=True)]


class AlertStateStore(Protocol):
    """Where alert state lives across restarts (``StoreAlertState`` adapts sidecar/store.py)."""

    def load(self) -> dict[str, dict[str, Any]]: ...

    def save(self, items: Mapping[str, dict[str, Any]]) -> None: ...


class MemoryAlertState:
    """Alert state kept in memory only (tests, or a sidecar without a data dir)."""

    def __init__(self) -> None:
        self._items: dict[str, str] = {}

    def load(self) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v in self._items.items()}

    def save(self, items: Mapping[str, dict[str, Any]]) -> None:
        for k, v in items.items():
            self._items[k] = json.dumps(v)


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


Sink = Callable[[dict[str, Any], list[str]], None]


class AlertEngine:
    """Evaluates the rules on every ingested check and on a timer; thread-safe.

    ``observe(run, matrix, step, keys)`` is the engine's "a check was ingested" listener; ``tick()``
    is the RunStalled timer. Roll-up transitions (dicts in the ``/api/v1/alerts`` item shape) go to
    every sink added with ``add_sink`` (webhook, gRPC stream), outside the lock.
    """

    def __init__(
        self,
        config: AlertConfig | None = None,
        state_store: AlertStateStore | None = None,
        *,
        clock: Callable[[], float] = time.time,
        run_matrices: Callable[[str], int | None] | None = None,
    ) -> None:
        self.config = config or AlertConfig()
        self._store = state_store or MemoryAlertState()
        self._clock = clock
        self._run_matrices = run_matrices
        self._lock = threading.RLock()
        self._sinks: list[Sink] = []
        self._states: dict[tuple[str, str, str | None], AlertState] = {}
        self._memory: dict[tuple[str, str], dict[str, Any]] = {}  # (run, matrix) -> rule windows
        self._matrices: dict[str, set[str]] = {}  # run -> matrices seen
        self._activity: dict[str, RunActivity] = {}
        self._dirty: tuple[set, set, set] = (set(), set(), set())  # states, memories, runs
        self._load()
        # A sidecar that was down is not a stalled run: silence counts from this start at most.
        self._started_at = self._clock()

    # -- persistence ------------------------------------------------------------------------

    def _load(self) -> None:
        for key, data in self._store.load().items():
            kind = data.get("kind")
            if kind == "alert":
                s = AlertState(**data["state"])
                self._states[(s.run, s.rule, s.matrix)] = s
                if s.matrix is not None:
                    self._matrices.setdefault(s.run, set()).add(s.matrix)
            elif kind == "memory":
                self._memory[(data["run"], data["matrix"])] = data["memory"]
                self._matrices.setdefault(data["run"], set()).add(data["matrix"])
            elif kind == "activity":
                self._activity[data["run"]] = RunActivity(**data["activity"])
            else:
                log.warning("alert state %s: unknown kind %r, ignored", key, kind)

    def flush(self) -> None:
        """Write every changed item to the state store. Transitions are written at once; the
        counters and windows of checks without one are written here, which the AlertService calls
        every ``persist_every_seconds`` and at shutdown (so a kill -9 loses at most that much of
        the streaks, never an open alert)."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        states, memories, runs = self._dirty
        self._save([self._states[k] for k in states], list(memories), list(runs))
        for dirty in self._dirty:
            dirty.clear()

    def _save(
        self,
        states: Iterable[AlertState],
        memories: Iterable[tuple[str, str]] = (),
        runs: Iterable[str] = (),
    ) -> None:
        items: dict[str, dict[str, Any]] = {}
        for s in states:
            items[json.dumps(["alert", s.run, s.rule, s.matrix])] = {
                "kind": "alert",
                "state": asdict(s),
                "severity": self.config.rule(s.rule).severity,
            }
        for run, matrix in memories:
            items[json.dumps(["memory", run, matrix])] = {
                "kind": "memory",
                "run": run,
                "matrix": matrix,
                "memory": self._memory[(run, matrix)],
            }
        for run in runs:
            items[json.dumps(["activity", run])] = {
                "kind": "activity",
                "run": run,
                "activity": asdict(self._activity[run]),
            }
        if items:
            try:
                self._store.save(items)
            except Exception:  # a full disk must not take ingest down with it
                log.exception("could not persist alert state")

    # -- sinks ------------------------------------------------------------------------------

    def add_sink(self, sink: Sink) -> None:
        """Call ``sink(item, matrices)`` for every run-level firing/resolved transition and every
        change of a firing roll-up's matrix set; ``matrices`` are the matrices firing it."""
        self._sinks.append(sink)

    def _emit(self, items: list[tuple[dict[str, Any], list[str]]]) -> None:
        for item, matrices in items:
            for sink in self._sinks:
                try:
                    sink(item, matrices)
                except Exception:
                    log.exception("alert sink %r failed", sink)

    # -- evaluation -------------------------------------------------------------------------

    def observe(
        self, run: str, matrix: str, step: int, keys: Mapping[str, Any], now: float | None = None
    ) -> list[dict[str, Any]]:
        """Evaluate the check rules for one ingested check; returns the roll-up transitions."""
        now = self._clock() if now is None else now
        with self._lock:
            self._matrices.setdefault(run, set()).add(matrix)
            memory = self._memory.setdefault((run, matrix), {})
            changed: list[AlertState] = []
            rules_touched: list[str] = []
            for rule_name in CHECK_RULES:
                rule = self.config.rule(rule_name)
                if not rule.enabled:
                    continue
                if rule_name == "SubspaceDrift":
                    breach, value = subspace_drift(keys, rule)
                elif rule_name == "ChannelLeak":
                    breach, value = channel_leak(keys, rule)
                elif rule_name == "StableRankExcursion":
                    breach, value = stable_rank_excursion(keys, memory, rule)
                else:
                    breach, value = visibility_spike(keys, step, memory, rule)
                s = self._states.get((run, rule_name, matrix))
                if s is None:
                    if not breach:
                        continue
                    s = self._states[(run, rule_name, matrix)] = AlertState(run, rule_name, matrix)
                before = (s.state, s.bad, s.good)
                transition = hysteresis(s, breach, now, rule.fire_after, rule.resolve_after)
                if breach is not None:
                    s.value, s.step = value, step
                    if s.state == "firing" or transition:
                        s.summary = _matrix_summary(rule_name, rule, run, matrix, step, value)
                if transition or (s.state, s.bad, s.good) != before:
                    changed.append(s)
                if transition:
                    rules_touched.append(rule_name)
            activity_changed = self._note_activity(run, step, now)
            rollups = [self._rollup(run, r, now) for r in rules_touched]
            rollups += self._clear_stall(run, now)
            rollups = [r for r in rollups if r is not None]
            states, memories, runs = self._dirty
            states.update((s.run, s.rule, s.matrix) for s in changed + [r[0] for r in rollups])
            memories.add((run, matrix))
            if activity_changed:
                runs.add(run)
            if rollups or rules_touched or self.config.persist_every_seconds == 0:
                self._flush_locked()
            emitted = [(r[1], self.firing_matrices(run, r[1]["rule"])) for r in rollups]
        self._emit(emitted)
        return [item for item, _ in emitted]

    def _note_activity(self, run: str, step: int, now: float) -> bool:
        """Record a report for RunStalled; a new (higher) step adds an arrival time."""
        a = self._activity.setdefault(run, RunActivity())
        a.last_report_at = now
        a.finished = False
        if a.last_step is None or step > a.last_step:
            a.last_step = step
            a.step_times.append(now)
            del a.step_times[: -(self.config.run_stalled.window + 1)]
            return True
        if step < a.last_step:  # a resumed run counts from its resume step again
            a.last_step = step
            a.step_times = [now]
        return True

    def finish_run(self, run: str, now: float | None = None) -> list[dict[str, Any]]:
        """The run's trainer closed its Monitor (a gRPC Goodbye): a finished run is not a
        stalled one. RunStalled stops watching it (and resolves if firing) until it reports again.
        Returns the roll-up transitions."""
        now = self._clock() if now is None else now
        with self._lock:
            a = self._activity.setdefault(run, RunActivity())
            a.finished = True
            self._dirty[2].add(run)
            out = self._clear_stall(run, now)
            if out:
                out[0][0].summary = f"run {run} finished (its trainer said goodbye)"
                out = [(out[0][0], out[0][0].item(self.config.run_stalled.severity))]
                self._dirty[0].add((run, "RunStalled", None))
            self._flush_locked()
        self._emit([(item, []) for _, item in out])
        return [item for _, item in out]

    def firing_matrices(self, run: str, rule: str) -> list[str]:
        """The matrices of ``run`` where ``rule`` is firing, sorted."""
        with self._lock:
            return sorted(
                m
                for (r, ru, m), s in self._states.items()
                if r == run and ru == rule and m is not None and s.state == "firing"
            )

    def _matrix_count(self, run: str) -> int:
        n = self._run_matrices(run) if self._run_matrices else None
        return max(n or 0, len(self._matrices.get(run, ())), 1)

    def _rollup(self, run: str, rule: str, now: float) -> tuple[AlertState, dict[str, Any]] | None:
        """Update the run-level alert of (run, rule) from its matrices; returns it on a change."""
        firing = self.firing_matrices(run, rule)
        s = self._states.setdefault((run, rule, None), AlertState(run, rule, None))
        cfg = self.config.rule(rule)
        total = self._matrix_count(run)
        if len(firing) >= self.config.rollup_min_matrices:
            listed = _list_matrices(firing, self.config.webhook.max_matrices_listed)
            summary = f"{rule} on {len(firing)} of {total} matrices of run {run}: {listed}"
            if s.state != "firing":
                s.state, s.started_at, s.ended_at = "firing", now, None
            elif summary == s.summary:
                return None
            s.value, s.summary = len(firing) / total, summary
            s.step = self._activity.get(run, RunActivity()).last_step
            return s, s.item(cfg.severity)
        if s.state == "firing":
            s.state, s.ended_at, s.value = "resolved", now, len(firing) / total
            s.summary = f"{rule} resolved on run {run}"
            return s, s.item(cfg.severity)
        return None

    def _clear_stall(self, run: str, now: float) -> list[tuple[AlertState, dict[str, Any]] | None]:
        s = self._states.get((run, "RunStalled", None))
        if s is None or s.state != "firing":
            return []
        s.state, s.ended_at, s.value = "resolved", now, 0.0
        s.summary = f"run {run} reports again"
        return [(s, s.item(self.config.run_stalled.severity))]

    def tick(self, now: float | None = None) -> list[dict[str, Any]]:
        """The timer: RunStalled for every run, and forgetting long-resolved alerts."""
        now = self._clock() if now is None else now
        rule = self.config.run_stalled
        out: list[tuple[AlertState, dict[str, Any]]] = []
        with self._lock:
            if rule.enabled:
                for run, a in self._activity.items():
                    if a.last_report_at is None or a.finished:
                        continue
                    silent = now - max(a.last_report_at, self._started_at)
                    limit = stall_threshold_seconds(a.intervals(), rule)
                    s = self._states.get((run, "RunStalled", None))
                    if silent > limit and silent <= rule.forget_after_seconds:
                        if s is None:
                            s = self._states[(run, "RunStalled", None)] = AlertState(
                                run, "RunStalled", None
                            )
                        s.value = silent
                        if s.state != "firing":
                            s.state, s.started_at, s.ended_at = "firing", now, None
                            s.step = a.last_step
                            s.summary = (
                                f"run {run}: no report for {silent:.0f} s (limit {limit:.0f} s; "
                                f"last step {a.last_step})"
                            )
                            out.append((s, s.item(rule.severity)))
                    elif s is not None and s.state == "firing":
                        s.state, s.ended_at = "resolved", now
                        s.summary = f"run {run}: silent for {silent:.0f} s, considered finished"
                        out.append((s, s.item(rule.severity)))
            self._forget(now)
            self._dirty[0].update((s.run, s.rule, s.matrix) for s, _ in out)
            self._flush_locked()
        self._emit([(i, []) for _, i in out])
        return [i for _, i in out]

    def _forget(self, now: float) -> None:
        keep = self.config.resolved_retention_seconds
        for s in self._states.values():
            if s.state == "resolved" and s.ended_at is not None and now - s.ended_at > keep:
                s.state = "inactive"

    # -- read side --------------------------------------------------------------------------

    def alerts(self, now: float | None = None) -> list[dict[str, Any]]:
        """``/api/v1/alerts`` items: firing, and resolved within ``resolved_retention_seconds``;
        run-level first, then by run, rule, matrix."""
        now = self._clock() if now is None else now
        keep = self.config.resolved_retention_seconds
        with self._lock:
            chosen = [
                s
                for s in self._states.values()
                if s.state == "firing"
                or (s.state == "resolved" and s.ended_at is not None and now - s.ended_at <= keep)
            ]
            chosen.sort(
                key=lambda s: (s.matrix is not None, s.run, RULES.index(s.rule), s.matrix or "")
            )
            return [s.item(self.config.rule(s.rule).severity) for s in chosen]

    def firing_counts(self) -> dict[tuple[str, str], int]:
        """{(run, rule): firing alerts} for ``deltawatch_alerts_firing``: matrices firing for the
        check rules, 1 or 0 for RunStalled; every rule of every known run, zeros included."""
        with self._lock:
            runs = set(self._matrices) | set(self._activity)
            counts = {(run, rule): 0 for run in runs for rule in RULES}
            for (run, rule, matrix), s in self._states.items():
                if s.state == "firing" and (matrix is not None or rule == "RunStalled"):
                    counts[(run, rule)] = counts.get((run, rule), 0) + 1
            return counts

    def __call__(self) -> list[dict[str, Any]]:
        """The HTTP app's alerts provider: ``make_app(..., alerts=alert_engine)``."""
        return self.alerts()


def _list_matrices(names: list[str], limit: int) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", … and {len(names) - limit} more"


def _matrix_summary(
    rule_name: str, rule: Any, run: str, matrix: str, step: int, value: float | None
) -> str:
    v = "null" if value is None else f"{value:.4g}"
    if rule_name == "SubspaceDrift":
        return (
            f"{matrix} (run {run}, step {step}): subspace_alignment {v} "
            f"< {rule.threshold} — the update left its locked channel"
        )
    if rule_name == "ChannelLeak":
        return (
            f"{matrix} (run {run}, step {step}): channel_energy_ratio {v} "
            f"< {rule.threshold} — the update's energy leaks out of the locked channel"
        )
    if rule_name == "StableRankExcursion":
        return (
            f"{matrix} (run {run}, step {step}): stable_rank {v} outside ×{rule.factor} "
            "of its running median"
        )
    return (
        f"{matrix} (run {run}, step {step}): bf16_visible_ratio rose by {v} in one check, "
        f"over {rule.factor}× its recent typical rise"
    )


# --------------------------------------------------------------------------------------------
# Persistence through sidecar/store.py
# --------------------------------------------------------------------------------------------


class StoreAlertState:
    """Alert state in the sidecar store (sidecar/store.py): the hysteresis state as alert-state
    items (``save_alert_state``: one transaction per observed check), and every firing/resolved
    episode in its ``alerts`` table (``save_alert``, once per transition).
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self._episodes: dict[str, str] = {}  # episode id -> state last written

    def load(self) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v in self._store.load_alert_state().items()}

    def save(self, items: Mapping[str, dict[str, Any]]) -> None:
        self._store.save_alert_state({k: json.dumps(v) for k, v in items.items()})
        for v in items.values():
            s = v.get("state") if v.get("kind") == "alert" else None
            if not s or s["state"] not in ("firing", "resolved") or s["started_at"] is None:
                continue
            aid = alert_id(s["run"], s["rule"], s["matrix"], s["started_at"])
            if self._episodes.get(aid) != s["state"]:
                self._episodes[aid] = s["state"]
                self._store.save_alert(
                    id=aid,
                    rule=s["rule"],
                    run=s["run"],
                    matrix=s["matrix"],
                    state=s["state"],
                    severity=v.get("severity", ""),
                    started_at=s["started_at"],
                    ended_at=s["ended_at"],
                    value=s["value"],
                    summary=s["summary"],
                )


# --------------------------------------------------------------------------------------------
# The Alertmanager webhook
# --------------------------------------------------------------------------------------------


def webhook_payload(
    item: Mapping[str, Any], config: AlertConfig, matrices: list[str] | None = None
) -> dict[str, Any]:
    """The Alertmanager webhook payload, version "4", of one (run, rule) group.

    One alert (the run-level roll-up) per group; the group's matrices are listed in the
    ``matrices`` annotation (at most ``webhook.max_matrices_listed``, then "… and N more").
    """
    wh = config.webhook
    rule, run = item["rule"], item["run"]
    labels = {"alertname": rule, "run": run, "severity": item["severity"], "service": "deltawatch"}
    annotations = {"summary": item["summary"], "description": _DESCRIPTIONS[rule]}
    if matrices:
        annotations["matrices"] = _list_matrices(matrices, wh.max_matrices_listed)
        annotations["matrix_count"] = str(len(matrices))
    if item.get("value") is not None:
        annotations["value"] = f"{item['value']:.6g}"
    base = wh.external_url.rstrip("/")
    alert = {
        "status": item["state"],
        "labels": labels,
        "annotations": annotations,
        "startsAt": item["started_at"],
        "endsAt": item["ended_at"]
        if item["state"] == "resolved" and item["ended_at"]
        else ZERO_TIME,
        "generatorURL": f"{base}/api/v1/runs/{run}" if base else "",
        "fingerprint": fingerprint(labels),
    }
    group_labels = {"alertname": rule, "run": run}
    return {
        "version": "4",
        "groupKey": "{}:{" + ", ".join(f'{k}="{v}"' for k, v in group_labels.items()) + "}",
        "truncatedAlerts": 0,
        "status": item["state"],
        "receiver": wh.receiver,
        "groupLabels": group_labels,
        "commonLabels": dict(labels),
        "commonAnnotations": dict(annotations),
        "externalURL": base,
        "alerts": [alert],
    }


_DESCRIPTIONS: dict[str, str] = {
    "SubspaceDrift": "After the lock, the update's top-K subspace moved away from the locked "
    "reference (Sim_K(t, ref) below the threshold on consecutive checks).",
    "ChannelLeak": "After the lock, the share of the update's energy inside the locked channel "
    "fell below the threshold on consecutive checks.",
    "StableRankExcursion": "After the lock, the update's stable rank left the band around its "
    "running median.",
    "VisibilitySpike": "The share of weights visibly changed in bf16 jumped far above its recent "
    "typical rise in one check.",
    "RunStalled": "The run sent no report for much longer than its usual check interval.",
}


def backoff_seconds(attempt: int, config: WebhookConfig, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform(0, min(max, initial · 2^attempt))."""
    cap = min(config.max_backoff_seconds, config.initial_backoff_seconds * 2.0**attempt)
    return (rng or random).uniform(0.0, cap)


class WebhookSender:
    """POSTs group payloads to ``url`` from a background task; never blocks the caller.

    ``submit`` may be called from any thread. Per (run, rule) group the newest payload wins: a
    firing payload still being retried is replaced by its resolution. Retries: connection errors,
    timeouts, 429 and 5xx, with full-jitter exponential backoff up to ``max_attempts``; other 4xx
    are logged and dropped.
    """

    def __init__(
        self,
        url: str,
        config: AlertConfig,
        *,
        headers: Mapping[str, str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.url = url
        self.config = config
        self._headers = dict(config.webhook.headers if headers is None else headers)
        self._rng = rng or random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: Any = None
        self._pending: dict[str, dict[str, Any]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.delivered = 0
        self.failed = 0
        self.attempts = 0

    async def start(self) -> None:
        import aiohttp

        self._loop = asyncio.get_running_loop()
        timeout = aiohttp.ClientTimeout(total=self.config.webhook.timeout_seconds)
        self._session = aiohttp.ClientSession(timeout=timeout)

    def submit(self, payload: dict[str, Any]) -> None:
        """Queue ``payload`` for its group (thread-safe; returns at once)."""
        if self._loop is None:
            raise RuntimeError("WebhookSender.submit before start()")
        self._loop.call_soon_threadsafe(self._enqueue, payload)

    def _enqueue(self, payload: dict[str, Any]) -> None:
        key = payload["groupKey"]
        self._pending[key] = payload
        task = self._tasks.get(key)
        if task is None or task.done():
            self._tasks[key] = asyncio.ensure_future(self._deliver(key))

    async def _deliver(self, key: str) -> None:
        wh = self.config.webhook
        while key in self._pending:
            payload = self._pending.pop(key)
            for attempt in range(wh.max_attempts):
                self.attempts += 1
                retry, reason = await self._post(payload)
                if not retry:
                    break
                if key in self._pending:  # a newer payload for the group supersedes this one
                    break
                if attempt + 1 == wh.max_attempts:
                    self.failed += 1
                    log.warning(
                        "alert webhook %s: gave up on %s after %d attempts (%s)",
                        self.url,
                        key,
                        wh.max_attempts,
                        reason,
                    )
                    break
                await asyncio.sleep(backoff_seconds(attempt, wh, self._rng))

    async def _post(self, payload: dict[str, Any]) -> tuple[bool, str]:
        """One POST; returns (retry?, reason)."""
        try:
            async with self._session.post(self.url, json=payload, headers=self._headers) as resp:
                await resp.read()
                if resp.status < 300:
                    self.delivered += 1
                    return False, "ok"
                if resp.status == 429 or resp.status >= 500:
                    return True, f"HTTP {resp.status}"
                self.failed += 1
                log.warning("alert webhook %s answered HTTP %d; not retried", self.url, resp.status)
                return False, f"HTTP {resp.status}"
        except (OSError, asyncio.TimeoutError) as exc:
            return True, f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # aiohttp.ClientError and friends
            return True, f"{type(exc).__name__}: {exc}"

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until every queued payload has been delivered or given up."""

        async def _wait() -> None:
            while any(not t.done() for t in self._tasks.values()):
                await asyncio.gather(*self._tasks.values(), return_exceptions=True)

        await asyncio.wait_for(_wait(), timeout)

    async def close(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await self.drain(timeout)
        for t in self._tasks.values():
            t.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._session is not None:
            await self._session.close()


# --------------------------------------------------------------------------------------------
# Wiring: one object the server starts and stops
# --------------------------------------------------------------------------------------------


class AlertService:
    """The alert engine plus its deliveries, run on the server's event loop.

    ``publish(run, item)`` (e.g. ``IngestService.publish_alert``) receives every roll-up
    transition on the event loop; the webhook gets one POST per (run, rule) group.
    """

    def __init__(
        self,
        engine: AlertEngine,
        *,
        webhook_url: str | None = None,
        publish: Callable[[str, dict[str, Any]], Any] | None = None,
        webhook_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.engine = engine
        self.webhook = (
            WebhookSender(webhook_url, engine.config, headers=webhook_headers)
            if webhook_url
            else None
        )
        self._publish = publish
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.webhook is not None:
            await self.webhook.start()
        self.engine.add_sink(self._on_transition)
        self._timer = asyncio.ensure_future(self._tick_forever())
        self._flusher = asyncio.ensure_future(self._flush_forever())

    def _on_transition(self, item: dict[str, Any], matrices: list[str]) -> None:
        # Called on whichever thread evaluated the rule; everything below runs on the loop.
        if self._loop is None:
            return
        if self.webhook is not None:
            self.webhook.submit(webhook_payload(item, self.engine.config, matrices))
        if self._publish is not None:
            self._loop.call_soon_threadsafe(self._publish_on_loop, item)

    def _publish_on_loop(self, item: dict[str, Any]) -> None:
        try:
            result = self._publish(item["run"], item)  # type: ignore[misc]
            if asyncio.iscoroutine(result):
                asyncio.ensure_future(result)
        except Exception:
            log.exception("publishing alert %s to the run's streams failed", item.get("id"))

    async def _tick_forever(self) -> None:
        period = self.engine.config.run_stalled.evaluate_every_seconds
        while True:
            await asyncio.sleep(period)
            try:
                await asyncio.to_thread(self.engine.tick)
            except Exception:
                log.exception("alert timer failed")

    async def _flush_forever(self) -> None:
        period = self.engine.config.persist_every_seconds
        if period == 0:
            return  # every check is written as it is observed
        while True:
            await asyncio.sleep(period)
            try:
                await asyncio.to_thread(self.engine.flush)
            except Exception:
                log.exception("persisting alert state failed")

    async def close(self) -> None:
        for task in (self._timer, self._flusher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await asyncio.to_thread(self.engine.flush)
        if self.webhook is not None:
            await self.webhook.close()


def with_overrides(config: AlertConfig, **sections: Mapping[str, Any]) -> AlertConfig:
    """A copy of ``config`` with some fields of some sections replaced (tests, CLI flags)."""
    changes: dict[str, Any] = {}
    for name, values in sections.items():
        current = getattr(config, name)
        changes[name] = replace(current, **values) if values is not None else current
    return replace(config, **changes)

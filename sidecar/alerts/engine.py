"""The alert engine: rules evaluated on every ingested check and on a timer, persisted state, and
the service that runs it with its deliveries on the server's event loop.

The four check rules are evaluated per matrix on every ingested check. Hysteresis: a matrix alert
fires after ``fire_after`` consecutive breaching checks and resolves after ``resolve_after``
consecutive healthy ones; a check where the rule cannot be evaluated (not locked yet, a null
estimate, too little history) leaves the counters alone. The run-level roll-up of a rule is one
alert per (run, rule) (``matrix`` null) that fires while at least ``rollup_min_matrices`` of the
run's matrices fire it; its ``value`` is the share of the run's matrices firing. Roll-ups are what
leaves the sidecar (webhook, Alertmanager, gRPC stream); ``/api/v1/alerts`` lists both levels.

State (counters, the windows the rules need, open alerts) is saved through the store after every
check and restored at start, so a restart (kill -9 included) keeps open alerts and their streaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from .alertmanager import AlertmanagerSender
from .config import AlertConfig
from .delivery import WebhookSender, webhook_payload
from .rules import CHECK_RULES, RULES, stall_threshold_seconds
from .state import AlertItem, AlertState, alert_id, hysteresis, list_matrices

log = logging.getLogger(__name__)


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


Sink = Callable[[AlertItem, list[str]], None]


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

    def _emit(self, items: list[tuple[AlertItem, list[str]]]) -> None:
        for item, matrices in items:
            for sink in self._sinks:
                try:
                    sink(item, matrices)
                except Exception:
                    log.exception("alert sink %r failed", sink)

    # -- evaluation -------------------------------------------------------------------------

    def observe(
        self, run: str, matrix: str, step: int, keys: Mapping[str, Any], now: float | None = None
    ) -> list[AlertItem]:
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
                breach, value = rule.evaluate(keys, step, memory)
                s = self._states.get((run, rule_name, matrix))
                if s is None:
                    if not breach:
                        continue
                    s = self._states[(run, rule_name, matrix)] = AlertState(run, rule_name, matrix)
                before = (s.state, s.bad, s.good)
                transition = hysteresis(s, breach, now, rule)
                if breach is not None:
                    s.value, s.step = value, step
                    if s.state == "firing" or transition:
                        s.summary = rule.summary(run, matrix, step, value)
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

    def finish_run(self, run: str, now: float | None = None) -> list[AlertItem]:
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

    def matrix_items(self, run: str, rule: str) -> list[AlertItem]:
        """The per-matrix alerts of (``run``, ``rule``) that are firing or resolved, by matrix."""
        severity = self.config.rule(rule).severity
        with self._lock:
            states = [
                s
                for (r, ru, m), s in self._states.items()
                if r == run and ru == rule and m is not None and s.state != "inactive"
            ]
            return [s.item(severity) for s in sorted(states, key=lambda s: s.matrix)]

    def _matrix_count(self, run: str) -> int:
        n = self._run_matrices(run) if self._run_matrices else None
        return max(n or 0, len(self._matrices.get(run, ())), 1)

    def _rollup(self, run: str, rule: str, now: float) -> tuple[AlertState, AlertItem] | None:
        """Update the run-level alert of (run, rule) from its matrices; returns it on a change."""
        firing = self.firing_matrices(run, rule)
        s = self._states.setdefault((run, rule, None), AlertState(run, rule, None))
        cfg = self.config.rule(rule)
        total = self._matrix_count(run)
        if len(firing) >= self.config.rollup_min_matrices:
            listed = list_matrices(firing, self.config.webhook.max_matrices_listed)
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

    def _clear_stall(self, run: str, now: float) -> list[tuple[AlertState, AlertItem] | None]:
        s = self._states.get((run, "RunStalled", None))
        if s is None or s.state != "firing":
            return []
        s.state, s.ended_at, s.value = "resolved", now, 0.0
        s.summary = f"run {run} reports again"
        return [(s, s.item(self.config.run_stalled.severity))]

    def tick(self, now: float | None = None) -> list[AlertItem]:
        """The timer: RunStalled for every run, and forgetting long-resolved alerts."""
        now = self._clock() if now is None else now
        rule = self.config.run_stalled
        out: list[tuple[AlertState, AlertItem]] = []
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

    def alerts(self, now: float | None = None) -> list[AlertItem]:
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

    def __call__(self) -> list[AlertItem]:
        """The HTTP app's alerts provider: ``make_app(..., alerts=alert_engine)``."""
        return self.alerts()


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


class AlertService:
    """The alert engine plus its deliveries, run on the server's event loop.

    ``publish(run, item)`` (e.g. ``IngestService.publish_alert``) receives every roll-up
    transition on the event loop; the webhook gets one POST per (run, rule) group; every
    Alertmanager of ``alertmanager_urls`` gets the group's alerts (per matrix for the check
    rules; alertmanager.py), ``external_url()`` being the sidecar's address for their
    ``generatorURL``. At start the alerts restored as firing are posted to Alertmanager again.
    """

    def __init__(
        self,
        engine: AlertEngine,
        *,
        webhook_url: str | None = None,
        publish: Callable[[str, AlertItem], Any] | None = None,
        webhook_headers: Mapping[str, str] | None = None,
        alertmanager_urls: Iterable[str] = (),
        external_url: Callable[[], str] = str,
    ) -> None:
        self.engine = engine
        self.webhook = (
            WebhookSender(webhook_url, engine.config, headers=webhook_headers)
            if webhook_url
            else None
        )
        urls = list(alertmanager_urls)
        self.alertmanager = (
            AlertmanagerSender(urls, engine.config.alertmanager, external_url=external_url)
            if urls
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
        if self.alertmanager is not None:
            await self.alertmanager.start()
        self.engine.add_sink(self._on_transition)
        if self.alertmanager is not None:
            for item in self.engine.alerts():
                if item["matrix"] is None and item["state"] == "firing":
                    self._to_alertmanager(item)
        self._timer = asyncio.ensure_future(self._tick_forever())
        self._flusher = asyncio.ensure_future(self._flush_forever())

    def _on_transition(self, item: AlertItem, matrices: list[str]) -> None:
        # Called on whichever thread evaluated the rule; everything below runs on the loop.
        if self._loop is None:
            return
        if self.webhook is not None:
            self.webhook.submit(webhook_payload(item, self.engine.config, matrices))
        if self.alertmanager is not None:
            self._to_alertmanager(item)
        if self._publish is not None:
            self._loop.call_soon_threadsafe(self._publish_on_loop, item)

    def _to_alertmanager(self, rollup: AlertItem) -> None:
        """The (run, rule) group's alerts for Alertmanager: RunStalled is the run-level alert
        itself; a check rule's are its matrices' alerts, none firing once the roll-up is not."""
        run, rule = rollup["run"], rollup["rule"]
        if rule not in CHECK_RULES:
            items = [rollup]
        else:
            items = self.engine.matrix_items(run, rule)
            if rollup["state"] != "firing":
                items = [i for i in items if i["state"] == "resolved"]
        self.alertmanager.submit(run, rule, items)  # type: ignore[union-attr]

    def _publish_on_loop(self, item: AlertItem) -> None:
        try:
            result = self._publish(item["run"], item)  # type: ignore[misc]
            if asyncio.iscoroutine(result):
                asyncio.ensure_future(result)
        except Exception:
            log.exception("publishing alert %s to the run's streams failed", item.get("id"))

    async def _tick_forever(self) -> None:
        period = self.engine.config.run_stalled.evaluate_every_seconds
        await _every(period, self.engine.tick, "alert timer failed")

    async def _flush_forever(self) -> None:
        period = self.engine.config.persist_every_seconds
        if period == 0:
            return  # every check is written as it is observed
        await _every(period, self.engine.flush, "persisting alert state failed")

    async def close(self) -> None:
        for task in (self._timer, self._flusher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await asyncio.to_thread(self.engine.flush)
        if self.webhook is not None:
            await self.webhook.close()
        if self.alertmanager is not None:
            await self.alertmanager.close()


async def _every(period: float, work: Callable[[], object], failure: str) -> None:
    """Run `work` on a worker thread every `period` seconds, forever; a failure is logged as
    `failure` and the next period runs again."""
    while True:
        await asyncio.sleep(period)
        try:
            await asyncio.to_thread(work)
        except Exception:
            log.exception(failure)

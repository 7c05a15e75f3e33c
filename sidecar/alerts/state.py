"""The state of one alert and how it moves: hysteresis counted in checks, episode ids, times.

Nothing here knows a rule: `AlertState` is one (run, rule, matrix) and `hysteresis` moves it
from the rule's verdict; `Hysteresis` is the settings base every check rule extends.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypedDict

# Alertmanager writes this for "no end yet".
ZERO_TIME = "0001-01-01T00:00:00Z"


RFC3339_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # what `rfc3339` writes (%f: milliseconds there)


def rfc3339(t: float) -> str:
    """Seconds since the epoch -> RFC 3339 UTC with milliseconds ("2026-11-26T15:04:05.123Z")."""
    d = datetime.fromtimestamp(t, tz=timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


def epoch_seconds(text: str) -> float:
    """The inverse of `rfc3339`: "2026-11-26T15:04:05.123Z" -> seconds since the epoch."""
    return datetime.strptime(text, RFC3339_FORMAT).replace(tzinfo=timezone.utc).timestamp()


def alert_id(run: str, rule: str, matrix: str | None, started_at: float) -> str:
    """Stable id of one firing episode: sha1(run, rule, matrix, start) truncated to 16 hex."""
    raw = json.dumps([run, rule, matrix, round(started_at, 3)])
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def fingerprint(labels: Mapping[str, str]) -> str:
    """Alertmanager-style fingerprint: a hash of the sorted label set, 16 hex digits."""
    raw = "\xff".join(f"{k}\xfe{labels[k]}" for k in sorted(labels))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def list_matrices(names: list[str], limit: int) -> str:
    """At most ``limit`` names, then "… and N more"."""
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", … and {len(names) - limit} more"


# Bounds of a setting, read by the config's validation (config.py) from the field's metadata:
# integers are >= 1 and numbers > 0 unless the field says otherwise.
RATIO = {"ratio": True}  # a number in (0, 1]
ABOVE_ONE = {"above": 1}  # a number > 1
AT_LEAST_ZERO = {"min": 0}  # an integer or a number >= 0


def setting(default: Any, bounds: Mapping[str, Any]) -> Any:
    """A dataclass field with ``default`` and the given bounds (RATIO, ABOVE_ONE, AT_LEAST_ZERO)."""
    return field(default=default, metadata=bounds)


@dataclass(frozen=True)
class RuleSettings:
    """What every rule has: on or off, and the severity its alerts carry."""

    enabled: bool = True
    severity: str = "warning"


@dataclass(frozen=True)
class Hysteresis(RuleSettings):
    """A check rule fires after ``fire_after`` consecutive breaching checks and resolves after
    ``resolve_after`` consecutive healthy ones (see `hysteresis`)."""

    fire_after: int = 3
    resolve_after: int = 3


class AlertItem(TypedDict):
    """One alert as ``/api/v1/alerts`` lists it (DESIGN §4) and the engine's sinks receive it."""

    id: str
    rule: str
    run: str
    matrix: str | None
    state: str
    severity: str
    started_at: str | None
    ended_at: str | None
    value: float | None
    summary: str


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

    def item(self, severity: str) -> AlertItem:
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
    state: AlertState, breach: bool | None, now: float, settings: Hysteresis
) -> str | None:
    """Count consecutive breaching / healthy checks; fire after N, resolve after M.

    Returns "firing" or "resolved" on a transition, else None. None (not evaluable) counts nothing.
    """
    if breach is None:
        return None
    if breach:
        state.bad += 1
        state.good = 0
        if state.state != "firing" and state.bad >= settings.fire_after:
            state.state, state.started_at, state.ended_at = "firing", now, None
            return "firing"
    else:
        state.good += 1
        state.bad = 0
        if state.state == "firing" and state.good >= settings.resolve_after:
            state.state, state.ended_at = "resolved", now
            return "resolved"
    return None

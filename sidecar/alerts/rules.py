"""The rules, one unit each: its settings (a frozen dataclass), how it evaluates a check, how it
describes itself. `@register` puts a rule in `REGISTRY`; the config, the engine, the webhook and
Alertmanager read every rule from there, so adding a rule is one class in this file.

Six rules (defaults documented in docs/alerts.md):

* SubspaceDrift        after lock, ``subspace_alignment < threshold``
* ChannelLeak          after lock, ``channel_energy_ratio < threshold``
* StableRankExcursion  after lock, ``stable_rank`` outside ``[median / factor, median · factor]``,
                       median over the last ``window`` post-lock checks of the same matrix
* VisibilitySpike      the per-step rise of ``bf16_visible_ratio`` since the previous check above
                       ``factor ×`` the median rise of the last ``window`` checks, and the check's
                       rise at least ``min_increase`` (so the fast rise at the start never fires)
* AuditError           a live self-audit (docs/audit.md) found a live estimate outside its stated
                       bound: the audit's worst error ratio ``> threshold`` (1 = the bound)
* RunStalled           run level, on a timer: no report for longer than
                       ``max(min_seconds, factor · median check interval) + grace_seconds``

A check rule's ``evaluate(keys, step, memory)`` returns ``(breach, value)``: breach True/False, or
None when the rule cannot be evaluated on this check (not locked yet, a null estimate, too little
history); ``memory`` is the matrix's own dict of the windows the rules keep (persisted).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from .state import ABOVE_ONE, AT_LEAST_ZERO, RATIO, Hysteresis, RuleSettings, setting


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


def _fmt(value: float | None) -> str:
    return "null" if value is None else f"{value:.4g}"


@dataclass(frozen=True)
class CheckRule(Hysteresis):
    """A rule evaluated per matrix on every ingested check, with hysteresis in checks."""

    name: ClassVar[str]  # the alert's name: the ``alertname`` and ``rule`` labels
    section: ClassVar[str]  # its section of the alert config file
    description: ClassVar[str]  # one sentence for people (webhook / Alertmanager annotation)

    def evaluate(
        self, keys: Mapping[str, Any], step: int, memory: dict[str, Any]
    ) -> tuple[bool | None, float | None]:
        raise NotImplementedError

    def summary(self, run: str, matrix: str, step: int, value: float | None) -> str:
        raise NotImplementedError


R = TypeVar("R", bound=type)
REGISTRY: dict[str, type[RuleSettings]] = {}  # rule name -> its settings class, in order


def register(cls: R) -> R:
    """Add a rule class to `REGISTRY` (its ``name`` and ``section`` must be new)."""
    if cls.name in REGISTRY or cls.section in {r.section for r in REGISTRY.values()}:
        raise ValueError(f"alert rule {cls.name} ({cls.section}) registered twice")
    REGISTRY[cls.name] = cls
    return cls


@dataclass(frozen=True)
class LockedBelowRule(CheckRule):
    """After lock: the key ``key`` below ``threshold``."""

    key: ClassVar[str]  # the §2 key the rule watches
    meaning: ClassVar[str]  # what a breach means, for the summary
    threshold: float = setting(0.5, RATIO)

    def evaluate(self, keys, step, memory):
        """Breach when locked and keys[key] < threshold; None when not evaluable."""
        v = _num(keys, self.key)
        if not _is_locked(keys) or v is None:
            return None, v
        return v < self.threshold, v

    def summary(self, run, matrix, step, value):
        return (
            f"{matrix} (run {run}, step {step}): {self.key} {_fmt(value)} "
            f"< {self.threshold} — {self.meaning}"
        )


@register
@dataclass(frozen=True)
class SubspaceDriftRule(LockedBelowRule):
    """After lock: Sim_K(t, ref) = ``subspace_alignment`` below ``threshold``."""

    name: ClassVar[str] = "SubspaceDrift"
    section: ClassVar[str] = "subspace_drift"
    description: ClassVar[str] = (
        "After the lock, the update's top-K subspace moved away from the locked reference "
        "(Sim_K(t, ref) below the threshold on consecutive checks)."
    )
    key: ClassVar[str] = "subspace_alignment"
    meaning: ClassVar[str] = "the update left its locked channel"
    threshold: float = setting(0.7, RATIO)


@register
@dataclass(frozen=True)
class ChannelLeakRule(LockedBelowRule):
    """After lock: ‖ΔW·V_ref‖_F² / ‖ΔW‖_F² = ``channel_energy_ratio`` below ``threshold``.

    The lock needs ``topk_energy_ratio ≥ lock_min_energy`` (0.5), so at lock the channel holds at
    least half the update; 0.4 means it now holds less than a lock would have needed.
    """

    name: ClassVar[str] = "ChannelLeak"
    section: ClassVar[str] = "channel_leak"
    description: ClassVar[str] = (
        "After the lock, the share of the update's energy inside the locked channel fell below "
        "the threshold on consecutive checks."
    )
    key: ClassVar[str] = "channel_energy_ratio"
    meaning: ClassVar[str] = "the update's energy leaks out of the locked channel"
    threshold: float = setting(0.4, RATIO)


@register
@dataclass(frozen=True)
class StableRankExcursionRule(CheckRule):
    """After lock: stable rank s_t outside [m / factor, m · factor], m = median of the last
    ``window`` post-lock values (the current check excluded), once ``min_checks`` exist."""

    name: ClassVar[str] = "StableRankExcursion"
    section: ClassVar[str] = "stable_rank_excursion"
    description: ClassVar[str] = (
        "After the lock, the update's stable rank left the band around its running median."
    )
    severity: str = "info"
    fire_after: int = 2
    factor: float = setting(2.0, ABOVE_ONE)
    window: int = 20
    min_checks: int = 5

    def evaluate(self, keys, step, memory):
        """Breach when s_t ∉ [m / factor, m · factor], m = median(last ``window`` post-lock s).

        ``memory["stable_ranks"]`` keeps the window; the current value joins it after the test.
        """
        s = _num(keys, "stable_rank")
        if not _is_locked(keys) or s is None:
            return None, s
        window: list[float] = memory.setdefault("stable_ranks", [])
        verdict: bool | None = None
        if len(window) >= self.min_checks:
            m = statistics.median(window)
            verdict = not (m / self.factor <= s <= m * self.factor)
        window.append(s)
        del window[: -self.window]
        return verdict, s

    def summary(self, run, matrix, step, value):
        return (
            f"{matrix} (run {run}, step {step}): stable_rank {_fmt(value)} outside "
            f"×{self.factor} of its running median"
        )


@register
@dataclass(frozen=True)
class VisibilitySpikeRule(CheckRule):
    """Rise r_t = (v_t − v_{t−1}) / (step_t − step_{t−1}) of ``bf16_visible_ratio`` v above
    ``factor`` × the median of the last ``window`` rises, once ``min_checks`` rises exist, and the
    check's own rise v_t − v_{t−1} at least ``min_increase`` (a share of the matrix)."""

    name: ClassVar[str] = "VisibilitySpike"
    section: ClassVar[str] = "visibility_spike"
    description: ClassVar[str] = (
        "The share of weights visibly changed in bf16 jumped far above its recent typical rise "
        "in one check."
    )
    fire_after: int = 1
    factor: float = setting(5.0, ABOVE_ONE)
    window: int = 10
    min_checks: int = 5
    min_increase: float = 0.01

    def evaluate(self, keys, step, memory):
        """Breach when r_t > factor · median(last ``window`` rises) and v_t − v_{t−1} ≥ min_increase.

        r_t = (v_t − v_{t−1}) / (step_t − step_{t−1}), per step so a dropped report (a longer gap)
        does not read as a spike. ``value`` is the check's rise v_t − v_{t−1}. A step that goes
        back (a resumed run) restarts the comparison from this check.
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
        if len(rises) >= self.min_checks:
            typical = statistics.median(rises)
            verdict = increase >= self.min_increase and rise > self.factor * max(typical, 0.0)
        rises.append(rise)
        del rises[: -self.window]
        return verdict, increase

    def summary(self, run, matrix, step, value):
        return (
            f"{matrix} (run {run}, step {step}): bf16_visible_ratio rose by {_fmt(value)} in one "
            f"check, over {self.factor}× its recent typical rise"
        )


@register
@dataclass(frozen=True)
class AuditErrorRule(CheckRule):
    """The worst |live − exact| / stated bound over the audited keys of a matrix's audit
    (sidecar/audit.py) above ``threshold``. Evaluated only on audits (a check without one leaves
    the rule's state alone); fires on the first breaching audit, resolves on the first one within
    bound (audits are rare: every ``audit_every`` checks, one matrix in rotation)."""

    name: ClassVar[str] = "AuditError"
    section: ClassVar[str] = "audit_error"
    description: ClassVar[str] = (
        "The exact float64 audit of a matrix found a live estimate outside its stated accuracy."
    )
    fire_after: int = 1
    resolve_after: int = 1
    threshold: float = setting(1.0, AT_LEAST_ZERO)

    def evaluate(self, keys, step, memory):
        """Breach when keys["audit_error_ratio"] > threshold; None on a check without an audit."""
        v = _num(keys, "audit_error_ratio")
        if v is None:
            return None, None
        return v > self.threshold, v

    def summary(self, run, matrix, step, value):
        return (
            f"{matrix} (run {run}, step {step}): the audit's error ratio {_fmt(value)} > "
            f"{self.threshold} — a live estimate is outside its stated bound"
        )


@register
@dataclass(frozen=True)
class RunStalledRule(RuleSettings):
    """No report for longer than max(min_seconds, factor · median interval) + grace_seconds.

    The median is over the wall-clock intervals between the last ``window`` new steps of the run
    (as received); with fewer than two intervals the floor alone applies. A run silent for longer
    than ``forget_after_seconds`` is considered finished and its alert resolves. Evaluated on a
    timer (`AlertEngine.tick`), run level only.
    """

    name: ClassVar[str] = "RunStalled"
    section: ClassVar[str] = "run_stalled"
    description: ClassVar[str] = (
        "The run sent no report for much longer than its usual check interval."
    )
    severity: str = "critical"
    factor: float = 5.0
    min_seconds: float = 60.0
    grace_seconds: float = setting(120.0, AT_LEAST_ZERO)
    window: int = 20
    evaluate_every_seconds: float = 15.0
    forget_after_seconds: float = 6 * 3600.0


def stall_threshold_seconds(intervals: list[float], rule: RunStalledRule) -> float:
    """max(min_seconds, factor · median(intervals)) + grace_seconds (floor alone under 2 intervals)."""
    base = rule.min_seconds
    if len(intervals) >= 2:
        base = max(base, rule.factor * statistics.median(intervals))
    return base + rule.grace_seconds


RULES: tuple[str, ...] = tuple(REGISTRY)
CHECK_RULES: tuple[str, ...] = tuple(n for n, r in REGISTRY.items() if issubclass(r, CheckRule))
DESCRIPTIONS: dict[str, str] = {n: r.description for n, r in REGISTRY.items()}

"""`AlertConfig`: every alert setting, loaded from a JSON or YAML file and validated once.

One section per rule of `rules.REGISTRY` (the rule's own settings class), the two deliveries
(`webhook`, `alertmanager`) and three engine settings. A setting is checked by its type and the
bounds its field declares (`state.RATIO`, `ABOVE_ONE`, `AT_LEAST_ZERO`): integers >= 1 and numbers
> 0 unless the field says otherwise; an error names ``section.field``, what came and what is
expected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import Field, asdict, dataclass, field, fields, make_dataclass, replace
from pathlib import Path
from typing import Any

from .rules import REGISTRY
from .state import AT_LEAST_ZERO, setting


@dataclass(frozen=True)
class DeliverySettings:
    """How one delivery POSTs: per-request timeout, attempts, full-jitter exponential backoff."""

    timeout_seconds: float = 10.0
    max_attempts: int = 10
    initial_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 60.0


@dataclass(frozen=True)
class WebhookConfig(DeliverySettings):
    """Delivery of the Alertmanager webhook payload (version "4")."""

    receiver: str = "deltawatch"
    external_url: str = ""
    max_matrices_listed: int = setting(50, AT_LEAST_ZERO)
    headers: Mapping[str, str] = field(default_factory=dict)  # e.g. an Authorization header


@dataclass(frozen=True)
class AlertmanagerConfig(DeliverySettings):
    """Delivery to Alertmanager's ``/api/v2/alerts`` (``deltawatch serve --alertmanager-url``).

    A firing alert is posted again every ``resend_every_seconds`` and carries
    ``endsAt = now + 4 · resend_every_seconds`` (as Prometheus does), so Alertmanager resolves it
    by itself if the sidecar goes away; a resolved one is posted with its real ``endsAt``.
    """

    resend_every_seconds: float = 60.0
    headers: Mapping[str, str] = field(default_factory=dict)


SECTIONS: dict[str, type] = {
    **{rule.section: rule for rule in REGISTRY.values()},
    "webhook": WebhookConfig,
    "alertmanager": AlertmanagerConfig,
}


def _post_init(self: Any) -> None:
    _validate(self)


def _rule(self: Any, name: str) -> Any:
    """The settings of rule ``name`` (e.g. "SubspaceDrift" -> ``self.subspace_drift``)."""
    return getattr(self, REGISTRY[name].section)


AlertConfig = make_dataclass(
    "AlertConfig",
    [(section, cls, field(default_factory=cls)) for section, cls in SECTIONS.items()]
    + [
        ("rollup_min_matrices", int, field(default=1)),
        ("resolved_retention_seconds", float, setting(3600.0, AT_LEAST_ZERO)),
        ("persist_every_seconds", float, setting(1.0, AT_LEAST_ZERO)),
    ],
    frozen=True,
    namespace={"__post_init__": _post_init, "rule": _rule, "__module__": __name__},
)
AlertConfig.__doc__ = """Every alert setting; ``load_alert_config(path)`` reads it from a JSON or
YAML file with the same nesting (``{"subspace_drift": {"threshold": 0.6}, ...}``); absent keys keep
defaults. Sections: one per registered rule (``config.subspace_drift`` ...; ``config.rule(name)``),
``webhook``, ``alertmanager``; then ``rollup_min_matrices``, ``resolved_retention_seconds``,
``persist_every_seconds``."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _type_name(f: Field) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def _check(where: str, f: Field, v: Any) -> None:
    """One setting against its type and declared bounds; ValueError naming ``where`` otherwise."""
    kind, bounds = _type_name(f), f.metadata
    if kind == "bool":
        if not isinstance(v, bool):
            raise ValueError(f"{where} must be true or false, got {v!r}")
    elif kind == "int":
        low = bounds.get("min", 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"{where} must be an integer >= {low}, got {v!r}")
    elif kind == "str":
        if not isinstance(v, str) or (not v and f.default != ""):
            kind_of = "a non-empty string" if f.default != "" else "a string"
            raise ValueError(f"{where} must be {kind_of}, got {v!r}")
    elif kind.startswith("Mapping"):
        if not isinstance(v, Mapping) or not all(
            isinstance(k, str) and isinstance(x, str) for k, x in v.items()
        ):
            raise ValueError(f"{where} must map header names to strings, got {v!r}")
    elif bounds.get("ratio"):
        if not _is_number(v) or not 0 < v <= 1:
            raise ValueError(f"{where} is a ratio in (0, 1], got {v!r}")
    elif "above" in bounds:
        if not _is_number(v) or v <= bounds["above"]:
            raise ValueError(f"{where} must be > {bounds['above']}, got {v!r}")
    elif "min" in bounds:
        if not _is_number(v) or v < bounds["min"]:
            raise ValueError(f"{where} must be a number >= {bounds['min']}, got {v!r}")
    elif not _is_number(v) or v <= 0:
        raise ValueError(f"{where} must be a number > 0, got {v!r}")


def _validate(config: AlertConfig) -> None:
    for f in fields(config):
        value = getattr(config, f.name)
        cls = SECTIONS.get(f.name)
        if cls is None:
            _check(f"alert config: {f.name}", f, value)
            continue
        if not isinstance(value, cls):
            raise ValueError(f"alert config: {f.name} must be a {cls.__name__}, got {value!r}")
        for g in fields(value):
            _check(f"alert config: {f.name}.{g.name}", g, getattr(value, g.name))


def alert_config_from_mapping(data: Mapping[str, Any]) -> AlertConfig:
    """Build an AlertConfig from nested plain data; unknown keys are refused by name."""
    if not isinstance(data, Mapping):
        raise ValueError(f"alert config: expected a mapping at the top, got {type(data).__name__}")
    _refuse_unknown(data, AlertConfig, "")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        cls = SECTIONS.get(key)
        if cls is None:
            kwargs[key] = value
            continue
        if not isinstance(value, Mapping):
            raise ValueError(f"alert config: {key} must be a mapping, got {value!r}")
        _refuse_unknown(value, cls, f" in {key}")
        kwargs[key] = cls(**value)
    return AlertConfig(**kwargs)


def _refuse_unknown(data: Mapping[str, Any], cls: type, where: str) -> None:
    """A ValueError naming the keys of `data` that are not fields of `cls`, and the known ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"alert config: unknown key(s) {unknown}{where}; known: {sorted(known)}")


def load_alert_config(path: str | Path) -> AlertConfig:
    """Read an AlertConfig from a ``.json``, ``.yaml`` or ``.yml`` file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover - PyYAML ships with the sidecar extra
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


def with_overrides(config: AlertConfig, **sections: Mapping[str, Any]) -> AlertConfig:
    """A copy of ``config`` with some fields of some sections replaced (tests, CLI flags)."""
    changes: dict[str, Any] = {}
    for name, values in sections.items():
        current = getattr(config, name)
        changes[name] = replace(current, **values) if values is not None else current
    return replace(config, **changes)

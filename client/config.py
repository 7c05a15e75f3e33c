"""MonitorConfig: every keyword of `Monitor(...)` (DESIGN §4), validated once at construction.

The keywords are flat (`Monitor(model, run=..., channel_rank=16, view="bf16", lock_patience=3)`);
`MonitorConfig.from_keywords` maps each onto its typed section (client/settings.py:
`AnchorSettings`, `SketchSettings`, `LockSettings`, and `TransportSettings` here), which the
compute modules and the transport take whole. A bad value raises `ValueError` (or `TypeError` for a
wrong type) with the fix in the message; after construction nothing in the hook raises into the
trainer.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .credentials import check_tls
from .schedule import SCHEDULES, Schedule
from .settings import AnchorSettings, LockSettings, SketchSettings, one_of, positive_int

RUN_NAME_RULE = "[A-Za-z0-9._-]{1,128}"  # what a run name may be, as error messages say it
RUN_NAME = re.compile(RUN_NAME_RULE)
DEFAULT_ENDPOINT = "127.0.0.1:50051"
DEFAULT_MAX_QUEUE_BYTES = 256 * 1024 * 1024  # 256 MiB of unsent reports, then drop the oldest

Selector = str | Sequence[str] | Callable[[str], bool] | None


@dataclass(frozen=True)
class TransportSettings:
    """Where and how reports travel (client/transport.py, client/credentials.py)."""

    endpoint: str = DEFAULT_ENDPOINT
    token: str | None = None
    token_file: str | None = None
    tls: Mapping[str, str] | None = None  # {"ca", "cert", "key": paths; "server_name"}
    max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES
    connect_timeout: float = 20.0  # seconds for one connection attempt (never on the trainer)
    close_timeout: float = 10.0  # default bounded wait of close()
    # every N checks one matrix also travels as its bf16 ΔW for an exact audit (docs/audit.md)
    audit_every: int | None = None  # None or 0: off

    def __post_init__(self) -> None:
        _validate_transport(self)


# Monitor keyword -> (section, field) for the keywords that live in a section.
SECTION_KEYWORDS: dict[str, tuple[str, str]] = {
    "channel_rank": ("sketch", "channel_rank"),
    "oversample": ("sketch", "oversample"),
    "max_power_steps": ("sketch", "max_power_steps"),
    "seed": ("sketch", "seed"),
    "view": ("anchor", "view"),
    "anchor": ("anchor", "location"),
    "alpha": ("anchor", "alpha"),
    "mask_rank": ("anchor", "mask_rank"),
    "lock_threshold": ("lock", "threshold"),
    "lock_patience": ("lock", "patience"),
    "lock_min_energy": ("lock", "min_energy"),
    "lock_at_step": ("lock", "at_step"),
    **{f.name: ("transport", f.name) for f in fields(TransportSettings)},
}
# Keywords that changed name, with the one to use instead.
RENAMED_KEYWORDS: dict[str, str] = {
    "rank": "channel_rank (K; `rank` now means only the process rank)",
}


@dataclass(frozen=True)
class MonitorConfig:
    """The Monitor's configuration: the run-level settings plus one typed section per concern."""

    run: str
    every: int = 10
    schedule: Schedule = "every"  # "spread": a slice of the matrices on each step (schedule.py)
    weight_every: int = 1  # the W_t tracker (rotation, spectral shift) every N-th check
    batch_matrices: bool = True  # same-shape dense matrices of a check as one batch (batch.py)
    include: Selector = None  # regexes searched in parameter names, or name -> bool
    exclude: Selector = None
    fused: Mapping[str, Any] | None = None
    anchor_checkpoint: str | None = None  # a safetensors file or a directory of them
    on_alert: Callable[[dict], None] | None = None
    enforce_channel: bool = False
    include_frozen: bool = False  # also monitor requires_grad=False weights (no adapter on them)
    # Resume (documented in docs/wire.md)
    incarnation: int | None = None  # None: chosen at construction (ms clock, agreed over ranks)
    resume_step: int | None = None  # the step a restarted trainer resumes from
    anchor: AnchorSettings = field(default_factory=AnchorSettings)
    sketch: SketchSettings = field(default_factory=SketchSettings)
    lock: LockSettings = field(default_factory=LockSettings)
    transport: TransportSettings = field(default_factory=TransportSettings)
    _include_rx: tuple[re.Pattern, ...] = field(default=(), init=False, repr=False, compare=False)
    _exclude_rx: tuple[re.Pattern, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        validate(self)
        object.__setattr__(self, "_include_rx", _compile("include", self.include))
        object.__setattr__(self, "_exclude_rx", _compile("exclude", self.exclude))

    @classmethod
    def from_keywords(cls, run: str, **kwargs: Any) -> MonitorConfig:
        """The configuration of `Monitor(model, run, **kwargs)`: unknown or renamed keywords
        raise TypeError naming the right one; each section validates its own values."""
        check_keywords(kwargs)
        sections: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in SECTION_KEYWORDS:
                section, name = SECTION_KEYWORDS[key]
                sections.setdefault(section, {})[name] = value
            else:
                top[key] = value
        defaults = cls(run=run)
        built = {s: replace(getattr(defaults, s), **v) for s, v in sections.items()}
        return cls(run=run, **top, **built)

    def selects(self, name: str) -> bool | None:
        """The user's verdict on a parameter name: True/False when include/exclude decide, None
        when neither was given (the default selection of client/naming.py applies)."""
        if self.include is None and self.exclude is None:
            return None
        if self.include is not None:
            ok = self.include(name) if callable(self.include) else _search(self._include_rx, name)
        else:
            ok = None
        if self.exclude is not None:
            bad = self.exclude(name) if callable(self.exclude) else _search(self._exclude_rx, name)
            if bad:
                return False
        return ok

    def keywords(self) -> dict[str, Any]:
        """The settings as `Monitor` keywords (the inverse of `from_keywords`)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        for section in ("anchor", "sketch", "lock", "transport"):
            del out[section]
        for key, (section, name) in SECTION_KEYWORDS.items():
            out[key] = getattr(getattr(self, section), name)
        return out

    def to_json_dict(self) -> dict[str, Any]:
        """The settings the sidecar may need (sent in the Hello), as Monitor keywords; secrets
        and callables left out."""
        skip = {"on_alert", "token", "token_file", "tls"}
        out: dict[str, Any] = {}
        for key, value in self.keywords().items():
            if key in skip:
                continue
            if callable(value):
                value = getattr(value, "__name__", "callable")
            elif isinstance(value, Mapping):
                value = {str(k): str(v) for k, v in value.items()}
            elif isinstance(value, (list, tuple)):
                value = [str(v) for v in value]
            out[key] = value
        return out


def check_keywords(kwargs: Mapping[str, Any]) -> None:
    """Unknown Monitor keywords raise TypeError naming the closest known one."""
    import difflib

    known = [f.name for f in fields(MonitorConfig) if f.init and f.name not in _SECTIONS]
    known += list(SECTION_KEYWORDS)
    for key in kwargs:
        if key in RENAMED_KEYWORDS:
            raise TypeError(f"Monitor keyword {key!r} is now {RENAMED_KEYWORDS[key]}")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
            raise TypeError(f"Monitor got an unknown keyword {key!r}{hint}")


_SECTIONS = ("anchor", "sketch", "lock", "transport")


def _search(patterns: tuple[re.Pattern, ...], name: str) -> bool:
    return any(p.search(name) for p in patterns)


def _compile(what: str, selector: Selector) -> tuple[re.Pattern, ...]:
    if selector is None or callable(selector):
        return ()
    items = [selector] if isinstance(selector, str) else list(selector)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(
                f"{what}: {item!r} is not a regular expression string; pass a str, a list of str, "
                f"or a callable name -> bool"
            )
        try:
            out.append(re.compile(item))
        except re.error as exc:
            raise ValueError(
                f"{what}: {item!r} is not a valid regular expression ({exc}); escape special "
                f"characters, e.g. {re.escape(item)!r}"
            ) from None
    return tuple(out)


def _check_file(what: str, path: Any) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a file path (str), got {type(path).__name__}")
    if not os.path.isfile(path):
        raise ValueError(f"{what}: file {os.fspath(path)!r} does not exist; give an existing path")


def validate(c: MonitorConfig) -> None:
    """Raise with the fix in the message when a run-level setting cannot work (each section
    validates its own fields)."""
    if not isinstance(c.run, str) or not RUN_NAME.fullmatch(c.run):
        raise ValueError(
            f"run {c.run!r} must match {RUN_NAME_RULE}; e.g. run='qwen3-opd-1' "
            f"(letters, digits, '.', '_', '-' only)"
        )
    positive_int("every", c.every)
    one_of("schedule", c.schedule, SCHEDULES)
    positive_int("weight_every", c.weight_every)
    for name, kind in (
        ("anchor", AnchorSettings),
        ("sketch", SketchSettings),
        ("lock", LockSettings),
        ("transport", TransportSettings),
    ):
        if not isinstance(getattr(c, name), kind):
            raise TypeError(f"MonitorConfig.{name} must be a {kind.__name__}")
    if c.anchor_checkpoint is not None and not os.path.exists(c.anchor_checkpoint):
        raise ValueError(
            f"anchor_checkpoint {os.fspath(c.anchor_checkpoint)!r} does not exist; give a "
            f".safetensors file or a directory of them"
        )
    if c.on_alert is not None and not callable(c.on_alert):
        raise TypeError(f"on_alert must be a callable taking an alert dict, got {c.on_alert!r}")
    for name in ("include", "exclude"):
        sel = getattr(c, name)
        if sel is not None and not (callable(sel) or isinstance(sel, (str, list, tuple))):
            raise TypeError(
                f"{name} must be a regex str, a list of them, or a callable name -> bool; "
                f"got {type(sel).__name__}"
            )
    if c.fused is not None and not isinstance(c.fused, Mapping):
        raise TypeError(f"fused must be a mapping (see docs/distributed.md), got {c.fused!r}")
    for name in ("enforce_channel", "include_frozen", "batch_matrices"):
        if not isinstance(getattr(c, name), bool):
            raise TypeError(f"{name} must be True or False, got {getattr(c, name)!r}")
    if c.incarnation is not None:
        positive_int("incarnation", c.incarnation)
    if c.resume_step is not None and (
        isinstance(c.resume_step, bool) or not isinstance(c.resume_step, int) or c.resume_step < 0
    ):
        raise ValueError(f"resume_step must be an int >= 0, got {c.resume_step!r}")


def _validate_transport(c: TransportSettings) -> None:
    if not isinstance(c.endpoint, str) or not re.fullmatch(r".+:\d{1,5}", c.endpoint):
        raise ValueError(
            f"endpoint {c.endpoint!r} must be host:port, e.g. endpoint='127.0.0.1:50051'"
        )
    positive_int("max_queue_bytes", c.max_queue_bytes)
    if c.max_queue_bytes < 1024 * 1024:
        raise ValueError(
            f"max_queue_bytes={c.max_queue_bytes} is below 1 MiB, too small to hold one report; "
            f"use at least {1024 * 1024} (the default is {DEFAULT_MAX_QUEUE_BYTES})"
        )
    if c.audit_every not in (None, 0):
        positive_int("audit_every", c.audit_every)
    if c.token is not None and c.token_file is not None:
        raise ValueError("give token or token_file, not both")
    if c.token is not None and (not isinstance(c.token, str) or not c.token.strip()):
        raise ValueError("token must be a non-empty string")
    if c.token_file is not None:
        _check_file("token_file", c.token_file)
    if c.tls is not None:
        check_tls(c.tls)
    for name in ("connect_timeout", "close_timeout"):
        value = getattr(c, name)
        if not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")

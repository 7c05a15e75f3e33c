"""MonitorConfig: every keyword of `Monitor(...)` (DESIGN §4), validated once at construction.

A bad value raises `ValueError` (or `TypeError` for a wrong type) with the fix in the message; after
construction nothing in the hook raises into the trainer.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

RUN_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
DEFAULT_ENDPOINT = "127.0.0.1:50051"
DEFAULT_MAX_QUEUE_BYTES = 256 * 1024 * 1024  # 256 MiB of unsent reports, then drop the oldest
VIEWS = ("bf16", "native")
ANCHORS = ("host", "device")
TLS_KEYS = ("ca", "cert", "key", "server_name")

Selector = str | Sequence[str] | Callable[[str], bool] | None


@dataclass(frozen=True)
class MonitorConfig:
    """The Monitor's configuration. Field names are the keyword arguments of `Monitor`."""

    run: str
    endpoint: str = DEFAULT_ENDPOINT
    every: int = 10
    rank: int = 16  # K, the channel rank
    oversample: int = 16  # p; the trackers keep r = K + p columns
    max_power_steps: int = 4
    include: Selector = None  # regexes searched in parameter names, or name -> bool
    exclude: Selector = None
    view: str = "bf16"
    anchor: str = "host"
    anchor_checkpoint: str | None = None  # a safetensors file or a directory of them
    lock_at_step: int | None = None
    lock_threshold: float = 0.9
    lock_patience: int = 3
    lock_min_energy: float = 0.5
    alpha: float = 0.5
    mask_rank: int = 64
    fused: Mapping[str, Any] | None = None
    on_alert: Callable[[dict], None] | None = None
    enforce_channel: bool = False
    token: str | None = None
    token_file: str | None = None
    tls: Mapping[str, str] | None = None  # {"ca", "cert", "key": paths; "server_name"}
    max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES
    seed: int = 0
    include_frozen: bool = False  # also monitor requires_grad=False weights (no adapter on them)
    # Resume and transport (documented in docs/wire.md)
    incarnation: int | None = None  # None: chosen at construction (ms clock, agreed over ranks)
    resume_step: int | None = None  # the step a restarted trainer resumes from
    connect_timeout: float = 20.0  # seconds for one connection attempt (never on the trainer)
    close_timeout: float = 10.0  # default bounded wait of close()
    _include_rx: tuple[re.Pattern, ...] = field(default=(), init=False, repr=False, compare=False)
    _exclude_rx: tuple[re.Pattern, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        validate(self)
        object.__setattr__(self, "_include_rx", _compile("include", self.include))
        object.__setattr__(self, "_exclude_rx", _compile("exclude", self.exclude))

    @property
    def r(self) -> int:
        """Columns of each tracker's basis: r = K + p."""
        return self.rank + self.oversample

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

    def to_json_dict(self) -> dict[str, Any]:
        """The settings the sidecar may need (sent in the Hello); secrets and callables left out."""
        skip = {"on_alert", "token", "token_file", "tls", "_include_rx", "_exclude_rx"}
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in skip:
                continue
            value = getattr(self, f.name)
            if callable(value):
                value = getattr(value, "__name__", "callable")
            elif isinstance(value, Mapping):
                value = {str(k): str(v) for k, v in value.items()}
            elif isinstance(value, (list, tuple)):
                value = [str(v) for v in value]
            out[f.name] = value
        return out


def check_keywords(kwargs: Mapping[str, Any]) -> None:
    """Unknown Monitor keywords raise TypeError naming the closest known one."""
    import difflib

    known = [f.name for f in fields(MonitorConfig) if f.init]
    for key in kwargs:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
            raise TypeError(f"Monitor got an unknown keyword {key!r}{hint}")


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


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}; e.g. {name}=1")


def _ratio(name: str, value: Any, *, open_low: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    low_ok = value > 0 if open_low else value >= 0
    if not (low_ok and value <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {value}; the default is 0.5 or 0.9")


def _check_file(what: str, path: Any) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a file path (str), got {type(path).__name__}")
    if not os.path.isfile(path):
        raise ValueError(f"{what}: file {os.fspath(path)!r} does not exist; give an existing path")


def validate(c: MonitorConfig) -> None:
    """Raise with the fix in the message when a setting cannot work."""
    if not isinstance(c.run, str) or not RUN_NAME.fullmatch(c.run):
        raise ValueError(
            f"run {c.run!r} must match [A-Za-z0-9._-]{{1,128}}; e.g. run='qwen3-opd-1' "
            f"(letters, digits, '.', '_', '-' only)"
        )
    if not isinstance(c.endpoint, str) or not re.fullmatch(r".+:\d{1,5}", c.endpoint):
        raise ValueError(
            f"endpoint {c.endpoint!r} must be host:port, e.g. endpoint='127.0.0.1:50051'"
        )
    for name in ("every", "rank", "oversample", "max_power_steps", "lock_patience", "mask_rank"):
        _positive_int(name, getattr(c, name))
    _positive_int("max_queue_bytes", c.max_queue_bytes)
    if c.max_queue_bytes < 1024 * 1024:
        raise ValueError(
            f"max_queue_bytes={c.max_queue_bytes} is below 1 MiB, too small to hold one report; "
            f"use at least {1024 * 1024} (the default is {DEFAULT_MAX_QUEUE_BYTES})"
        )
    if c.rank + c.oversample > 4096:
        raise ValueError(
            f"rank + oversample = {c.rank + c.oversample} is unreasonably large (the sketch "
            f"keeps that many columns per matrix); the defaults are rank=16, oversample=16"
        )
    if c.view not in VIEWS:
        raise ValueError(f"view={c.view!r} is not one of {VIEWS}; use view='bf16' (the default)")
    if c.anchor not in ANCHORS:
        raise ValueError(f"anchor={c.anchor!r} is not one of {ANCHORS}; use anchor='host'")
    if c.anchor_checkpoint is not None and not os.path.exists(c.anchor_checkpoint):
        raise ValueError(
            f"anchor_checkpoint {os.fspath(c.anchor_checkpoint)!r} does not exist; give a "
            f".safetensors file or a directory of them"
        )
    if c.lock_at_step is not None:
        _positive_int("lock_at_step", c.lock_at_step)
    _ratio("lock_threshold", c.lock_threshold)
    _ratio("lock_min_energy", c.lock_min_energy, open_low=False)
    _ratio("alpha", c.alpha)
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
    for name in ("enforce_channel", "include_frozen"):
        if not isinstance(getattr(c, name), bool):
            raise TypeError(f"{name} must be True or False, got {getattr(c, name)!r}")
    if c.token is not None and c.token_file is not None:
        raise ValueError("give token or token_file, not both")
    if c.token is not None and (not isinstance(c.token, str) or not c.token.strip()):
        raise ValueError("token must be a non-empty string")
    if c.token_file is not None:
        _check_file("token_file", c.token_file)
    if c.tls is not None:
        if not isinstance(c.tls, Mapping):
            raise TypeError("tls must be a mapping like {'ca': 'ca.pem', 'cert': ..., 'key': ...}")
        unknown = set(c.tls) - set(TLS_KEYS)
        if unknown:
            raise ValueError(f"tls has unknown keys {sorted(unknown)}; allowed: {list(TLS_KEYS)}")
        if ("cert" in c.tls) != ("key" in c.tls):
            raise ValueError("tls: give 'cert' and 'key' together (mTLS), or neither")
        for key, path in c.tls.items():
            if key != "server_name":
                _check_file(f"tls[{key!r}]", path)
    if c.incarnation is not None:
        _positive_int("incarnation", c.incarnation)
    if c.resume_step is not None and (
        isinstance(c.resume_step, bool) or not isinstance(c.resume_step, int) or c.resume_step < 0
    ):
        raise ValueError(f"resume_step must be an int >= 0, got {c.resume_step!r}")
    for name in ("connect_timeout", "close_timeout"):
        value = getattr(c, name)
        if not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if not isinstance(c.seed, int) or isinstance(c.seed, bool):
        raise TypeError(f"seed must be an int, got {c.seed!r}")

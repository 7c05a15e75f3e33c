"""The typed settings sections the client's compute modules take whole (DESIGN §2–3).

Each section is a frozen dataclass that validates itself once, at construction, with the fix in
the message; defaults are written here and nowhere else. `MonitorConfig` (client/config.py) maps
the `Monitor(...)` keywords onto these sections; the anchor takes `AnchorSettings` and
`SketchSettings`, the tracker takes the anchor (whose sections it reads) and `LockSettings`, the
lock rule takes `LockSettings`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

View = Literal["bf16", "native"]
AnchorLocation = Literal["host", "device"]
VIEWS: tuple[str, ...] = get_args(View)
ANCHOR_LOCATIONS: tuple[str, ...] = get_args(AnchorLocation)
MAX_COLUMNS = 4096  # r = K + p: the trackers keep that many columns per matrix


def positive_int(name: str, value: Any) -> None:
    """`value` is an int > 0 (bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}; e.g. {name}=1")


def ratio(name: str, value: Any, *, open_low: bool = True) -> None:
    """`value` is a finite number in (0, 1] (or [0, 1] with open_low=False)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    low_ok = value > 0 if open_low else value >= 0
    if not (low_ok and value <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {value}; the default is 0.5 or 0.9")


def one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"{name}={value!r} is not one of {allowed}; use {name}={allowed[0]!r} (the default)"
        )


@dataclass(frozen=True)
class AnchorSettings:
    """How W0 is kept and what its masks are. `view`: "bf16" measures the update a bf16
    checkpoint would hold (masks on bf16(W0)), "native" the parameter's own dtype; `location`:
    the copy lives in host memory (streamed in row chunks at check time) or beside the parameter;
    `alpha`: the mask share α; `mask_rank`: R of W0's rank-R reconstruction for M_princ."""

    view: View = "bf16"
    location: AnchorLocation = "host"
    alpha: float = 0.5
    mask_rank: int = 64

    def __post_init__(self) -> None:
        one_of("view", self.view, VIEWS)
        one_of("anchor", self.location, ANCHOR_LOCATIONS)
        ratio("alpha", self.alpha)
        positive_int("mask_rank", self.mask_rank)


@dataclass(frozen=True)
class SketchSettings:
    """The trackers' subspace iteration: K (`channel_rank`) directions are reported, r = K + p
    columns are kept (`oversample` p), a check runs at most `max_power_steps` power steps, and the
    start bases are seeded from (`seed`, matrix name)."""

    channel_rank: int = 16
    oversample: int = 16
    max_power_steps: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("channel_rank", "oversample", "max_power_steps"):
            positive_int(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if self.r > MAX_COLUMNS:
            raise ValueError(
                f"channel_rank + oversample = {self.r} is above {MAX_COLUMNS} (the sketch keeps "
                f"that many columns per matrix); the defaults are channel_rank=16, oversample=16"
            )

    @property
    def r(self) -> int:
        """Columns of each tracker's basis: r = K + p."""
        return self.channel_rank + self.oversample


@dataclass(frozen=True)
class LockSettings:
    """The horizon lock rule (client/lock.py): lock after `patience` consecutive checks with
    horizon_alignment ≥ `threshold` and topk_energy_ratio ≥ `min_energy`, or at the first check
    with step ≥ `at_step` when given."""

    threshold: float = 0.9
    patience: int = 3
    min_energy: float = 0.5
    at_step: int | None = None

    def __post_init__(self) -> None:
        ratio("lock_threshold", self.threshold)
        positive_int("lock_patience", self.patience)
        ratio("lock_min_energy", self.min_energy, open_low=False)
        if self.at_step is not None:
            positive_int("lock_at_step", self.at_step)

"""When each matrix is checked (`Monitor(every=, schedule=, weight_every=)`, docs/overhead.md
"Schedules").

Steps are grouped in cycles of `every` steps: cycle c holds steps (c−1)·every + 1 … c·every.
Every monitored matrix is checked once per cycle:

* `schedule="every"` (the default): all of them at the cycle's last step, c·every — a check when
  `step % every == 0`, as DESIGN §4 says;
* `schedule="spread"`: matrix unit u at step (c−1)·every + slot(u) + 1, its slot in 0 … every−1
  (`slots`), so each step checks about 1/every of the monitored parameters: the same coverage
  per cycle, no step spike.

A check's *cycle* is its check id: the sidecar's run aggregate of cycle c (`Monitor.latest()`)
covers the matrices checked in that cycle, labelled with its last step c·every under both
schedules (sidecar/progress.py). The W_t tracker (rotation, spectral shift) runs in cycles
1, 1 + weight_every, 1 + 2·weight_every, … (`weight_due`). Everything here is a function of the
step and of data every rank holds (the manifest's order and shapes), so every rank of a sharded
matrix checks it, and runs its W_t tracker, at the same step: the collectives line up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

Schedule = Literal["every", "spread"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)


def cycle(step: int, every: int) -> int:
    """The cycle of `step`: ⌈step / every⌉ (step ≥ 1; 0 for step 0)."""
    return -(-int(step) // every)


def cycle_label(step: int, every: int) -> int:
    """The step that labels `step`'s cycle: its last step, cycle(step)·every."""
    return cycle(step, every) * every


def slot_of_step(step: int, every: int) -> int:
    """The spread slot checked at `step`: (step − 1) mod every."""
    return (int(step) - 1) % every


def slots(costs: Sequence[int], every: int) -> list[int]:
    """A slot in 0 … every−1 per unit, balancing the summed cost per slot: longest processing
    time first (units by decreasing cost, ties by position; each to the least loaded slot, ties
    to the lowest), so the largest slot is within one unit of the mean. Deterministic: every
    rank computing it from the same costs gets the same slots."""
    load = [0] * every
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        s = min(range(every), key=lambda j: (load[j], j))
        out[i] = s
        load[s] += costs[i]
    return out


def weight_due(step: int, every: int, weight_every: int) -> bool:
    """Whether a check at `step` runs the W_t tracker: its cycle is 1 mod weight_every (the
    first check of a run does, so rotation is known from the start)."""
    return (cycle(step, every) - 1) % weight_every == 0

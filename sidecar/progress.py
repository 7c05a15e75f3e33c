"""When a run's check of a step is complete: every matrix of its manifest has its check at that
step stored and none a later one. The ingest then sends the run's aggregate back on the stream
(the `RunAggregate` frame), so a trainer logs the geometry beside its loss. Under
`schedule="spread"` a report's step here is its check label (`Engine.check_label`: the last step
of its cycle), so the check of cycle c is complete once every matrix has reported in cycle c,
and its aggregate, over each matrix's latest report, is exactly that cycle's.

Per run, for its latest incarnation: each matrix's latest stored step and a count of matrices per
step, so the test is O(1) per stored check (a Counter with one key is a complete step). A newer
incarnation starts afresh; so does a restarted sidecar (nothing is sent until every matrix has
reported again, never an aggregate mixing steps).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass
class _Run:
    incarnation: int
    steps: dict[str, int] = field(default_factory=dict)  # matrix -> its latest stored step
    counts: collections.Counter = field(default_factory=collections.Counter)  # step -> matrices
    last_complete: int | None = None


class CheckProgress:
    """Tracks stored checks per run (called from the ingest's single engine thread)."""

    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}

    def stored(self, run: str, incarnation: int, matrices: int, matrix: str, step: int) -> bool:
        """Record a stored check of `matrix` at `step`; True when it completed the run's check of
        `step` (all `matrices` of the manifest at `step`) and `step` is newer than the last one
        completed."""
        r = self._runs.get(run)
        if r is None or incarnation > r.incarnation:
            r = self._runs[run] = _Run(incarnation)
        elif incarnation < r.incarnation:
            return False
        old = r.steps.get(matrix)
        if old is not None:
            r.counts[old] -= 1
            if not r.counts[old]:
                del r.counts[old]
        r.steps[matrix] = step
        r.counts[step] += 1
        complete = r.counts[step] == matrices == len(r.steps)
        if complete and (r.last_complete is None or step > r.last_complete):
            r.last_complete = step
            return True
        return False

"""How a matrix is laid out over ranks, and the O((m+n)·r) reductions the sketch needs.

A global (m, n) matrix is held as local blocks: each rank has rows
[row_offset, row_offset + row_length) and columns [col_offset, col_offset + col_length).
`row_group` is the process group over which the ROWS are split (ranks holding the same columns and
different rows), `col_group` the one over which the COLUMNS are split (same rows, different
columns); None when that dimension is not split. A rank with an empty block (length 0) takes part
in every collective and contributes zeros, so uneven and empty shards work.

Single process (and plain DDP, where every rank holds the whole matrix) uses `spec=None`: no
collective at all. Every function here calls `torch.distributed` through the module attribute at
call time, so a counting wrapper installed on `torch.distributed.all_reduce` sees every call.

Checks and gradient projections run their reductions through a `CheckSession`: a local failure on
one rank never breaks the sequence of collectives of the others (docs/distributed.md "When a rank
fails").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ShardSpec:
    """The local block of a global (m, n) matrix (PyTorch [out, in] layout)."""

    shape: tuple[int, int]  # global (m, n)
    row_offset: int
    row_length: int
    col_offset: int
    col_length: int
    row_group: Any = None  # process group over which rows are split, or None
    col_group: Any = None  # process group over which columns are split, or None
    replica_groups: tuple = ()  # groups over which the block is replicated (HSDP), outer first

    def __post_init__(self) -> None:
        m, n = self.shape
        if self.row_offset < 0 or self.row_length < 0 or self.row_offset + self.row_length > m:
            raise ValueError(f"rows [{self.row_offset}, +{self.row_length}) outside 0..{m}")
        if self.col_offset < 0 or self.col_length < 0 or self.col_offset + self.col_length > n:
            raise ValueError(f"columns [{self.col_offset}, +{self.col_length}) outside 0..{n}")

    @property
    def local_shape(self) -> tuple[int, int]:
        return (self.row_length, self.col_length)

    @property
    def rows(self) -> slice:
        return slice(self.row_offset, self.row_offset + self.row_length)

    @property
    def cols(self) -> slice:
        return slice(self.col_offset, self.col_offset + self.col_length)

    @property
    def sharded(self) -> bool:
        return self.row_group is not None or self.col_group is not None

    @property
    def groups(self) -> tuple[Any, ...]:
        """Every group of the matrix: summing over each in turn reaches every rank holding it."""
        return tuple(g for g in (self.row_group, self.col_group) if g is not None) + tuple(
            self.replica_groups
        )

    def transposed(self) -> ShardSpec:
        """The same layout seen for Aᵀ (rows and columns swapped)."""
        return replace(
            self,
            shape=(self.shape[1], self.shape[0]),
            row_offset=self.col_offset,
            row_length=self.col_length,
            col_offset=self.row_offset,
            col_length=self.row_length,
            row_group=self.col_group,
            col_group=self.row_group,
        )

    @staticmethod
    def whole(shape: tuple[int, int]) -> ShardSpec:
        """A spec for an unsplit matrix (no collectives)."""
        return ShardSpec(tuple(shape), 0, shape[0], 0, shape[1])


def all_reduce_sum(t: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum `t` in place over `group` (no-op when group is None); returns t."""
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def reduce_over_matrix(t: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    """Sum a local partial statistic (norm², count, histogram) over every group that splits the
    matrix, so every rank ends with the global value. Size of t, never O(m·n)."""
    if spec is None:
        return t
    all_reduce_sum(t, spec.row_group)
    all_reduce_sum(t, spec.col_group)
    return t


def gather_cols(G_local: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """Assemble the full (n, r) G from each rank's rows [col_offset, +col_length).

    Placed into zeros and summed over the column group: O(n·r), works for uneven and empty
    shards (an all_gather_into_tensor would need equal sizes)."""
    if spec.col_group is None:
        return G_local
    n = spec.shape[1]
    G = torch.zeros((n, G_local.shape[1]), dtype=G_local.dtype, device=G_local.device)
    G[spec.cols] = G_local
    return all_reduce_sum(G, spec.col_group)


# --------------------------------------------------------------------------------------------
# Fault isolation: every rank issues the same collectives, whatever happens locally

FAULT_ENV = "DELTAWATCH_FAULT"
FAULT_POINTS = ("start", "after_stats", "power_step", "last_matrix", "project")
IMPOSSIBLE_BYTES = 1 << 62  # what an `alloc` fault asks torch for: no allocator can serve it


class Reductions:
    """The reductions of a piece of sharded work, each given as this rank's local contribution
    (a function), its declared shape and dtype, and the groups to sum it over.

    This plain form computes the contribution and sums it, and a failure raises (attach time);
    `CheckSession` is the fault-isolated form that checks and gradient projections run through."""

    def local(self, fn: Callable[[], Any]) -> Any:
        """Work on this rank's block, or whose result only this rank uses (no collective)."""
        return fn()

    def seam(self, point: str) -> None:
        """A named point of the work where the test seam (`FaultPlan`) can make this rank fail."""

    def all_reduce(
        self,
        local: Callable[[], torch.Tensor],
        shape: tuple[int, ...],
        groups: tuple[Any, ...],
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Σ of `local()`, this rank block's contribution, over each of `groups` in turn (None: not
        split); the summed tensor. The contribution's shape and dtype are declared."""
        t = self.contribution(local, tuple(shape), dtype)
        for group in groups:
            all_reduce_sum(t, group)
        return t

    def contribution(
        self, local: Callable[[], torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """This rank block's part of a reduction."""
        return local()


PLAIN = Reductions()


class CheckSession(Reductions):
    """One fault-isolated piece of collective work on one matrix: a check, or a gradient
    projection (DESIGN §3, "A failure on one rank never breaks the others").

    The first exception of the local work (an allocation failure included: torch's CPU and CUDA
    out-of-memory errors are Exceptions) is recorded instead of raised. From then on the rank acts
    as if its block of the matrix were zero: work on the block is skipped and each contribution of
    the block to a reduction is zeros of its declared shape (O((m+n)·r), never larger than what the
    healthy path allocates for the same collective). What follows a reduction (C = PᵀP, the
    assembled G, the convergence indicator, the lock) is computed on every rank alike from reduced
    tensors, so every branch of the work, and with it the sequence of collectives, is the same on
    every rank. `agree()` ends the work with one all-reduce of the failure flag over every group of
    the matrix (rows, columns, HSDP replicas); when any rank failed, every rank drops the result.
    A failure inside that replicated O((m+n)·r) work on one rank only is not isolated
    (docs/distributed.md "When a rank fails").

    spec None: an unsplit matrix (single process, DDP): no collective, no agreement needed.
    """

    def __init__(
        self,
        spec: ShardSpec | None,
        device: torch.device | str,
        *,
        step: int = 0,
        faults: FaultPlan | None = None,
        last: bool = False,
    ) -> None:
        self.spec = spec
        self.device = device
        self.step = step
        self.faults = faults
        self.last = last  # the last matrix this rank checks at this step (the seam's last_matrix)
        self.failure: Exception | None = None  # this rank's first local failure
        self.failed_ranks = 0  # how many ranks of the matrix failed, after agree()

    def local(self, fn: Callable[[], Any]) -> Any:
        """fn(), or None once this rank has failed (recording the first failure)."""
        if self.failure is not None:
            return None
        try:
            return fn()
        except Exception as exc:  # a local failure never leaves the session
            self.failure = exc
            return None

    def seam(self, point: str) -> None:
        if self.faults is not None:
            if point == "end":
                point = "last_matrix" if self.last else ""
            self.local(lambda: self.faults.fire(point, self.step, self.device))

    def contribution(
        self, local: Callable[[], torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """local(), or zeros of the declared shape once this rank has failed (a contribution of
        another shape or dtype counts as a failure)."""
        t = self.local(local)
        if t is not None and (tuple(t.shape) != shape or t.dtype != dtype):
            self.failure = ValueError(
                f"a local contribution of shape {list(t.shape)} {t.dtype}; the collective is "
                f"declared as {list(shape)} {dtype}"
            )
            t = None
        return t if t is not None else torch.zeros(shape, dtype=dtype, device=self.device)

    def agree(self) -> bool:
        """True when no rank of the matrix failed: one all-reduce of this rank's failure flag over
        the matrix's groups (none for an unsplit matrix). Sets `failed_ranks`."""
        groups = () if self.spec is None else self.spec.groups
        self.failed_ranks = int(self.failure is not None)
        if groups:
            flag = torch.tensor([float(self.failed_ranks)], device=self.device)
            for group in groups:
                all_reduce_sum(flag, group)
            self.failed_ranks = int(round(float(flag[0])))
        return self.failed_ranks == 0


class InjectedFault(RuntimeError):
    """The failure the test seam raises."""


@dataclass
class FaultPlan:
    """A test seam, off unless the environment variable DELTAWATCH_FAULT is set.

    ``DELTAWATCH_FAULT="POINT:RANK:STEP[:alloc],..."`` makes global rank RANK fail once at POINT of
    the check (or gradient projection) of step STEP: by raising `InjectedFault`, or with ``alloc``
    by asking torch for a 4 EiB tensor on the work's device, so torch's own allocation failure
    (CPU RuntimeError, CUDA OutOfMemoryError) runs. Points: ``start`` (before ΔW is formed),
    ``after_stats`` (right after the statistics all-reduce), ``power_step`` (between a power
    step's P and G reductions), each in the first matrix that reaches it; ``last_matrix`` (after
    the last collective of the last matrix the rank checks, before the agreement); ``project``
    (in the first gradient projection of optimizer step STEP, counted by the projection hook).
    """

    faults: dict[tuple[str, int], bool]  # (point, step) -> alloc
    fired: set[tuple[str, int]] = field(default_factory=set)

    @staticmethod
    def from_env(environ: Mapping[str, str] | None = None) -> FaultPlan | None:
        """This rank's plan from DELTAWATCH_FAULT; None when unset. A malformed value raises."""
        text = (os.environ if environ is None else environ).get(FAULT_ENV, "").strip()
        if not text:
            return None
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        faults = {}
        for entry in text.split(","):
            parts = entry.strip().split(":")
            ok = len(parts) in (3, 4) and parts[0] in FAULT_POINTS
            ok = ok and all(p.isdigit() for p in parts[1:3]) and parts[3:] in ([], ["alloc"])
            if not ok:
                raise ValueError(
                    f"{FAULT_ENV}: entry {entry!r}; expected POINT:RANK:STEP[:alloc] with POINT "
                    f"one of {', '.join(FAULT_POINTS)}"
                )
            if int(parts[1]) == rank:
                faults[(parts[0], int(parts[2]))] = parts[3:] == ["alloc"]
        return FaultPlan(faults)

    def fire(self, point: str, step: int, device: torch.device | str) -> None:
        """Fail here if the plan says so (once per point and step)."""
        key = (point, step)
        if key not in self.faults or key in self.fired:
            return
        self.fired.add(key)
        if self.faults[key]:
            torch.empty(IMPOSSIBLE_BYTES, dtype=torch.uint8, device=device)
        raise InjectedFault(f"{FAULT_ENV}: injected failure at {point}, step {step}")

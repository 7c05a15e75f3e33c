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
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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

"""Flat shards (DESIGN §3 "Flat shards"): FSDP1 `FlatParameter`s and DeepSpeed ZeRO-3 partitions.

Both frameworks flatten a weight W (m×n, row-major) and give each rank one contiguous slice
[start, stop) of it: partial rows at both ends. deltawatch keeps that slice as an additive piece
of W: the rows [⌊start/n⌋, ⌈stop/n⌉) it touches, as a block with zeros outside the slice, so
W = Σ_k Â_k over the ranks k of the group, and

    P = Σ_k Â_k·V          (m×r)   each rank adds its rows, one all-reduce of P
    G = Σ_k Â_kᵀ·P         (n×r)   one all-reduce of G
    C = PᵀP                (r×r)   local: every rank holds the whole P

— O((m+n)·r) per power step, the matrix is never gathered. The slices are disjoint and the zeros
contribute nothing, so ‖ΔW‖_F², the bitwise counts and the mask intersections are local sums
reduced over the group as for DTensor rows; the masks' order-statistic histograms count only the
slice's own entries (`entry_chunks`). The anchor is the rank's own slice (the same block).

At check time the slice is read where the optimizer updates it (FSDP1: the flat shard,
`_local_shard`, after `optimizer.step()`; ZeRO-3: `ds_tensor` after `engine.step()`) and copied
into its block (one copy of the local slice, in the parameter's dtype; none when the slice is whole
rows). Names are the original parameter names (no `_fsdp_wrapped_module.`, no `_flat_param`).

Refused at construction (`UnsupportedShardingError`): an FSDP1 parameter that was not contiguous
when flattened (its flat order is not row-major).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .collectives import PLAIN, Reductions, ShardSpec

FSDP_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


# --------------------------------------------------------------------------------------------
# The spec and the math


@dataclass(frozen=True)
class FlatSpec(ShardSpec):
    """A slice [start, stop) of the row-major flattening of a (m, n) matrix, held as the block of
    rows [row_offset, row_offset + row_length) with zeros outside the slice; row_group is the
    group over which the slices are spread (W = the sum of every rank's block)."""

    start: int = 0
    stop: int = 0

    def transposed(self) -> ShardSpec:
        """Aᵀ's layout: additive column blocks over the group, which `power_step`'s column path
        (P summed over the column group, G placed and summed by `gather_cols`) already handles."""
        return ShardSpec(
            (self.shape[1], self.shape[0]),
            0,
            self.shape[1],
            self.row_offset,
            self.row_length,
            row_group=None,
            col_group=self.row_group,
        )


def flat_spec(shape: tuple[int, int], start: int, stop: int, group: Any) -> FlatSpec:
    """The `FlatSpec` of the slice [start, stop) of a (m, n) matrix: rows ⌊start/n⌋ .. ⌈stop/n⌉."""
    m, n = shape
    if stop <= start:
        first = last = min(start // n, m)
    else:
        first, last = start // n, -(-stop // n)
    return FlatSpec(
        tuple(shape), first, last - first, 0, n, row_group=group, start=start, stop=stop
    )


def row_products(
    A: torch.Tensor | None, V: torch.Tensor, spec: FlatSpec, reductions: Reductions = PLAIN
) -> torch.Tensor:
    """A·V for the whole matrix (m×r), the same on every rank: each rank adds its block's rows
    (partial rows at the slice's ends add up to whole ones), one all-reduce of m×r (through
    `reductions`: after a local failure this rank adds zeros, collectives/CheckSession)."""

    def contribution() -> torch.Tensor:
        P = torch.zeros((spec.shape[0], V.shape[1]), dtype=V.dtype, device=A.device)
        P[spec.rows] = A @ V.to(A.dtype)
        return P

    return reductions.all_reduce(
        contribution, (spec.shape[0], V.shape[1]), (spec.row_group,), V.dtype
    )


def power_step(
    A: torch.Tensor | None, V: torch.Tensor, spec: FlatSpec, reductions: Reductions = PLAIN
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One power step on a flat slice: P = Σ_k Â_k·V (all-reduce, m×r), G = Σ_k Â_kᵀ·P
    (all-reduce, n×r), C = PᵀP (local). Returns P for the block's rows, G and C (every rank)."""
    P = row_products(A, V, spec, reductions)
    reductions.seam("power_step")
    G = reductions.all_reduce(
        lambda: A.T @ P[spec.rows], (spec.shape[1], V.shape[1]), (spec.row_group,), V.dtype
    )
    return P[spec.rows], G, P.T @ P


def channel_energy(
    D: torch.Tensor | None, V_ref: torch.Tensor, spec: FlatSpec, reductions: Reductions = PLAIN
) -> float:
    """‖ΔW·V_ref‖_F² from the whole Q = ΔW·V_ref (m×K, one all-reduce)."""
    return float(row_products(D, V_ref, spec, reductions).double().square().sum())


def entries(block: torch.Tensor, spec: ShardSpec | None, first_row: int = 0) -> torch.Tensor:
    """The entries of `block` (local rows first_row.. of the spec's block) that belong to the
    slice, flattened; the whole block for any other spec."""
    if not isinstance(spec, FlatSpec):
        return block
    n = spec.shape[1]
    base = (spec.row_offset + first_row) * n  # global index of block[0, 0]
    flat = block.reshape(-1)
    lo = min(max(spec.start - base, 0), flat.numel())
    hi = max(min(spec.stop - base, flat.numel()), lo)
    return flat[lo:hi]


def entry_chunks(
    chunks: Callable[[], Iterable[torch.Tensor]], spec: ShardSpec | None, rows_per_chunk: int
) -> Callable[[], Iterable[torch.Tensor]]:
    """`chunks` (row chunks of the block, `rows_per_chunk` rows each) restricted to the slice's
    entries, for the masks' histograms (client/masks.py)."""
    if not isinstance(spec, FlatSpec):
        return chunks

    def restricted() -> Iterator[torch.Tensor]:
        for i, c in enumerate(chunks()):
            yield entries(c, spec, i * rows_per_chunk)

    return restricted


def embed(values: torch.Tensor, spec: FlatSpec) -> torch.Tensor:
    """The block of `spec` holding `values` (the slice's entries, 1-D) and zeros elsewhere; a view
    of `values` when the slice is whole rows."""
    n = spec.shape[1]
    if spec.start % n == 0 and spec.stop % n == 0 or spec.row_length == 0:
        return values.reshape(spec.row_length, n)
    block = values.new_zeros(spec.row_length * n)
    lo = spec.start - spec.row_offset * n
    block[lo : lo + values.numel()] = values
    return block.view(spec.row_length, n)


# --------------------------------------------------------------------------------------------
# The parameters inside flat shards


@dataclass(eq=False)
class FlatSlice:
    """One original 2-D parameter held as a flat slice on this rank: what the Monitor selects,
    places and reads. `read()` returns the slice's current values (1-D, a view of the storage the
    optimizer updates); group None means every rank holds the whole parameter (FSDP1 NO_SHARD)."""

    shape: torch.Size
    dtype: torch.dtype
    requires_grad: bool
    start: int
    stop: int
    group: Any
    ranks: tuple[int, ...]  # the global ranks holding the parameter (owners are chosen there)
    read: Callable[[], torch.Tensor]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)


def part_range(s: FlatSlice, rows: tuple[int, int] | None) -> tuple[int, int]:
    """The slice's range inside the row block `rows` of the parameter, relative to that block."""
    n = s.shape[1]
    r0, r1 = rows if rows is not None else (0, s.shape[0])
    lo = min(max(s.start, r0 * n), r1 * n)  # clamped into the block
    hi = max(min(s.stop, r1 * n), lo)
    return lo - r0 * n, hi - r0 * n


def local_values(s: FlatSlice, rows: tuple[int, int] | None) -> torch.Tensor:
    """The slice's current entries inside the row block `rows` (1-D view)."""
    n = s.shape[1]
    start, stop = part_range(s, rows)
    offset = (rows[0] if rows is not None else 0) * n - s.start
    with torch.no_grad():
        return s.read().detach()[start + offset : stop + offset]


def named_parameters(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """`model.named_parameters()` with FSDP1 and ZeRO-3 parameters as `FlatSlice`s under their
    original names; plain parameters are passed through (names cleaned of FSDP1's wrappers)."""
    units = _fsdp1_units(model)
    inside: set[int] = set()
    for prefix, handle, fsdp in units:
        fp = handle.flat_param
        inside.add(id(fp))
        inside.update(id(p) for p in getattr(fp, "_params", None) or ())
        inside.update(id(p) for p in getattr(fp, "_shared_params", None) or ())
        yield from _fsdp1_slices(prefix, handle, fsdp)
    for name, p in model.named_parameters():
        if id(p) in inside:
            continue
        if hasattr(p, "ds_tensor"):
            yield clean_name(name), _zero3_slice(p)
        else:
            yield clean_name(name), p


def clean_name(name: str) -> str:
    """The parameter's name as a single-process model has it (FSDP1's wrapper prefixes removed)."""
    for prefix in FSDP_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _fsdp1_units(model: nn.Module) -> list[tuple[str, Any, Any]]:
    """(module name, FlatParamHandle, the FSDP module) of every FSDP1 unit holding parameters."""
    if not dist.is_available():
        return []
    from torch.distributed.fsdp import FullyShardedDataParallel

    out = []
    for name, module in model.named_modules():
        handle = getattr(module, "_handle", None)
        if isinstance(module, FullyShardedDataParallel) and handle is not None:
            out.append((name, handle, module))
    return out


def _fsdp1_slices(prefix: str, handle: Any, fsdp: Any) -> Iterator[tuple[str, FlatSlice]]:
    """The original parameters of one FlatParameter, each as the slice this rank holds."""
    fp = handle.flat_param
    sharded = handle.uses_sharded_strategy
    group = fsdp.process_group if sharded else None
    hybrid = getattr(fsdp, "_inter_node_pg", None) is not None
    ranks = _ranks(None if hybrid or not sharded else group)
    orig = getattr(fp, "_params", None)
    for i, (fqn, shape, info) in enumerate(
        zip(fp._fqns, fp._shapes, fp._shard_param_infos, strict=True)
    ):
        name = clean_name(f"{prefix}.{fqn}" if prefix else fqn)
        if not fp._contiguities[i]:
            from .sharding import UnsupportedShardingError

            raise UnsupportedShardingError(
                f"parameter {name!r} was not contiguous when FSDP1 flattened it, so its flat "
                f"order is not row-major; make it contiguous before wrapping"
            )
        shape = torch.Size(shape)
        if info.in_shard:
            start, length = info.intra_param_start_idx, info.numel_in_shard
        else:
            start, length = 0, 0
        yield (
            name,
            FlatSlice(
                shape=shape,
                dtype=fp.dtype,
                requires_grad=orig[i].requires_grad if orig else fp.requires_grad,
                start=start if sharded else 0,
                stop=start + length if sharded else shape.numel(),
                group=group,
                ranks=ranks,
                read=_fsdp1_reader(fp, info.offset_in_shard or 0, length),
            ),
        )


def _fsdp1_reader(fp: Any, offset: int, length: int) -> Callable[[], torch.Tensor]:
    """The slice inside FSDP1's sharded flat parameter (`_local_shard`: what the optimizer
    updates, whatever the FlatParameter's data points at when the check runs)."""

    def read() -> torch.Tensor:
        shard = getattr(fp, "_local_shard", None)
        shard = fp.data if shard is None else shard
        return shard[offset : offset + length]

    return read


def _zero3_slice(p: nn.Parameter) -> FlatSlice:
    """A ZeRO-3 parameter: rank k of `ds_process_group` holds elements [k·s, (k+1)·s) of the
    flattened weight in `ds_tensor` (s = the partition size, the last one padded)."""
    group = getattr(p, "ds_process_group", None)
    shape = torch.Size(p.ds_shape)
    size = p.ds_tensor.numel()
    k = dist.get_rank(group)
    start = min(k * size, shape.numel())
    stop = min(start + size, shape.numel())
    return FlatSlice(
        shape=shape,
        dtype=p.ds_tensor.dtype,
        requires_grad=p.requires_grad,
        start=start,
        stop=stop,
        group=group,
        ranks=_ranks(group),
        read=lambda: p.ds_tensor.data[: stop - start],
    )


def _ranks(group: Any) -> tuple[int, ...]:
    """The global ranks of `group` (None: the whole world)."""
    if group is None:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_process_group_ranks(group))

"""Where a monitored matrix lives in a distributed trainer (DESIGN §3 "Sharded parameters").

One question, asked once per matrix at construction: *which block of the global (m, n) matrix does
this rank hold, over which process groups are its rows and columns split, and which rank sends its
reports?* The answer is a `Placement`; `client/collectives.py`'s `ShardSpec` (built from it) is all
the tracker needs to run its local matmuls plus O((m+n)·r) collectives.

Supported layouts (PyTorch `[out, in]` weights):

* single process, and DDP / ZeRO-1/2 (replicated weights): no collective at all; matrix i is
  computed and sent by rank ``i mod world_size`` only (``computes_here`` is False elsewhere).
* DTensor parameters (FSDP2 ``fully_shard`` -> ``Shard(0)``, tensor parallel ``ColwiseParallel`` ->
  ``Shard(0)``, ``RowwiseParallel`` -> ``Shard(1)``, and 2-D meshes mixing them, ``Replicate`` on
  any mesh dimension, e.g. HSDP): only the local block is touched. Rows split over one or several
  mesh dimensions (FSDP2 + colwise TP gives ``_StridedShard(0)`` + ``Shard(0)``) reduce over the
  flattened group of those dimensions; columns split over exactly one mesh dimension. Uneven and
  empty blocks (``torch.chunk`` rule) work: an empty block contributes zeros. Every rank of the
  parameter's mesh computes every matrix (the collectives need all of them); matrix i is *sent* by
  the mesh's rank number ``i mod mesh size``.

* flat shards (FSDP1 ``FullyShardedDataParallel``, any ``use_orig_params``, nested units, every
  sharding strategy; DeepSpeed ZeRO-3 ``ds_tensor`` partitions): a contiguous slice of the
  row-major flattened weight, read through client/flat.py (`FlatSlice`, `FlatSpec`); names are the
  original parameter names. Every rank of the shard group computes; matrix i is sent by the
  group's rank number ``i mod group size`` (the world's, for FSDP1 HYBRID_SHARD).

Refused at construction, with the fix in the message (never wrong numbers): ``Partial``
placements, columns split over several mesh dimensions, ``_StridedShard`` layouts other than FSDP2
over tensor parallel, and FSDP1 parameters that were not contiguous when flattened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import flat
from .collectives import ShardSpec
from .flat import named_parameters  # noqa: F401 - the Monitor selects from these

SUPPORTED = (
    "deltawatch supports single-process models, DDP (torch.nn.parallel.DistributedDataParallel) "
    "and DeepSpeed ZeRO-1/2 (replicated weights), flat shards (FSDP1 FullyShardedDataParallel, "
    "DeepSpeed ZeRO-3), and DTensor parameters: FSDP2 (torch.distributed.fsdp.fully_shard), "
    "tensor parallel (parallelize_module with ColwiseParallel/RowwiseParallel) and 2-D meshes "
    "combining them"
)


class UnsupportedShardingError(ValueError):
    """The model's weights are laid out in a way deltawatch cannot read as matrix blocks."""


@dataclass(frozen=True)
class Placement:
    """Where one monitored matrix (or one part of a fused matrix) lives on this rank.

    rows/cols: the global index ranges [start, stop) of the local block along each dimension
    (always contiguous; possibly empty). row_group/col_group: the process groups over which
    rows/columns are split (None: not split).
    """

    shape: tuple[int, int]  # global (m, n)
    local_shape: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int]
    row_group: Any  # dist.ProcessGroup | None
    col_group: Any  # dist.ProcessGroup | None
    layout: str  # one of records.SHARD_LAYOUTS (the manifest's shard_layout)
    owner_rank: int  # the global rank that sends this matrix's reports
    computes_here: bool  # False only for a replicated matrix another rank owns
    replica_groups: tuple = ()  # groups over which the block is replicated (HSDP)
    flat: tuple[int, int] | None = None  # a flat slice [start, stop) of the row-major matrix

    @property
    def sharded(self) -> bool:
        return self.row_group is not None or self.col_group is not None

    @property
    def spec(self) -> ShardSpec | None:
        """The tracker's `ShardSpec`; None when nothing is split (no collective at all)."""
        if not self.sharded:
            return None
        if self.flat is not None:
            return flat.flat_spec(self.shape, *self.flat, self.row_group)
        return ShardSpec(
            shape=self.shape,
            row_offset=self.rows[0],
            row_length=self.local_shape[0],
            col_offset=self.cols[0],
            col_length=self.local_shape[1],
            row_group=self.row_group,
            col_group=self.col_group,
            replica_groups=self.replica_groups,
        )


# --------------------------------------------------------------------------------------------
# Local block


def is_dtensor(param: torch.Tensor) -> bool:
    """Whether `param` is a DTensor (FSDP2, tensor parallel)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def local_block(param: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """This rank's block of `param` as a detached view (no copy; in-place optimizer updates show).

    `rows` (global, [start, stop)) selects part of the matrix's rows, for fused matrices; with a
    sharded parameter it is intersected with the local rows. Call it at check time: FSDP2 and
    tensor parallel keep updating the same local storage, but a view is cheaper than a question.
    """
    if isinstance(param, flat.FlatSlice):
        return _flat_block(param, rows)
    with torch.no_grad():
        local = param.to_local() if is_dtensor(param) else param
        local = local.detach()
    if rows is None:
        return local
    block_rows = describe_layout(param)["rows"] if is_dtensor(param) else (0, local.shape[0])
    lo = max(rows[0], block_rows[0]) - block_rows[0]
    hi = max(min(rows[1], block_rows[1]) - block_rows[0], lo)
    return local[lo:hi]


# --------------------------------------------------------------------------------------------
# Layout of a DTensor


def describe_layout(param: torch.Tensor) -> dict:
    """The local block of a 2-D DTensor: global row and column ranges, and the process groups.

    Pure bookkeeping from `param.device_mesh` and `param.placements`. A tensor dimension split over
    several mesh dimensions is chunked outer to inner (`torch.chunk` rule at each level), so the
    local block stays contiguous: ``(Shard(0), Shard(0))`` chunks by mesh dimension 0 first;
    FSDP2 over colwise tensor parallel gives ``(_StridedShard(0, sf=tp), Shard(0))``, which means
    "by tp first, then by dp" (that is what the stride records). The only side effect is creating
    (once per mesh) a flattened group for rows split over several mesh dimensions — a collective
    call every rank makes in the same order at construction.
    """
    from torch.distributed.tensor import Partial, Replicate, Shard

    mesh = param.device_mesh
    placements = tuple(param.placements)
    m, n = (int(s) for s in param.shape)
    split: dict[int, list[int]] = {0: [], 1: []}  # tensor dim -> mesh dims, outer to inner
    strided: dict[int, int] = {}  # mesh dim -> split factor of a _StridedShard
    replicated: list[int] = []  # mesh dims holding copies (HSDP's replicate dimension)
    for mesh_dim, pl in enumerate(placements):
        if isinstance(pl, Replicate):
            replicated.append(mesh_dim)
            continue
        if isinstance(pl, Partial) or not hasattr(pl, "dim"):
            raise UnsupportedShardingError(
                f"placement {pl!r} in {placements} is not a row or column split of a weight; "
                f"{SUPPORTED}"
            )
        dim = pl.dim if pl.dim >= 0 else pl.dim + 2
        split[dim].append(mesh_dim)
        if not isinstance(pl, Shard):
            strided[mesh_dim] = int(getattr(pl, "split_factor", 1))
    for dim, dims in split.items():
        split[dim] = _chunk_order(mesh, dims, strided, placements)
    if len(split[1]) > 1:
        raise UnsupportedShardingError(
            f"columns split over {len(split[1])} mesh dimensions {placements}; deltawatch "
            f"supports columns split over one mesh dimension. {SUPPORTED}"
        )
    coord = mesh.get_coordinate()
    rows = _nested_range(m, [(mesh.size(d), coord[d]) for d in split[0]])
    cols = _nested_range(n, [(mesh.size(d), coord[d]) for d in split[1]])
    local_shape = (rows[1] - rows[0], cols[1] - cols[0])
    actual = tuple(int(s) for s in param.to_local().shape)
    if actual != local_shape:  # the layout rule above does not describe this tensor
        raise UnsupportedShardingError(
            f"placements {placements} on mesh {mesh.mesh.tolist()} give a local block of shape "
            f"{actual}, not the contiguous block {local_shape} deltawatch expects. {SUPPORTED}"
        )
    layout = {
        (False, False): "replicated",
        (True, False): "rows",
        (False, True): "cols",
        (True, True): "rows+cols",
    }[(bool(split[0]), bool(split[1]))]
    return {
        "shape": (m, n),
        "local_shape": local_shape,
        "rows": rows,
        "cols": cols,
        "row_group": _group_over(mesh, split[0]),
        "col_group": _group_over(mesh, split[1]),
        "replica_groups": tuple(mesh.get_group(d) for d in replicated),
        "layout": layout,
    }


def _chunk_order(mesh: Any, dims: list[int], strided: dict[int, int], placements) -> list[int]:
    """Mesh dimensions splitting one tensor dimension, in chunking order (outer first)."""
    if not any(d in strided for d in dims):
        return dims  # plain Shard on each: left to right
    fsdp_over_tp = len(dims) == 2 and dims[0] in strided and dims[1] not in strided
    if fsdp_over_tp and strided[dims[0]] == mesh.size(dims[1]):
        return [dims[1], dims[0]]  # by tp first, then dp
    raise UnsupportedShardingError(
        f"strided placements {placements} on mesh {mesh.mesh.tolist()}; deltawatch supports "
        f"_StridedShard only as FSDP2 over tensor parallel produces it. {SUPPORTED}"
    )


def _nested_range(length: int, levels: list[tuple[int, int]]) -> tuple[int, int]:
    """[start, stop) after chunking [0, length) by (parts, index) at each level, outer first."""
    start = 0
    for parts, index in levels:
        starts, lengths = chunk_ranges(length, parts)
        start, length = start + starts[index], lengths[index]
    return (start, start + length)


def chunk_ranges(length: int, parts: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`torch.chunk`'s split of `length` into `parts` (what DTensor's Shard uses): block size
    c = ⌈length/parts⌉, part k = [k·c, min((k+1)·c, length)), empty at the end when it runs out."""
    c = -(-length // parts) if parts else 0
    starts = tuple(min(k * c, length) for k in range(parts))
    lengths = tuple(min((k + 1) * c, length) - s for k, s in zip(range(parts), starts, strict=True))
    return starts, lengths


_FLAT_GROUPS: dict[tuple, Any] = {}


def _group_over(mesh: Any, mesh_dims: list[int]) -> Any:
    """The process group spanning `mesh_dims` of `mesh` (None for no dimension)."""
    if not mesh_dims:
        return None
    if len(mesh_dims) == 1:
        return mesh.get_group(mesh_dims[0])
    mesh_dims = sorted(mesh_dims)  # a sum over the group: the order of its ranks does not matter
    key = (id(mesh), tuple(mesh_dims))
    if key not in _FLAT_GROUPS:
        names = mesh.mesh_dim_names
        if names is None:
            raise UnsupportedShardingError(
                "rows split over several mesh dimensions of an unnamed DeviceMesh; name the mesh "
                "dimensions (init_device_mesh(..., mesh_dim_names=('dp', 'tp')))"
            )
        sub = mesh[tuple(names[d] for d in mesh_dims)]
        _FLAT_GROUPS[key] = sub._flatten().get_group()
    return _FLAT_GROUPS[key]


# --------------------------------------------------------------------------------------------
# Ownership and the Placement


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def owner_rank(index: int, param: torch.Tensor | None = None) -> int:
    """The global rank that sends matrix number `index` (its position in the selection order,
    the same on every rank): rank ``index mod world_size`` for replicated weights, the mesh's
    ``index mod mesh size``-th rank for a DTensor (so pipeline stages with their own meshes still
    spread their sending)."""
    if param is not None and is_dtensor(param):
        ranks = tuple(int(r) for r in param.device_mesh.mesh.flatten().tolist())
        return ranks[index % len(ranks)]
    if isinstance(param, flat.FlatSlice):
        return param.ranks[index % len(param.ranks)]
    _, size = world()
    return index % size


def place(param: torch.Tensor, index: int, rows: tuple[int, int] | None = None) -> Placement:
    """The `Placement` of matrix number `index` (or of its global row range `rows`, for one part
    of a fused matrix) on this rank."""
    if param.dim() != 2:
        raise UnsupportedShardingError(
            f"deltawatch monitors 2-D weights; got a {param.dim()}-D parameter of shape "
            f"{tuple(param.shape)}"
        )
    rank, _ = world()
    owner = owner_rank(index, param)
    if isinstance(param, flat.FlatSlice) and param.group is not None:
        return _place_flat(param, rows, owner)
    if not is_dtensor(param):
        m, n = (int(s) for s in param.shape)
        r0, r1 = rows if rows is not None else (0, m)
        return Placement(
            shape=(r1 - r0, n),
            local_shape=(r1 - r0, n),
            rows=(0, r1 - r0),
            cols=(0, n),
            row_group=None,
            col_group=None,
            layout="replicated",
            owner_rank=owner,
            computes_here=rank == owner,
        )
    d = describe_layout(param)
    m, n = d["shape"]
    local_shape = d["local_shape"]
    block_rows = d["rows"]
    if rows is not None:
        # the part's rows [p0, p1) ∩ the local block [b0, b1), relative to the part; an empty
        # intersection keeps an in-range offset with length 0 (the rank contributes zeros)
        m = rows[1] - rows[0]
        lo = max(rows[0], block_rows[0])
        length = max(0, min(rows[1], block_rows[1]) - lo)
        start = min(max(lo - rows[0], 0), m - length)
        block_rows = (start, start + length)
        local_shape = (length, local_shape[1])
    return Placement(
        shape=(m, n),
        local_shape=local_shape,
        rows=block_rows,
        cols=d["cols"],
        row_group=d["row_group"],
        col_group=d["col_group"],
        layout=d["layout"],
        owner_rank=owner,
        computes_here=True,
        replica_groups=d["replica_groups"],
    )


def describe(param: torch.Tensor, index: int = 0) -> tuple[torch.Tensor, ShardSpec | None]:
    """(this rank's block of `param` as a view, its `ShardSpec` or None when not split)."""
    return local_block(param), place(param, index).spec


# --------------------------------------------------------------------------------------------
# Flat slices (FSDP1, ZeRO-3)


def _place_flat(param: flat.FlatSlice, rows: tuple[int, int] | None, owner: int) -> Placement:
    """The `Placement` of a flat slice (or of its part inside the fused rows `rows`)."""
    m, n = (int(s) for s in param.shape)
    r0, r1 = rows if rows is not None else (0, m)
    start, stop = flat.part_range(param, rows)
    spec = flat.flat_spec((r1 - r0, n), start, stop, param.group)
    return Placement(
        shape=spec.shape,
        local_shape=spec.local_shape,
        rows=(spec.row_offset, spec.row_offset + spec.row_length),
        cols=(0, n),
        row_group=param.group,
        col_group=None,
        layout="flat",
        owner_rank=owner,
        computes_here=True,
        flat=(start, stop),
    )


def _flat_block(param: flat.FlatSlice, rows: tuple[int, int] | None) -> torch.Tensor:
    """This rank's block of a flat slice (zeros outside the slice), or of the whole parameter
    when every rank holds it (FSDP1 NO_SHARD)."""
    values = flat.local_values(param, rows)
    if param.group is None:
        return values.view(-1, int(param.shape[1]))
    m, n = (int(s) for s in param.shape)
    r0, r1 = rows if rows is not None else (0, m)
    return flat.embed(values, flat.flat_spec((r1 - r0, n), *flat.part_range(param, rows), None))

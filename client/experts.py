"""Mixture-of-experts weights: a packed 3-D expert parameter as E matrices, checked in one batch.

Layout (DESIGN §2 "Experts"). `transformers` keeps the experts of a mixture-of-experts block as
3-D parameters of an `experts` module whose first dimension is the expert index, in PyTorch's
`[out, in]` layout per expert (the forward is `linear(x, W[e])`): Qwen3-MoE, Qwen3-Next,
Mixtral, DeepSeek-V2/V3, GLM-4-MoE, OLMoE, … hold

    mlp.experts.gate_up_proj  [E, 2f, d]   rows [0, f) the gate, rows [f, 2f) the up projection
                                           (the forward's `linear(x, W[e]).chunk(2, dim=-1)`)
    mlp.experts.down_proj     [E, d, f]

The rule: a trainable 3-D parameter named `<block>.<...>.experts.<proj>` (a block index in the
name, see client/naming.py) is monitored by default as E matrices per part; `gate_up_proj` splits
into its `gate_proj` and `up_proj` row halves (client/fused.py's row blocks, built in), any other
name is one part. Expert e's part is reported as `<...>.experts.<e>.<part>.weight`, the name the
older ModuleList layout of `transformers` gives the same matrix, so the two layouts line up; it
parses to (layer, module `mlp.experts.<part>`) with `expert` e. `include` / `exclude` are searched
in those per-expert names. Refused at construction (never wrong numbers): a transposed `[in, out]`
layout (Llama 4, GPT-OSS: the experts module says `is_transposed`, or `gate_up_proj` [E, d, 2f]
does not fit beside `down_proj` [E, d, f]) and a `gate_up_proj` with an odd row count.

Where the experts live (`holders`): single process and DDP keep the whole parameter on every
rank, and expert e is checked and sent by the rank whose `torch.chunk` block of the experts holds
it (contiguous blocks, so each rank batches its own). FSDP2 `fully_shard` (and expert parallel on a
1-D mesh) shards the parameter `Shard(0)` over experts: each rank holds whole experts, checks and
sends exactly those, with no collective at all (manifest layout "expert"). Any other placement
(a split inside the experts, 2-D meshes, flat FSDP1 / ZeRO-3 slices) is refused at construction.

The batched check (`ExpertGroup`): the experts of one part run as one computation over the
[B, m, n] stack, client/batch.py's `MatrixGroup` (one batched ΔW pass, `subspace_iteration` with a
batch dimension, each expert's own stopping rule), so each expert's `MatrixCheck` is the one its
own `MatrixTracker` would produce (tests/test_moe.py checks it); the state (bases, lock) lives in
one `MatrixTracker` per expert, so baselines, checkpoints and lock references work unchanged.

Memory per expert matrix (m×n, bf16 view): the W0 copy (2 bytes per entry; the dtype's size in the
native view) + the packed principal mask (0.125 bytes per entry), in one stacked tensor per part,
plus the bases: V and V_w (n×r float32 each), W0's basis V0 and baseline G (n×r each), the
baseline C (r×r) and the lock's log-spaced V_K snapshots (n×K each): for a Qwen3-30B-A3B
gate_proj expert (768×2048, r = 32) 3.35 MB of anchor and 1.05 MB of bases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import flat, naming, sharding
from .anchor import Anchor
from .batch import MatrixGroup
from .fused import part_name
from .settings import AnchorSettings, LockSettings, SketchSettings
from .tracker import MatrixTracker

# The fused expert parameters whose row halves are separate projections (module docstring).
FUSED_PARTS = {"gate_up_proj": ("gate_proj", "up_proj")}
DOWN = "down_proj"
UNSUPPORTED = (
    "deltawatch checks packed experts held whole on each rank: single process, DDP, and FSDP2 "
    "fully_shard / expert parallel on a 1-D mesh (Shard(0) over the experts)"
)


@dataclass(frozen=True)
class ExpertMatrix:
    """One reported matrix of a packed expert parameter: expert `expert`'s part `part` (its
    global row range `rows` inside W[expert], None: all rows)."""

    name: str
    expert: int
    part: str
    rows: tuple[int, int] | None
    placement: sharding.Placement


def is_packed(name: str, param: torch.Tensor) -> bool:
    """A 3-D parameter of an `experts` module inside a repeated block (module docstring)."""
    parts = name.split(".")
    if param.dim() != 3 or len(parts) < 2 or parts[-2] != naming.EXPERTS:
        return False
    return naming.parse_name(name)[0] is not None


def expert_name(name: str, expert: int, part: str) -> str:
    """`a.experts.gate_up_proj` + (3, `gate_proj`) -> `a.experts.3.gate_proj.weight`."""
    return part_name(f"{name.rpartition('.')[0]}.{expert}.x.weight", part)


def parts_of(model: torch.nn.Module, name: str, param: torch.Tensor) -> list[tuple[str, Any]]:
    """(part, global rows in W[e] or None) of a packed parameter; raises on a layout that is not
    the `[out, in]` layout of the module docstring, with the fix."""
    E, m, n = (int(s) for s in param.shape)
    parent, _, last = name.rpartition(".")
    module = _submodule(model, parent)
    hint = f"exclude=r'{parent.replace('.', chr(92) + '.')}\\.' leaves these experts out"
    if getattr(module, "is_transposed", False):
        raise ValueError(
            f"{name} [{E}, {m}, {n}] is stored transposed ([in, out], is_transposed=True); "
            f"deltawatch reads packed experts in the [out, in] layout of Qwen3-MoE/Mixtral; {hint}"
        )
    if last not in FUSED_PARTS:
        return [(last, None)]
    down = getattr(module, DOWN, None)
    fits = m % 2 == 0
    if isinstance(down, torch.Tensor) and down.dim() == 3:
        fits = fits and (m, n) == (2 * int(down.shape[2]), int(down.shape[1]))
    if not fits:
        shown = list(down.shape) if isinstance(down, torch.Tensor) else None
        raise ValueError(
            f"{name} [{E}, {m}, {n}] beside {DOWN} {shown} is not the [E, 2f, d] / [E, d, f] "
            f"layout of Qwen3-MoE/Mixtral experts (a transposed [E, d, 2f] layout as in Llama 4 "
            f"or GPT-OSS is not supported); {hint}"
        )
    f = m // 2
    return [(p, (i * f, (i + 1) * f)) for i, p in enumerate(FUSED_PARTS[last])]


def _submodule(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def holders(param: torch.Tensor) -> tuple[list[int], str, int, tuple[int, int]]:
    """Where the experts of `param` live: (owner rank of each expert, the manifest layout, the
    global index of the local tensor's first expert, the experts [e0, e1) this rank checks).
    Raises `UnsupportedShardingError` for the layouts the module docstring refuses."""
    E = int(param.shape[0])
    if isinstance(param, flat.FlatSlice):
        raise sharding.UnsupportedShardingError(
            f"packed experts [{E}, ...] in a flat shard (FSDP1, DeepSpeed ZeRO-3); {UNSUPPORTED}"
        )
    if sharding.is_dtensor(param):
        from torch.distributed.tensor import Shard

        mesh, placements = param.device_mesh, tuple(param.placements)
        if mesh.ndim != 1 or placements != (Shard(0),):
            raise sharding.UnsupportedShardingError(
                f"packed experts [{E}, ...] with placements {placements} on a {mesh.ndim}-D "
                f"mesh; {UNSUPPORTED}"
            )
        ranks = [int(r) for r in mesh.mesh.flatten().tolist()]
        here = mesh.get_coordinate()[0]
        layout, offset = "expert", None
    else:
        rank, size = sharding.world()
        ranks, here, layout, offset = list(range(size)), rank, "replicated", 0
    starts, lengths = sharding.chunk_ranges(E, len(ranks))
    owners = [ranks[k] for k in range(len(ranks)) for _ in range(lengths[k])]
    mine = (starts[here], starts[here] + lengths[here])
    return owners, layout, mine[0] if offset is None else offset, mine


def select(
    model: torch.nn.Module, name: str, param: torch.Tensor, selects
) -> tuple[list[ExpertMatrix], int, tuple[int, int]]:
    """The selected matrices of packed parameter `name` (`selects(name) -> bool | None`, the
    user's include/exclude verdict on each per-expert name; None: monitored), with the global
    index of the local tensor's first expert and this rank's expert range."""
    owners, layout, offset, mine = holders(param)
    rank, _ = sharding.world()
    n = int(param.shape[2])
    out = []
    for part, rows in parts_of(model, name, param):
        m = int(param.shape[1]) if rows is None else rows[1] - rows[0]
        for e, owner in enumerate(owners):
            matrix = expert_name(name, e, part)
            if selects(matrix) is False:
                continue
            placement = sharding.Placement(
                shape=(m, n),
                local_shape=(m, n) if mine[0] <= e < mine[1] else (0, n),
                rows=(0, m),
                cols=(0, n),
                row_group=None,
                col_group=None,
                layout=layout,
                owner_rank=owner,
                computes_here=owner == rank and mine[0] <= e < mine[1],
            )
            out.append(ExpertMatrix(matrix, e, part, rows, placement))
    return out, offset, mine


# --------------------------------------------------------------------------------------------
# The batched check


class ExpertGroup(MatrixGroup):
    """The experts of one part of one packed parameter that this rank checks, as a batch
    (client/batch.py `MatrixGroup`, its stack a view of the packed parameter).

    `param` the 3-D parameter, `rows` the part's rows in W[e] (None: all), `experts` the global
    expert indices checked here (ascending), `offset` the global index of the local tensor's first
    expert, `names` their matrix names. One `MatrixTracker` per expert holds its state; the
    anchors' W0 copies and packed masks are views into one stacked tensor each."""

    def __init__(
        self,
        param: torch.Tensor,
        rows: tuple[int, int] | None,
        experts: list[int],
        offset: int,
        names: list[str],
        *,
        anchor: AnchorSettings = AnchorSettings(),
        sketch: SketchSettings = SketchSettings(),
        lock: LockSettings = LockSettings(),
    ) -> None:
        self.param, self.rows = param, rows
        self.positions = [e - offset for e in experts]
        W = self.local()
        trackers = [
            MatrixTracker(name, Anchor(W[i], settings=anchor, sketch=sketch, name=name), lock=lock)
            for i, name in enumerate(names)
        ]
        super().__init__(trackers, self.local)

    def local(self) -> torch.Tensor:
        """This rank's experts of the part as a [B, m, n] tensor (a view when they are
        contiguous, as they are unless `include` skipped some)."""
        with torch.no_grad():
            W = self.param.to_local() if sharding.is_dtensor(self.param) else self.param
            W = W.detach()
        if self.rows is not None:
            W = W[:, self.rows[0] : self.rows[1]]
        p = self.positions
        if p == list(range(p[0], p[-1] + 1)):
            return W[p[0] : p[-1] + 1]
        return W[torch.tensor(p, device=W.device)]

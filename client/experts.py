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
[B, m, n] stack: ΔW and the exact statistics in one pass (norms, bitwise bf16 counts, both masks
per expert), then the client's one iteration, client/sketch.py `subspace_iteration`, with a batch
dimension: `bmm`-shaped power steps P = ΔW·V, G = ΔWᵀ·P, the block Krylov products of every
expert at once, one batched eigendecomposition for every expert's Rayleigh–Ritz, each expert's
own stopping rule (its tracker's `_stopping_rule`: the r×r error bound on the host, and the
rotation's rule on W_t), and, per group of experts that stopped after the same number of steps,
the compressed sketch, the Ritz vectors V_K and the next basis batched again. An expert keeps
iterating only while its own rule says so, so each expert's `MatrixCheck` is the one its own
`MatrixTracker` would produce (tests/test_moe.py checks it); the state (bases, lock) lives in one
`MatrixTracker` per expert, so baselines, checkpoints and lock references work unchanged. At most
`BATCH_ELEMENTS` entries of ΔW are formed at once; on the CPU the elementwise passes run in
slices of `CHUNK_ELEMENTS` entries (cache-sized, like the unbatched tracker's row chunks).

Memory per expert matrix (m×n, bf16 view): the W0 copy (2 bytes per entry; the dtype's size in the
native view) + the packed principal mask (0.125 bytes per entry), in one stacked tensor per part,
plus the bases: V and V_w (n×r float32 each), W0's basis V0 and baseline G (n×r each), the
baseline C (r×r) and the lock's log-spaced V_K snapshots (n×K each): for a Qwen3-30B-A3B
gate_proj expert (768×2048, r = 32) 3.35 MB of anchor and 1.05 MB of bases.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import flat, naming, sharding
from .anchor import Anchor
from .collectives import CheckSession
from .fused import part_name
from .lock import LockState
from .masks import CHUNK_ELEMENTS
from .records import MatrixCheck, Sketch
from .settings import AnchorSettings, LockSettings, SketchSettings
from .sketch import (
    Space,
    compress,
    highest_precision,
    orth,
    pad_columns,
    ritz_vectors,
    subspace_iteration,
)
from .tracker import MatrixTracker, _to_wire

# The fused expert parameters whose row halves are separate projections (module docstring).
FUSED_PARTS = {"gate_up_proj": ("gate_proj", "up_proj")}
DOWN = "down_proj"
BATCH_ELEMENTS = 1 << 26  # entries of ΔW formed at once (256 MiB of float32)
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


def unpack_rows(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Rows of packed masks ([B, bytes], MSB first like client/masks.py `pack_bits`) as a boolean
    [B, count] tensor."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :count].bool()


def per_matrix(reduce, X: torch.Tensor) -> torch.Tensor:
    """`reduce` (a full reduction, e.g. torch.sum) of each matrix of X [B, m, n], as a [B]
    tensor. On the CPU one full reduction per matrix: PyTorch's CPU reductions over trailing
    dimensions run ~10x slower than full ones; elsewhere one reduction over the last two dims."""
    if X.device.type == "cpu":
        return torch.stack([reduce(x) for x in X])
    return reduce(X.flatten(-2), dim=-1)


def _norm64(X: torch.Tensor, **dim) -> torch.Tensor:
    return torch.linalg.vector_norm(X, dtype=torch.float64, **dim)


class ExpertGroup:
    """The experts of one part of one packed parameter that this rank checks, as a batch.

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
        self.param, self.rows, self.names = param, rows, list(names)
        self.positions = [e - offset for e in experts]
        W = self.local()
        self.device = W.device
        self.trackers = [
            MatrixTracker(
                name,
                Anchor(W[i], settings=anchor, sketch=sketch, name=name),
                lock=lock,
            )
            for i, name in enumerate(self.names)
        ]
        self._stack_anchors(anchor)
        first = self.trackers[0]
        self.shape, self.k, self.exact = first.shape, first.k, first.exact
        self.max_power_steps, self.tolerance = first.max_power_steps, first.tolerance
        self.batch = max(1, BATCH_ELEMENTS // math.prod(self.shape))

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

    def _stack_anchors(self, settings: AnchorSettings) -> None:
        """Move the anchors' W0 copies, packed masks and thresholds a into stacked tensors (the
        anchors keep views of them), so a check reads them as one batch."""
        anchors = [t.anchor for t in self.trackers]
        W0 = anchors[0].W0
        pin = W0.device.type == "cpu" and self.device.type == "cuda"
        self.W0 = torch.empty((len(anchors), *W0.shape), dtype=W0.dtype, device=W0.device)
        masks = torch.stack([a.principal_packed for a in anchors])
        self.principal = masks.pin_memory() if pin else masks
        self.W0 = self.W0.pin_memory() if pin else self.W0
        for i, a in enumerate(anchors):
            self.W0[i].copy_(a.W0)
            a.W0, a.principal_packed = self.W0[i], self.principal[i]
        self.a = torch.stack([a.a for a in anchors]).to(self.device).view(-1, 1, 1)
        self.dtype = anchors[0].dtype

    def nbytes(self) -> int:
        """Bytes held for these experts' anchors (copies, masks, W0 bases)."""
        return sum(t.anchor.nbytes() for t in self.trackers)

    @torch.no_grad()
    def check(
        self, step: int, session: CheckSession, weight: bool = True
    ) -> list[MatrixCheck] | None:
        """One check of every expert of the group at `step`; None when it failed (recorded in
        `session`: nothing raises, bases and locks unchanged). The experts' states change only
        when the check is kept. `weight` False skips the W_t trackers (`MatrixTracker.check`)."""
        with highest_precision():
            result = session.local(lambda: self._check(int(step), session, weight))
        if not session.agree() or result is None:
            return None
        checks, states = result
        for tracker, state in zip(self.trackers, states, strict=True):
            tracker.V, tracker.V_w, tracker.lock, tracker.fresh = state
        return checks

    def _check(
        self, step: int, s: CheckSession, weight: bool = True
    ) -> tuple[list[MatrixCheck], list[tuple]]:
        s.seam("start")
        W = self.local()
        checks, states = [], []
        for b0 in range(0, W.shape[0], self.batch):
            b1 = min(b0 + self.batch, W.shape[0])
            c, st = self._check_batch(W[b0:b1], b0, step, weight)
            checks += c
            states += st
        s.seam("end")
        return checks, states

    def _check_batch(
        self, W: torch.Tensor, b0: int, step: int, with_weight: bool = True
    ) -> tuple[list, list]:
        """Experts b0.. of the group (W: their [B, m, n] weights): the tracker's check
        (client/tracker.py `_check`) with every product with ΔW or W_t batched."""
        trackers = self.trackers[b0 : b0 + W.shape[0]]
        W = W.to(self.device)
        D, stats = self._delta(W, b0)
        frob = stats[:, 0].tolist()
        counts = [[int(round(c)) for c in row] for row in stats[:, 1:].tolist()]
        moved = [f > 0 and math.isfinite(f) for f in frob]
        idx = [i for i, ok in enumerate(moved) if ok]
        A = D if len(idx) == len(moved) else D[torch.tensor(idx, device=D.device)]
        out: dict[int, tuple] = {}
        if idx:
            V = torch.stack([trackers[i].V for i in idx])
            rules = [trackers[i]._stopping_rule(frob[i], trackers[i].fresh) for i in idx]
            update = self._iterate(A, V, rules)
            for j, i in enumerate(idx):
                out[i] = update[j]
        locks = [t.lock.copy() for t in trackers]
        observations = []
        for i, lock in enumerate(locks):
            if i in out:
                _, theta, _, V_K, bound = out[i]
                energy = float(theta[: self.k].sum()) / frob[i]
                observations.append(lock.observe(step, V_K, energy, bound <= self.tolerance))
            else:
                observations.append(lock.observe(step, None, None, False))
        channel = self._channel_energy(D, locks)
        weights: dict[int, tuple] = {}
        if idx and with_weight:  # view(W_t) into ΔW's buffer (A is a copy or D itself)
            Wm = W[torch.tensor(idx, device=W.device)] if len(idx) < len(moved) else W
            for c in self._slices(len(idx)):
                A[c].copy_(Wm[c].to(self.dtype))
            V_w = torch.stack([trackers[i].V_w for i in idx])
            rules = [
                trackers[i]._stopping_rule(
                    None, False, trackers[i]._rotation_target(out[i][1], out[i][4], frob[i])
                )
                for i in idx
            ]
            weighted = self._iterate(A, V_w, rules)
            weights = {i: weighted[j] for j, i in enumerate(idx)}
        checks, states = [], []
        for i, t in enumerate(trackers):
            lock = locks[i]
            moved_i = i in out
            weight = weights[i][0] if i in weights else t.baseline() if with_weight else None
            checks.append(
                MatrixCheck(
                    matrix=t.name,
                    step=step,
                    shape=t.shape,
                    numel=t.shape[0] * t.shape[1],
                    frobenius_sq=frob[i],
                    visible_count=counts[i][0],
                    visible_low_count=counts[i][1],
                    visible_principal_count=counts[i][2],
                    channel_energy_sq=channel[i] if lock.locked else None,
                    update=out[i][0] if moved_i else None,
                    weight=weight,
                    lock_step=lock.lock_step,
                    locked_now=observations[i].locked_now,
                    v_ref=lock.v_ref.float().cpu() if observations[i].locked_now else None,
                )
            )
            V = out[i][2] if moved_i else t.V
            V_w = weights[i][2] if i in weights else t.V_w
            states.append((V, V_w, lock, t.fresh and not moved_i))
        return checks, states

    def _delta(self, W: torch.Tensor, b0: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW = f32(view(W_t)) − f32(view(W0)) ([B, m, n] float32) and, per expert, the exact
        statistics [‖ΔW‖_F², visible, visible ∩ M_low, visible ∩ M_princ] (float64, host), in
        slices of `_pass_experts` experts (the elementwise work of one pass)."""
        B, (m, n) = W.shape[0], self.shape
        D = torch.empty((B, m, n), dtype=torch.float32, device=self.device)
        stats = []
        for c in self._slices(B):
            W0 = self.W0[b0 + c.start : b0 + c.stop].to(self.device, non_blocking=True)
            Wv = W[c].to(self.dtype)
            Dc = D[c]
            Dc.copy_(Wv)
            Dc.sub_(W0)
            frob = per_matrix(_norm64, Dc).square()
            Wb = Wv if self.dtype == torch.bfloat16 else W[c].to(torch.bfloat16)
            W0b = W0 if W0.dtype == torch.bfloat16 else W0.to(torch.bfloat16)
            visible = Wb.view(torch.int16) != W0b.view(torch.int16)
            low = visible & (W0.abs() <= self.a[b0 + c.start : b0 + c.stop])
            packed = self.principal[b0 + c.start : b0 + c.stop].to(self.device, non_blocking=True)
            principal = visible & unpack_rows(packed, m * n).view(-1, m, n)
            counts = [per_matrix(torch.sum, x).double() for x in (visible, low, principal)]
            stats.append(torch.stack([frob, *counts], dim=1))
        return D, torch.cat(stats).cpu()

    def _slices(self, B: int) -> list[slice]:
        """Slices of a batch of B experts for the elementwise passes: the whole batch on an
        accelerator; on the CPU about `CHUNK_ELEMENTS` entries each (cache-sized temporaries,
        as the unbatched tracker's row chunks: one big pass over [B, m, n] ran 2x slower)."""
        step = B if self.device.type != "cpu" else max(1, CHUNK_ELEMENTS // math.prod(self.shape))
        return [slice(c, min(c + step, B)) for c in range(0, B, step)]

    def _iterate(
        self,
        A: torch.Tensor,
        V: torch.Tensor,
        rules: list[tuple[Callable[[Space], float], Callable[[Space, float], bool]]],
    ) -> list[tuple[Sketch, torch.Tensor, torch.Tensor, torch.Tensor, float]]:
        """The tracker's `_iterate` for each matrix of the batch A ([B, m, n]) from its basis
        V[b]: `subspace_iteration` over the batch on the block Krylov space, each matrix stopping
        by its own tracker's rule (`rules[b]`, `MatrixTracker._stopping_rule`: the error bound,
        and for the W_t trackers the rotation's), at most `max_power_steps`. Returns per matrix
        (the sketch, θ, the next basis, V_K (n × min(K, k')), the bound)."""
        if self.exact:  # min(m, n) <= r: one step, span(P) is exact, V is kept
            spaces = subspace_iteration(
                A, V, None, max_steps=1, tolerance=0.0, measure=lambda _: 0.0
            )
            return self._finish(spaces, exact=True)
        spaces = subspace_iteration(
            A,
            V,
            None,
            max_steps=self.max_power_steps,
            tolerance=self.tolerance,
            measure=lambda x: rules[x.member][0](x),
            krylov=True,
            done=lambda x, value: rules[x.member][1](x, value),
        )
        return self._finish(spaces, exact=False)

    def _finish(self, spaces: list[tuple[Space, float]], exact: bool) -> list[tuple]:
        """What the tracker makes of its last space (client/tracker.py `_iterate`), batched over
        the matrices that stopped after the same number of steps: the compressed sketch
        G_w = G·Z_r, C_w = Z_rᵀ·M·Z_r (`compress`), the next basis orth(G_w) and V_K = the
        normalised first K columns of G·Z (`ritz_vectors`). On the exact path the sketch is
        (G, C) itself and the basis V is kept."""
        r = spaces[0][0].V.shape[-1]
        out: list[Any] = [None] * len(spaces)
        for steps in sorted({x.steps for x, _ in spaces}):
            which = [b for b, (x, _) in enumerate(spaces) if x.steps == steps]
            xs = [spaces[b][0] for b in which]
            G = torch.stack([x.G for x in xs])
            Z = torch.stack([pad_columns(x.Z, r) for x in xs])
            V_K = ritz_vectors(G, Z, self.k).float()
            if not exact:
                G_w, C_w = compress(G, torch.stack([x.M for x in xs]), Z, r)
                V_next = orth(G_w)
            for j, (b, x) in enumerate(zip(which, xs, strict=True)):
                bound = spaces[b][1]
                if exact:
                    sketch, basis = _to_wire(x.G, x.C_s, 0.0, 1, True), x.V
                else:
                    sketch, basis = _to_wire(G_w[j], C_w[j], bound, steps, False), V_next[j]
                k = min(self.k, x.Z.shape[1])
                out[b] = (sketch, x.theta, basis, V_K[j, :, :k], bound)
        return out

    def _channel_energy(self, D: torch.Tensor, locks: list[LockState]) -> list[float]:
        """‖ΔW·V_ref‖_F² of each locked expert (0 for the others), one `bmm` over the batch."""
        if not any(lock.locked for lock in locks):
            return [0.0] * len(locks)
        K, n = self.k, self.shape[1]
        refs = torch.zeros((len(locks), n, K), dtype=torch.float32, device=self.device)
        for i, lock in enumerate(locks):
            if lock.locked:
                v = lock.v_ref.to(self.device, torch.float32)
                refs[i, :, : v.shape[1]] = v
        Q = torch.bmm(D, refs)
        return Q.double().square().sum(dim=(-2, -1)).tolist()

"""Same-shape matrices checked as one batched computation (DESIGN §3, docs/overhead.md).

A `MatrixGroup` checks B matrices of one shape, one view and one dtype as a [B, m, n] stack:
ΔW and the exact statistics in one pass (norms, bitwise bf16 counts, both masks per member), then
the client's one iteration, client/sketch.py `subspace_iteration`, with a batch dimension:
`bmm`-shaped power steps P = ΔW·V, G = ΔWᵀ·P, the block Krylov products of every member at once,
one batched eigendecomposition for every member's Rayleigh–Ritz, each member's own stopping rule
(its tracker's `StoppingRule`: the r×r error bound on the host, and the rotation's rule on W_t,
batched over the members, client/tracker.py `measure_rules`),
and, per group of members that stopped after the same number of steps, the compressed sketch, the
Ritz vectors V_K and the next basis batched again. A member keeps iterating only while its own
rule says so, so each member's `MatrixCheck` is the one its own `MatrixTracker` would produce
(tests/test_moe.py, tests/test_batch.py); the state (bases, lock) lives in one `MatrixTracker`
per member, so baselines, checkpoints and lock references work unchanged.

Where the stack comes from (`source`, called at each check): a packed 3-D parameter
(client/experts.py `ExpertGroup`: a [B, m, n] view of the experts) or a list of B [m, n] tensors
(the Monitor's dense matrices of one check slot, client/monitor.py: each a view of its
parameter, copied into the stack slice by slice as the pass converts it to the view's dtype).
At most `BATCH_ELEMENTS` entries of ΔW are formed at once; on the CPU the elementwise passes run in
slices of `CHUNK_ELEMENTS` entries (cache-sized, like the unbatched tracker's row chunks). The
members' anchors keep views into one stacked W0 copy and one stacked packed principal mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .collectives import CheckSession
from .lock import LockState
from .masks import CHUNK_ELEMENTS
from .records import MatrixCheck, Sketch
from .sketch import (
    Space,
    compress,
    highest_precision,
    orth,
    pad_columns,
    ritz_vectors,
    subspace_iteration,
)
from .tracker import MatrixTracker, StoppingRule, _to_wire, measure_rules

BATCH_ELEMENTS = 1 << 26  # entries of ΔW formed at once (256 MiB of float32)
# A group's stack: a [B, m, n] tensor, or B [m, n] tensors
Stack = torch.Tensor | Sequence[torch.Tensor]


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


class MatrixGroup:
    """B matrices of one shape, view and dtype checked as one batch (module docstring).

    `trackers` one `MatrixTracker` per member (whole matrices on this rank: no layout, no
    collective), `source()` the members' current weights as a [B, m, n] tensor or a list of B
    [m, n] tensors, in the trackers' order. The trackers' anchors are moved into stacked tensors
    (their W0 copies and packed masks become views of them)."""

    def __init__(self, trackers: list[MatrixTracker], source: Callable[[], Stack]) -> None:
        self.trackers = list(trackers)
        self.names = [t.name for t in self.trackers]
        self.source = source
        first = self.trackers[0]
        self.device = first.device
        self._stack_anchors()
        self.shape, self.k, self.exact = first.shape, first.k, first.exact
        self.max_power_steps, self.tolerance = first.max_power_steps, first.tolerance
        self.batch = max(1, BATCH_ELEMENTS // math.prod(self.shape))

    def _stack_anchors(self) -> None:
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
        """Bytes held for the members' anchors (copies, masks, W0 bases)."""
        return sum(t.anchor.nbytes() for t in self.trackers)

    @torch.no_grad()
    def check(
        self, step: int, session: CheckSession, weight: bool = True
    ) -> list[MatrixCheck] | None:
        """One check of every member of the group at `step`; None when it failed (recorded in
        `session`: nothing raises, bases and locks unchanged). The members' states change only
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
        W = self.source()
        checks, states = [], []
        for b0 in range(0, len(W), self.batch):
            b1 = min(b0 + self.batch, len(W))
            c, st = self._check_batch(W[b0:b1], b0, step, weight)
            checks += c
            states += st
        s.seam("end")
        return checks, states

    def _check_batch(
        self, W: Stack, b0: int, step: int, with_weight: bool = True
    ) -> tuple[list, list]:
        """Members b0.. of the group (W: their weights, a [B, m, n] stack): the tracker's check
        (client/tracker.py `_check`) with every product with ΔW or W_t batched."""
        trackers = self.trackers[b0 : b0 + len(W)]
        W = _on(W, self.device)
        D, stats = self._delta(W, b0)
        frob = stats[:, 0].tolist()
        counts = [[int(round(c)) for c in row] for row in stats[:, 1:].tolist()]
        moved = [f > 0 and math.isfinite(f) for f in frob]
        idx = [i for i, ok in enumerate(moved) if ok]
        A = D if len(idx) == len(moved) else D[torch.tensor(idx, dtype=torch.long, device=D.device)]
        out: dict[int, tuple] = {}
        if idx:
            V = torch.stack([trackers[i].V for i in idx])
            rules = [trackers[i].stopping_rule(frob[i], trackers[i].fresh) for i in idx]
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
            Wm = _take(W, idx) if len(idx) < len(moved) else W
            for c in self._slices(len(idx)):
                A[c].copy_(_stacked(Wm, c, self.dtype))
            V_w = torch.stack([trackers[i].V_w for i in idx])
            rules = [
                trackers[i].stopping_rule(
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

    def _delta(self, W: Stack, b0: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW = f32(view(W_t)) − f32(view(W0)) ([B, m, n] float32) and, per member, the exact
        statistics [‖ΔW‖_F², visible, visible ∩ M_low, visible ∩ M_princ] (float64, host), in
        the slices of `_slices` (the elementwise work of one pass)."""
        B, (m, n) = len(W), self.shape
        D = torch.empty((B, m, n), dtype=torch.float32, device=self.device)
        stats = []
        for c in self._slices(B):
            W0 = self.W0[b0 + c.start : b0 + c.stop].to(self.device, non_blocking=True)
            Wv = _stacked(W, c, self.dtype)
            Dc = D[c]
            Dc.copy_(Wv)
            Dc.sub_(W0.float())  # as the tracker's pass: float32 operands subtract faster
            frob = per_matrix(_norm64, Dc).square()
            Wb = Wv if self.dtype == torch.bfloat16 else _stacked(W, c, torch.bfloat16)
            W0b = W0 if W0.dtype == torch.bfloat16 else W0.to(torch.bfloat16)
            visible = Wb.view(torch.int16) != W0b.view(torch.int16)
            low = visible & (W0.abs() <= self.a[b0 + c.start : b0 + c.stop])
            packed = self.principal[b0 + c.start : b0 + c.stop].to(self.device, non_blocking=True)
            principal = visible & unpack_rows(packed, m * n).view(-1, m, n)
            counts = [
                per_matrix(torch.count_nonzero, x).double() for x in (visible, low, principal)
            ]
            stats.append(torch.stack([frob, *counts], dim=1))
        return D, torch.cat(stats).cpu()

    def _slices(self, B: int) -> list[slice]:
        """Slices of a batch of B members for the elementwise passes: the whole batch on an
        accelerator; on the CPU about `CHUNK_ELEMENTS` entries each (cache-sized temporaries,
        as the unbatched tracker's row chunks: one big pass over [B, m, n] ran 2x slower)."""
        step = B if self.device.type != "cpu" else max(1, CHUNK_ELEMENTS // math.prod(self.shape))
        return [slice(c, min(c + step, B)) for c in range(0, B, step)]

    def _iterate(
        self,
        A: torch.Tensor,
        V: torch.Tensor,
        rules: list[StoppingRule],
    ) -> list[tuple[Sketch, torch.Tensor, torch.Tensor, torch.Tensor, float]]:
        """The tracker's `_iterate` for each matrix of the batch A ([B, m, n]) from its basis
        V[b]: `subspace_iteration` over the batch on the block Krylov space, each matrix stopping
        by its own tracker's rule (`rules[b]`, `StoppingRule`: the error bound,
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
            measure_all=lambda xs: measure_rules(rules, xs),
            krylov=True,
            done=lambda x, value: rules[x.member].done(x, value),
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
            G64 = G if exact else torch.stack([x.G64 for x in xs])  # the Krylov path's float64 G
            V_K = ritz_vectors(G64, Z, self.k).float()
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
        """‖ΔW·V_ref‖_F² of each locked member (0 for the others), one `bmm` over the batch."""
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


def _on(W: Stack, device: torch.device) -> Stack:
    """The stack on `device` (no copy where it is already there)."""
    return W.to(device) if isinstance(W, torch.Tensor) else [w.to(device) for w in W]


def _take(W: Stack, idx: list[int]) -> Stack:
    """Members `idx` of the stack."""
    if isinstance(W, torch.Tensor):
        return W[torch.tensor(idx, dtype=torch.long, device=W.device)]
    return [W[i] for i in idx]


def _stacked(W: Stack, c: slice, dtype: torch.dtype) -> torch.Tensor:
    """Members c of the stack as one [b, m, n] tensor of `dtype` (a list: one copy per member
    into the slice, converting as it copies)."""
    if isinstance(W, torch.Tensor):
        return W[c].to(dtype)
    members = W[c]
    out = torch.empty((len(members), *members[0].shape), dtype=dtype, device=members[0].device)
    for o, w in zip(out, members, strict=True):
        o.copy_(w)
    return out

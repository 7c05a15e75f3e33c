"""One matrix's trackers: the warm-started subspace iteration on ΔW (stable rank, energy, the lock)
and on W_t (rotation and spectral shift against W0), plus the exact statistics of DESIGN §2.

A check (DESIGN §3):
  1. form ΔW = view(W_t) − view(W0) chunk by chunk (the anchor may live on the host) and, in the
     same pass, the exact statistics: ‖ΔW‖_F² (float64), the bitwise bf16-visible count and its
     intersections with M_low and M_princ; reduced over shards (one O(1) collective per group);
  2. ΔW = 0: no power step, V kept, `update=None`; else power steps P = ΔW·V, G = ΔWᵀ·P,
     C = PᵀP, V ← orth(G) until the convergence indicator ≤ tolerance or `max_power_steps`;
  3. Rayleigh–Ritz on the client too (r×r, cheap) for V_K and the top-K energy, fed to the lock
     rule (client/lock.py) — decided from G and C, which every rank holds, so identical on every
     rank; once locked, ‖ΔW·V_ref‖_F² exactly;
  4. the same power steps on view(W_t), warm-started from W0's top-(k+p) Ritz basis (on the
     checks `weight=True` names: `Monitor(weight_every=)`, client/schedule.py).
Matrices with min(m, n) ≤ r = K + p take the exact path: one power step, `exact=True`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import flat
from .adapters import AdapterUpdate, LowRank
from .anchor import Anchor, gaussian_basis, stable_seed
from .collectives import CheckSession, ShardSpec, all_reduce_sum
from .lock import LockState
from .records import MatrixCheck, Sketch
from .settings import AnchorSettings, LockSettings, SketchSettings
from .sketch import (
    DEFAULT_TOLERANCE,
    NO_BOUND,
    Space,
    compress,
    error_bound,
    generalized_eigh,
    highest_precision,
    orth,
    orthonormal_angles_degrees,
    rayleigh_ritz,
    ritz_subspace_sines,
    ritz_vectors,
    rotation_bound_degrees,
    rotation_within_accuracy,
    subspace_iteration,
)

# The W_t tracker takes another power step for the rotation only while its subspace bound shrinks
# at least this much per step (ritz_subspace_sine).
ROTATION_PROGRESS = 0.5


def _to_wire(G: torch.Tensor, C: torch.Tensor, conv: float, steps: int, exact: bool) -> Sketch:
    conv = min(float(conv), NO_BOUND)  # inf (no bound) travels as NO_BOUND: the wire is finite
    return Sketch(G.detach().float().cpu(), C.detach().float().cpu(), conv, steps, exact)


class StoppingRule:
    """`subspace_iteration`'s measure and done for one iteration of one tracker: the error bound
    (no residual bound from a `fresh` basis after one step) at or below the tolerance. With
    `rotation` (the W_t tracker, `MatrixTracker._rotation_target`: W0's reported top-k basis, the
    baseline's sine bound, λ_{k+1}⁺) the measure is also the sine bound of the top-k Ritz
    subspace, and the steps go on until the rotation it implies is within its stated accuracy,
    or while that bound still halves per step (`ROTATION_PROGRESS`), so a gap too small to
    certify the rotation within the budget costs one extra step at most. `measure_rules` measures
    many rules' spaces at once."""

    def __init__(
        self,
        k: int,
        tolerance: float,
        frobenius_sq: float | None,
        fresh: bool,
        rotation: tuple[torch.Tensor, float, float] | None = None,
    ) -> None:
        self.k, self.tolerance = k, tolerance
        self.frobenius_sq, self.fresh, self.rotation = frobenius_sq, fresh, rotation
        self.previous_sine, self.accurate, self.converged = math.inf, True, False

    def judge(self, x: Space, rotation: tuple[float, float] | None) -> float:
        """The measure of the space x: the error bound, and for a W_t rule the sine bound, given
        `rotation` = (that sine bound, the mean rotation against W0's basis it bounds)."""
        residual = not (self.fresh and x.steps == 1)
        bound = error_bound(
            x.theta, x.H, x.M, x.N, self.k, self.frobenius_sq, residual, pairs=x.pairs
        )
        self.converged = bound <= self.tolerance
        if self.rotation is None or rotation is None:
            return bound
        sine, mean_angle = rotation
        angle_bound = rotation_bound_degrees(sine, self.rotation[1])
        accurate = rotation_within_accuracy(mean_angle, angle_bound)
        halving = sine <= ROTATION_PROGRESS * self.previous_sine
        self.previous_sine, self.accurate = sine, accurate or not halving
        return max(bound, sine)

    def done(self, x: Space, value: float) -> bool:  # the ΔW bound, and the rotation's rule
        return self.converged and self.accurate


def measure_rules(rules: Sequence[StoppingRule], spaces: Sequence[Space]) -> list[float]:
    """Each space's measure by its rule (`rules[space.member]`), the W_t rules' rotation bounds
    batched over the spaces of one shape (`rotation_bounds`)."""
    wanted = [j for j, x in enumerate(spaces) if rules[x.member].rotation is not None]
    targets = [(rules[spaces[j].member].k, *rules[spaces[j].member].rotation) for j in wanted]
    found = dict(zip(wanted, rotation_bounds([spaces[j] for j in wanted], targets), strict=True))
    return [rules[x.member].judge(x, found.get(j)) for j, x in enumerate(spaces)]


def rotation_bounds(
    spaces: Sequence[Space], targets: Sequence[tuple[int, torch.Tensor, float, float]]
) -> list[tuple[float, float]]:
    """(sine bound, mean rotation) of each W_t space against its target (k, W0's reported top-k
    basis Q0k, the baseline's sine bound, λ_{k+1}⁺): the sine bound of W_t's reported top-k
    subspace V̂_k (`ritz_subspace_sines`) and the mean principal angle between V̂_k and Q0k,
    batched over the spaces of one shape and k."""
    out: list[tuple[float, float] | None] = [None] * len(spaces)
    pairs = [x.pairs if x.pairs is not None else generalized_eigh(x.M, x.N) for x in spaces]
    groups: dict[tuple, list[int]] = {}
    for j, x in enumerate(spaces):
        G = x.G64 if x.G64 is not None else x.G
        shapes = (tuple(G.shape), tuple(x.Z.shape), tuple(pairs[j][1].shape), len(x.X),
                  tuple(targets[j][1].shape))  # fmt: skip
        groups.setdefault((G.device, targets[j][0], *shapes), []).append(j)
    for members in groups.values():
        xs = [spaces[j] for j in members]
        k = targets[members[0]][0]
        Q0k = torch.stack([targets[j][1] for j in members])
        G = torch.stack([x.G64 if x.G64 is not None else x.G for x in xs]).double()
        X = torch.stack([torch.cat(x.X, dim=-1) for x in xs]).double()
        lam = torch.stack([pairs[j][0] for j in members])
        Y = torch.stack([pairs[j][1] for j in members])
        V_hat = ritz_vectors(G, torch.stack([x.Z for x in xs]), k)
        sines = ritz_subspace_sines(X, G, lam, Y, V_hat, k, [targets[j][3] for j in members])
        Qt = torch.linalg.qr(V_hat)[0]
        means = orthonormal_angles_degrees(Q0k, Qt.to(Q0k.device)).mean(-1).tolist()
        for j, (sine, _), mean in zip(members, sines, means, strict=True):
            out[j] = (sine, mean)
    return out  # type: ignore[return-value]  # every space is in a group


class MatrixTracker:
    """The per-matrix state of the client: anchor, ΔW and W_t bases, lock."""

    def __init__(
        self,
        name: str,
        anchor: Anchor,
        *,
        lock: LockSettings = LockSettings(),
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> None:
        sketch = anchor.sketch
        self.name = name
        self.shape = anchor.shape
        self.anchor = anchor
        self.k = sketch.channel_rank  # K: the reported directions
        self.r = sketch.r
        self.max_power_steps = sketch.max_power_steps
        self.spec = anchor.spec
        self.tolerance = tolerance
        self.device = anchor.device
        self.exact = min(self.shape) <= self.r
        if self.exact:
            self.V = anchor.V0.clone()
        else:
            seed = stable_seed(sketch.seed, name)
            self.V = gaussian_basis(self.shape[1], self.r, seed, self.device)
        self.fresh = not self.exact  # V is still the seeded Gaussian: no residual bound yet
        self.V_w = anchor.V0.clone()
        self.lock = LockState(self.k, lock, max_rank=min(self.shape))
        self._reported_w0: torch.Tensor | None = None  # `_reported_basis`, formed once

    @classmethod
    def attach(
        cls,
        name: str,
        W0_local: torch.Tensor,
        *,
        shape: tuple[int, int] | None = None,
        spec: ShardSpec | None = None,
        anchor: AnchorSettings = AnchorSettings(),
        sketch: SketchSettings = SketchSettings(),
        lock: LockSettings = LockSettings(),
    ) -> MatrixTracker:
        """Build the anchor from the current weight (this rank's block of a `shape` matrix laid
        out by `spec`) and the tracker on it."""
        built = Anchor(W0_local, shape=shape, spec=spec, settings=anchor, sketch=sketch, name=name)
        return cls(name, built, lock=lock)

    # -- public ---------------------------------------------------------------------------

    @property
    def lock_step(self) -> int | None:
        return self.lock.lock_step

    @property
    def v_ref(self) -> torch.Tensor | None:
        """The locked channel V_ref (n, K) on the compute device, or None before the lock."""
        return self.lock.v_ref

    def restore_lock(self, lock_step: int, v_ref: torch.Tensor) -> None:
        """Adopt a lock reference sent back by the sidecar after a restart."""
        self.lock.restore(lock_step, v_ref.to(self.device, torch.float32))

    def baseline(self) -> Sketch:
        """W0's own sketch for the W_t tracker (sent once per incarnation)."""
        a = self.anchor
        return _to_wire(a.baseline_G, a.baseline_C, a.baseline_convergence, 1, a.exact)

    @torch.no_grad()
    def check(
        self,
        W_t_local: torch.Tensor | AdapterUpdate | None,
        step: int,
        session: CheckSession | None = None,
        weight: bool = True,
    ) -> MatrixCheck | None:
        """One check of the current weight (the local shard) at training step `step`; or, for a
        base matrix with LoRA adapters, of its adapters' update (client/adapters.py). `weight`
        False skips the W_t tracker (`Monitor(weight_every=)`): the check carries no W_t sketch
        (its rotation keys are null) and V_w is kept.

        With a `session` (the Monitor's path, fault-isolated across ranks): nothing raises; every
        collective of the check is issued even after a local failure (W_t_local may then be
        None), and the result is None when any rank of the matrix failed. Without one, a failure
        raises, after the same collectives. Either way the tracker's bases and lock state change
        only when the check is kept."""
        s = session or CheckSession(self.spec, self.device, step=int(step))
        with highest_precision():
            try:
                check, state = self._check(W_t_local, int(step), s, weight)
            except Exception as exc:  # decided from reduced data: the same on every rank
                s.failure = s.failure or exc
                check = state = None
        if not s.agree():
            if session is None:
                raise s.failure or RuntimeError(f"{self.name}: another rank failed the check")
            return None
        self.V, self.V_w, self.lock, self.fresh = state
        return check

    @torch.no_grad()
    def update_block(self, W_t_local: torch.Tensor) -> torch.Tensor:
        """ΔW = view(W_t) − view(W0) of the local block (float32), by the check's own pass
        (`_delta`): what the live self-audit sends (client/audit.py)."""
        return self._delta(W_t_local)[1]

    # -- the check ------------------------------------------------------------------------

    def _check(
        self,
        W: torch.Tensor | AdapterUpdate | None,
        step: int,
        s: CheckSession,
        with_weight: bool = True,
    ) -> tuple[MatrixCheck | None, tuple[torch.Tensor, torch.Tensor, LockState, bool]]:
        """The check through session `s`: local work in `s.local` / `s.all_reduce`, every branch
        decided from reduced tensors (stats, G, C), so a failed rank takes the others' path.
        Returns the check (None on a failed rank) and the new (V, V_w, lock, fresh), not yet
        applied."""
        layout = self.spec or ShardSpec.whole(self.shape)
        groups = (layout.row_group, layout.col_group)
        s.seam("start")
        local = s.local(lambda: self._delta(W))  # (W on the device, ΔW, statistics)
        stats = s.all_reduce(lambda: local[2], (4,), groups, torch.float64)
        s.seam("after_stats")
        frobenius_sq = float(stats[0])
        counts = [int(round(float(c))) for c in stats[1:]]
        W, D, delta = (local[0], local[1], local[3]) if local is not None else (None, None, None)

        V, V_w, lock = self.V, self.V_w, self.lock.copy()
        update = V_K = energy = None
        converged = False
        # a non-finite weight (a diverged step) is reported as it is (the sidecar refuses it with a
        # clear error) without touching the bases, so the tracker recovers with the weights
        moved = frobenius_sq > 0 and math.isfinite(frobenius_sq)
        if moved:
            update, theta, Z, V, G, indicator = self._iterate(delta, V, layout, s, frobenius_sq)
            V_K = ritz_vectors(G, Z, self.k).float()
            energy = float(theta[: self.k].sum()) / frobenius_sq
            converged = indicator <= self.tolerance
        obs = lock.observe(step, V_K, energy, converged)
        channel = self._channel_energy(delta, lock.v_ref, layout, s) if lock.locked else None

        if not with_weight:  # not this check's turn for the W_t tracker: no sketch, V_w kept
            weight = None
        elif not moved:  # W_t == W0 in this view (or not finite): W0's sketch
            weight = s.local(self.baseline)
        else:
            # dense: view(W_t); adapters: D already holds view(W0 + ΔW)
            A = s.local(lambda: self._weight_view(W, D) if isinstance(W, torch.Tensor) else D)
            rotation = self._rotation_target(theta, indicator, frobenius_sq)
            weight, _, _, V_w, _, _ = self._iterate(
                A, V_w, layout, s, fresh=False, rotation=rotation
            )
        s.seam("end")
        check = s.local(
            lambda: MatrixCheck(
                matrix=self.name,
                step=step,
                shape=self.shape,
                numel=self.shape[0] * self.shape[1],
                frobenius_sq=frobenius_sq,
                visible_count=counts[0],
                visible_low_count=counts[1],
                visible_principal_count=counts[2],
                channel_energy_sq=channel,
                update=update,
                weight=weight,
                lock_step=lock.lock_step,
                locked_now=obs.locked_now,
                v_ref=lock.v_ref.float().cpu() if obs.locked_now else None,
            )
        )
        return check, (V, V_w, lock, self.fresh and not moved)

    def _delta(
        self, W: torch.Tensor | AdapterUpdate
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | LowRank]:
        """One chunked pass over the local block: D and the local statistics [‖ΔW‖_F², visible,
        visible ∩ M_low, visible ∩ M_princ] (float64). Dense: D = ΔW = view(W_t) − view(W0)
        (float32), the operator the power steps multiply with. Adapters (client/adapters.py): the
        operator is the factors' `LowRank` L·R, ‖ΔW‖_F² comes from their Gram products, and D holds
        view(W0 + ΔW), the merged weight, for the counts and the W_t tracker. Returns (W, D,
        statistics, the update operator)."""
        a = self.anchor
        if tuple(W.shape) != a.local_shape:
            raise ValueError(f"{self.name}: local shape {tuple(W.shape)} != {a.local_shape}")
        dense = isinstance(W, torch.Tensor)
        if dense:
            W = W.detach().to(self.device)
        D = torch.empty(a.local_shape, dtype=torch.float32, device=self.device)
        stats = torch.zeros(4, dtype=torch.float64, device=self.device)
        for rows, W0 in a.row_chunks():
            Wt = W[rows] if dense else W.merged_rows(rows).to(self.device)
            Wv = Wt.to(a.dtype)  # view(W_t): a bf16 copy in the default view
            Dr = D[rows]
            Dr.copy_(Wv)
            if dense:  # ΔW = f32(view(W_t)) − f32(view(W0)); a float32 W0 row chunk subtracts
                Dr.sub_(W0.float())  # ~1.5x faster than the mixed-dtype sub_ on the CPU
                stats[0] += torch.linalg.vector_norm(Dr, dtype=torch.float64).square()
            Wb = Wv if a.dtype == torch.bfloat16 else Wt.to(torch.bfloat16)
            W0b = W0 if W0.dtype == torch.bfloat16 else W0.to(torch.bfloat16)
            visible = Wb.view(torch.int16) != W0b.view(torch.int16)
            stats[1] += torch.count_nonzero(visible)  # ~6x faster than a boolean sum on the CPU
            stats[2] += torch.count_nonzero(visible & a.low_mask(W0))
            stats[3] += torch.count_nonzero(visible & a.principal_rows(rows))
        if dense:
            return W, D, stats, D
        stats[0] = W.frobenius_sq()
        return W, D, stats, W.operator()

    def _iterate(
        self,
        A: torch.Tensor | LowRank | None,
        V: torch.Tensor,
        layout: ShardSpec,
        s: CheckSession,
        frobenius_sq: float | None = None,
        fresh: bool | None = None,
        rotation: tuple[torch.Tensor, float, float] | None = None,
    ) -> tuple[Sketch | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Power steps from V, Rayleigh–Ritz on the block Krylov space of all of them, until the
        error bound ≤ tolerance (or the budget). Returns the sketch of the top-r Ritz directions
        (on the CPU; None on a failed rank), the Ritz pairs (θ, Z) of the space, the next basis
        orth(G_w), the space's G = [G_1 … G_s] on the device (float64 on the Krylov path;
        V_K = ritz_vectors(G, Z, k)) and the bound. `fresh` (default: the ΔW basis is still the
        seeded Gaussian) withholds the residual bound after one step. Every quantity the loop
        decides on comes from G and V, identical on every rank (a failed rank's zeros included).
        With `rotation` (the W_t tracker, `_rotation_target`) the bound is also the sine bound of
        the top-k Ritz subspace, and the steps go on until the rotation it implies is within its
        stated accuracy."""
        if self.exact:  # one step spans the whole space: the sketch is exact
            x, _ = subspace_iteration(
                A, V, layout, s, max_steps=1, tolerance=0.0, measure=lambda _: 0.0
            )
            sketch = s.local(lambda: _to_wire(x.G, x.C_s, 0.0, 1, True))
            return sketch, x.theta, x.Z, V, x.G, 0.0
        fresh = self.fresh if fresh is None else fresh
        rule = self.stopping_rule(frobenius_sq, fresh, rotation)
        x, bound = subspace_iteration(
            A,
            V,
            layout,
            s,
            max_steps=self.max_power_steps,
            tolerance=self.tolerance,
            measure=lambda x: measure_rules([rule], [x])[0],
            krylov=True,
            done=rule.done,
        )
        G_w, C_w = compress(x.G, x.M, x.Z, self.r)
        sketch = s.local(lambda: _to_wire(G_w, C_w, bound, x.steps, False))
        return sketch, x.theta, x.Z, orth(G_w), x.G64, bound

    def stopping_rule(
        self,
        frobenius_sq: float | None,
        fresh: bool,
        rotation: tuple[torch.Tensor, float, float] | None = None,
    ) -> StoppingRule:
        """The stopping rule of one iteration of this tracker (`StoppingRule`)."""
        return StoppingRule(self.k, self.tolerance, frobenius_sq, fresh, rotation)

    def _rotation_target(
        self, theta: torch.Tensor, indicator: float, frobenius_sq: float
    ) -> tuple[torch.Tensor, float, float]:
        """What the W_t tracker's rotation bound needs: an orthonormal basis of W0's reported top-k
        Ritz vectors V̂0 (the sidecar's baseline, `_reported_basis`), the baseline's sine bound,
        and λ_{k+1}⁺ of W_tᵀW_t by Weyl's inequality σ_{k+1}(W_t) ≤ σ_{k+1}(W0) + σ1(ΔW), with
        σ1(ΔW)² ≤ min(‖ΔW‖_F², θ_1·(1 + bound)) (the ΔW tracker's own bound)."""
        a = self.anchor
        s1_sq = float(frobenius_sq)
        if theta.numel() and math.isfinite(indicator):
            s1_sq = min(s1_sq, float(theta[0]) * (1.0 + indicator))
        upper = (math.sqrt(max(a.next_eigenvalue_upper, 0.0)) + math.sqrt(s1_sq)) ** 2
        return self._reported_basis(), a.baseline_convergence, upper

    def _reported_basis(self) -> torch.Tensor:
        """An orthonormal basis (float64, QR) of V̂0, W0's reported top-k Ritz vectors (the
        sidecar's Rayleigh–Ritz on the baseline): fixed for the anchor, formed once."""
        if self._reported_w0 is None:
            a = self.anchor
            _, Z0 = rayleigh_ritz(a.baseline_G, a.baseline_C)
            V0k = ritz_vectors(a.baseline_G, Z0, self.k)
            self._reported_w0 = torch.linalg.qr(V0k)[0]
        return self._reported_w0

    def _channel_energy(
        self, D: torch.Tensor | None, v_ref: torch.Tensor, layout: ShardSpec, s: CheckSession
    ) -> float:
        """‖ΔW·V_ref‖_F²: Q = ΔW_local·V_ref[cols] summed over the column group, then Σ Q² over
        the local rows summed over the row group. O(m·K) collectives."""
        v_ref = v_ref.to(self.device, torch.float32)
        if isinstance(layout, flat.FlatSpec):
            return flat.channel_energy(D, v_ref, layout, s)
        shape = (layout.local_shape[0], v_ref.shape[1])
        Q = s.all_reduce(
            lambda: D @ v_ref[layout.cols],
            shape,
            (layout.col_group,),
        )
        energy = Q.double().square().sum().reshape(1)
        return float(all_reduce_sum(energy, layout.row_group)[0])

    def _weight_view(self, W: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        """view(W_t) as float32 on the device, reusing ΔW's buffer unless W is already it."""
        if W.dtype == torch.float32 and self.anchor.dtype == torch.float32:
            return W
        for rows, _ in self.anchor.row_chunks():
            D[rows] = W[rows].to(self.anchor.dtype).float()
        return D

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain tensors and ints: the bases and the lock state (the anchor is rebuilt from the
        original weights, `anchor_checkpoint`)."""
        state = {
            "V": self.V.detach().cpu(),
            "V_w": self.V_w.detach().cpu(),
            "fresh": int(self.fresh),
        }
        state.update({f"lock.{k}": v for k, v in self.lock.state_dict().items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.V = state["V"].to(self.device, torch.float32)
        self.V_w = state["V_w"].to(self.device, torch.float32)
        self.fresh = bool(state.get("fresh", 0))  # older states hold a basis that has seen ΔW
        lock = {k[len("lock.") :]: v for k, v in state.items() if k.startswith("lock.")}
        self.lock.load_state_dict(lock, self.device)

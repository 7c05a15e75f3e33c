"""The rank-K bottleneck: once a matrix is locked, project its gradient onto the locked channel.

    g ← g · V_ref · V_refᵀ        (g: m×n gradient, V_ref: n×K orthonormal, the locked channel)

This is the causal test of "On the Geometry of On-Policy Distillation" as a product feature:
constrain training to the early rank-K channel and see whether the task still learns.
`Monitor(..., enforce_channel=True)` builds a `ChannelProjection` over its matrices; the
projection of a matrix starts with the first gradient after the check that locked it. The lock is
decided on the client from data every rank holds (client/lock.py), so every rank starts projecting
at the same step with the same V_ref.

Where it applies (two ways, both idempotent, since P = V·Vᵀ is a projector, P² = P):

* `install(model)`: a post-accumulate-grad hook on each monitored parameter (single process).
* `attach(optimizer)`: an optimizer step pre-hook, run on the final gradient just before the
  update. This is the one to use with DDP (whose all-reduce writes param.grad after the autograd
  hooks) and FSDP2 (which assigns the sharded gradient outside autograd). Attaching removes the
  parameter hooks.

What it does not do: with Adam(W) the *update* is not confined exactly to the channel. Adam divides
each coordinate by its own √v̂ (a diagonal, not a rotation, so it does not commute with P), its
moments carry gradient from before the lock, and decoupled weight decay shrinks every coordinate.
The paper projects the gradient too; `channel_energy_ratio` reports how much of ΔW actually sits
in the channel. Gradient clipping that runs before the optimizer step sees the unprojected norm.

Sharded gradients (DTensor, FSDP2 / tensor parallel): right-multiplication acts on each row on its
own, so rows split over ranks need nothing; with columns split, Q = g_local · V_ref[cols] (m_local×K)
is all-reduced over the column group before g_local ← Q · V_ref[cols]ᵀ. O(m·K) per matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .collectives import PLAIN, CheckSession, FaultPlan, Reductions, ShardSpec
from .transport import ErrorLog


def project_gradient(
    grad: torch.Tensor | None,
    v_ref: torch.Tensor,
    spec: ShardSpec | None = None,
    reductions: Reductions = PLAIN,
    dtype: torch.dtype | None = None,
) -> torch.Tensor | None:
    """g · V_ref · V_refᵀ for the local block g of an (m, n) gradient and the full (n, K) V_ref.

    With `spec` whose columns are split, Q = g · V_ref[cols] is summed over `spec.col_group` before
    multiplying by V_ref[cols]ᵀ, so every rank's block of the result equals the block of the
    unsharded projection. Computed in float32 (float64 when g is float64) and returned in g's dtype.
    Cost 4·m·n·K flops. Through a `CheckSession` (`reductions`), g is None after a local failure
    (Q's shape is then declared from `spec`, its gradient dtype from `dtype`) and so is the result.
    """
    dtype = grad.dtype if grad is not None else dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    cols = slice(None) if spec is None else spec.cols
    m_local = grad.shape[0] if spec is None else spec.local_shape[0]
    group = None if spec is None else spec.col_group
    V = reductions.local(lambda: v_ref[cols].to(grad.device, compute))
    Q = reductions.all_reduce(  # (m_local, K)
        lambda: grad.to(compute) @ V, (m_local, v_ref.shape[1]), (group,), compute
    )
    return reductions.local(lambda: (Q @ V.T).to(grad.dtype))


class ChannelProjection:
    """Projects the gradient of every locked matrix onto its channel before the optimizer step.

    `matrices` maps a matrix name to the Monitor's record of it, read duck-typed: `.tracker`
    (with `.v_ref`, None before the lock), `.param` (the parameter), `.rows` (the global row range
    of a fused part, or None) and `.placement.spec` (a ShardSpec or None). Matrices whose tracker
    is None (computed on another rank) are skipped: with replicated weights each rank projects
    only what it tracks, so use it with sharded or single-process models, or track every matrix.
    """

    def __init__(
        self,
        matrices: Mapping[str, Any],
        errors: Callable[..., None] | None = None,
        faults: FaultPlan | None = None,
    ) -> None:
        self.matrices = {k: m for k, m in matrices.items() if getattr(m, "tracker", None)}
        self._handles: list[Any] = []
        self._v_cache: dict[str, tuple[int, torch.Tensor]] = {}
        self.projected_total = 0  # matrix gradients projected so far
        self.dropped_total = 0  # projections left out on every rank after a failure
        self.rounds = 0  # optimizer step pre-hook calls (the fault seam's step)
        self.errors = errors or ErrorLog()
        self.faults = faults

    def _parts_by_param(self) -> dict[int, tuple[torch.Tensor, list[Any]]]:
        by_param: dict[int, tuple[torch.Tensor, list[Any]]] = {}
        for m in self.matrices.values():
            by_param.setdefault(id(m.param), (m.param, []))[1].append(m)
        return by_param

    def install(self) -> ChannelProjection:
        """Register a post-accumulate-grad hook on each monitored parameter (single process)."""
        self.remove()
        for param, parts in self._parts_by_param().values():

            def hook(p: torch.Tensor, parts: list[Any] = parts) -> None:
                self._project_parts(p, parts)

            self._handles.append(param.register_post_accumulate_grad_hook(hook))
        return self

    def attach(self, optimizer: torch.optim.Optimizer) -> ChannelProjection:
        """Project in an optimizer step pre-hook instead (DDP, FSDP2); removes parameter hooks."""
        self.remove()
        groups = list(self._parts_by_param().values())

        def pre_hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.rounds += 1
            for param, parts in groups:
                self._project_parts(param, parts)

        self._handles.append(optimizer.register_step_pre_hook(pre_hook))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def locked_matrices(self) -> list[str]:
        """Names of the matrices whose gradient is projected now."""
        return [k for k, m in self.matrices.items() if m.tracker.v_ref is not None]

    @torch.no_grad()
    def _project_parts(self, param: torch.Tensor, parts: list[Any]) -> None:
        if param.grad is None:
            return
        for m in parts:
            if m.tracker.v_ref is not None:
                self._project(param, m)

    def _project(self, param: torch.Tensor, m: Any) -> None:
        """Project one matrix's gradient, fault-isolated like a check (client/collectives.py
        `CheckSession`): the projection is computed aside, the ranks holding the matrix agree, and
        it is written only when none failed; otherwise every rank leaves the gradient as it is
        (counted in `dropped_total`, logged once per kind). Never raises."""
        spec, device = m.placement.spec, param.device
        s = CheckSession(spec, device, step=self.rounds, faults=self.faults)
        g = s.local(lambda: _local_grad(param, m.rows))
        if g is not None and g.numel() == 0 and spec is None:
            return
        s.seam("project")
        v = s.local(lambda: self._device_v(m.name, m.tracker.v_ref, device))
        projected = project_gradient(g, m.tracker.v_ref if v is None else v, spec, s, param.dtype)
        if s.agree() and s.local(lambda: g.copy_(projected)) is not None:
            self.projected_total += 1
            return
        self.dropped_total += 1
        if s.failure is not None:
            kind = f"projection_failed_{type(s.failure).__name__}"
            self.errors(kind, "projecting the gradient of %s failed here: %r", m.name, s.failure)
        self.errors(
            "projection_dropped",
            "left the gradient of %s unprojected at optimizer step %d on every rank holding it "
            "(%d failed)",
            m.name,
            self.rounds,
            s.failed_ranks,
        )

    def _device_v(self, name: str, v_ref: torch.Tensor, device: torch.device) -> torch.Tensor:
        """V_ref on the gradient's device, copied once per lock."""
        cached = self._v_cache.get(name)
        if cached is None or cached[0] != id(v_ref) or cached[1].device != device:
            cached = (id(v_ref), v_ref.to(device=device, dtype=torch.float32))
            self._v_cache[name] = cached
        return cached[1]


def _local_grad(param: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    """This rank's block of param.grad (a view), restricted to a fused part's rows."""
    from . import sharding

    grad = param.grad
    if rows is None and not sharding.is_dtensor(grad):
        return grad
    return sharding.local_block(grad, rows)

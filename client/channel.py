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

from collections.abc import Mapping
from typing import Any

import torch

from .collectives import ShardSpec, all_reduce_sum


def project_gradient(
    grad: torch.Tensor, v_ref: torch.Tensor, spec: ShardSpec | None = None
) -> torch.Tensor:
    """g · V_ref · V_refᵀ for the local block g of an (m, n) gradient and the full (n, K) V_ref.

    With `spec` whose columns are split, Q = g · V_ref[cols] is summed over `spec.col_group` before
    multiplying by V_ref[cols]ᵀ, so every rank's block of the result equals the block of the
    unsharded projection. Computed in float32 (float64 when g is float64) and returned in g's dtype.
    Cost 4·m·n·K flops.
    """
    compute = torch.float64 if grad.dtype == torch.float64 else torch.float32
    V = v_ref.to(device=grad.device, dtype=compute)
    if spec is not None:
        V = V[spec.cols]
    Q = grad.to(compute) @ V  # (m_local, K)
    if spec is not None:
        all_reduce_sum(Q, spec.col_group)
    return (Q @ V.T).to(grad.dtype)


class ChannelProjection:
    """Projects the gradient of every locked matrix onto its channel before the optimizer step.

    `matrices` maps a matrix name to the Monitor's record of it, read duck-typed: `.tracker`
    (with `.v_ref`, None before the lock), `.param` (the parameter), `.rows` (the global row range
    of a fused part, or None) and `.placement.spec` (a ShardSpec or None). Matrices whose tracker
    is None (computed on another rank) are skipped: with replicated weights each rank projects
    only what it tracks, so use it with sharded or single-process models, or track every matrix.
    """

    def __init__(self, matrices: Mapping[str, Any]) -> None:
        self.matrices = {k: m for k, m in matrices.items() if getattr(m, "tracker", None)}
        self._handles: list[Any] = []
        self._v_cache: dict[str, tuple[int, torch.Tensor]] = {}
        self.projected_total = 0  # matrix gradients projected so far

    def _parts_by_param(self) -> dict[int, tuple[torch.Tensor, list[Any]]]:
        by_param: dict[int, tuple[torch.Tensor, list[Any]]] = {}
        for m in self.matrices.values():
            by_param.setdefault(id(m.param), (m.param, []))[1].append(m)
        return by_param

    def install(self, model: torch.nn.Module | None = None) -> ChannelProjection:
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
            v_ref = m.tracker.v_ref
            if v_ref is None:
                continue
            g = _local_grad(param, m.rows)
            if g.numel() == 0 and m.placement.spec is None:
                continue
            g.copy_(project_gradient(g, self._device_v(m.name, v_ref, g.device), m.placement.spec))
            self.projected_total += 1

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

"""The records that cross the wire: what a check produces (`Sketch`, `MatrixCheck`) and what a
hello declares (`ManifestEntry`). Plain frozen dataclasses with no behaviour, shared by the client's
compute modules, the wire codec and the sidecar, so neither side imports the other's machinery.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A manifest entry's shard_layout (client/sharding.py): how the matrix is split over ranks;
# "expert": an expert of a parameter sharded over experts, whole on its owner rank (client/experts.py).
SHARD_LAYOUTS = ("replicated", "rows", "cols", "rows+cols", "flat", "expert")


@dataclass(frozen=True)
class Sketch:  # one tracked subspace iteration's output
    G: torch.Tensor  # (n, r) float32: AᵀA·Y for the tracked matrix A (ΔW or W_t)
    C: torch.Tensor  # (r, r) float32: PᵀP, P = A·Y (Y: the check's top-r Krylov Ritz basis)
    # the error bound (client/sketch.py error_bound): never below the relative error of σ1 ≈ √θ_1
    # and of the stable rank ‖A‖_F²/θ_1; for W_t and W0 (weight, baseline) also never below the
    # sine bound of the top-K Ritz subspace (ritz_subspace_sine); 0.0 on the exact path
    convergence: float
    power_steps: int
    exact: bool  # min(m, n) <= r: Rayleigh–Ritz on span(P) is exact


@dataclass(frozen=True)
class MatrixCheck:
    matrix: str
    step: int
    shape: tuple[int, int]  # global (m, n)
    numel: int
    frobenius_sq: float  # ‖ΔW‖_F², accumulated in float64, reduced over shards
    visible_count: int  # #{bf16(W_t) != bf16(W0)} bitwise
    visible_low_count: int  # |M_vis ∩ M_low|
    visible_principal_count: int  # |M_vis ∩ M_princ|
    channel_energy_sq: float | None  # ‖ΔW·V_ref‖_F² once locked, else None
    update: Sketch | None  # ΔW tracker; None when ΔW == 0 (‖ΔW‖_F == 0)
    weight: Sketch | None  # W_t tracker (rotation, spectral shift); None: not run this check
    lock_step: int | None  # the client's lock decision (identical on every rank)
    locked_now: bool  # True on the check that locked
    v_ref: torch.Tensor | None  # (n, K) float32, sent on the check that locked (locked_now)


@dataclass(frozen=True)
class ManifestEntry:
    """One monitored matrix as a hello declares it."""

    matrix: str
    shape: tuple[int, int]
    numel: int
    dtype: str
    layer: int | None
    module: str
    shard_layout: str  # one of SHARD_LAYOUTS
    owner_rank: int
    expert: int | None = None  # the expert index of a mixture-of-experts matrix, else None


@dataclass(frozen=True)
class AuditPiece:
    """One rank's block of a matrix's update ΔW at a check (the live self-audit, docs/audit.md):
    ΔW[row_offset : row_offset + h, col_offset : col_offset + w], as the tracker forms it."""

    matrix: str
    step: int
    row_offset: int
    col_offset: int
    delta: torch.Tensor  # (h, w) float32

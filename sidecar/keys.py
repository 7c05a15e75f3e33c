"""The diagnostics' names, in one place: the §2 key, its Prometheus metric and its type.

The same word is used in the formula table, the JSON key, the metric and the dashboard panel.
Everything that exports or displays a diagnostic reads this table; nothing spells a metric name
by hand.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Binding:
    key: str
    metric: str
    help: str
    kind: str = "gauge"


# Per-matrix keys of DESIGN §2, in display order.
MATRIX_KEYS: tuple[str, ...] = (
    "frobenius_norm",
    "spectral_norm",
    "stable_rank",
    "topk_energy_ratio",
    "horizon_alignment",
    "subspace_alignment",
    "channel_energy_ratio",
    "locked",
    "lock_step",
    "bf16_visible_ratio",
    "low_magnitude_overlap",
    "principal_overlap",
    "rotation_max_degrees",
    "rotation_mean_degrees",
    "spectral_shift_topk",
    "convergence",
)

BINDINGS: tuple[Binding, ...] = (
    Binding(
        "stable_rank",
        "deltawatch_update_stable_rank",
        "Stable rank ||dW||_F^2 / sigma_1(dW)^2 of the cumulative update.",
    ),
    Binding(
        "frobenius_norm",
        "deltawatch_update_frobenius_norm",
        "Frobenius norm of the cumulative update dW = W_t - W0 (exact).",
    ),
    Binding(
        "spectral_norm",
        "deltawatch_update_spectral_norm",
        "Largest singular value of the cumulative update (tracked).",
    ),
    Binding(
        "topk_energy_ratio",
        "deltawatch_update_topk_energy_ratio",
        "Share of ||dW||_F^2 in the top-K singular directions.",
    ),
    Binding(
        "horizon_alignment",
        "deltawatch_subspace_horizon_alignment_ratio",
        "Sim_K between the update subspace now and at about half the steps so far.",
    ),
    Binding(
        "subspace_alignment",
        "deltawatch_subspace_alignment_ratio",
        "Sim_K between the update subspace now and the locked reference.",
    ),
    Binding(
        "channel_energy_ratio",
        "deltawatch_channel_energy_ratio",
        "Share of ||dW||_F^2 inside the locked channel (exact).",
    ),
    Binding(
        "locked",
        "deltawatch_subspace_locked",
        "1 when the matrix has locked its reference subspace.",
    ),
    Binding(
        "lock_step",
        "deltawatch_subspace_lock_step",
        "Training step at which the reference subspace was locked.",
    ),
    Binding(
        "bf16_visible_ratio",
        "deltawatch_bf16_visible_ratio",
        "Share of weights whose bf16 value differs from the anchor's.",
    ),
    Binding(
        "low_magnitude_overlap",
        "deltawatch_visible_low_magnitude_overlap_ratio",
        "Share of bf16-visible updates inside the low-magnitude mask of W0.",
    ),
    Binding(
        "principal_overlap",
        "deltawatch_visible_principal_overlap_ratio",
        "Share of bf16-visible updates inside the principal mask of W0.",
    ),
    Binding(
        "rotation_max_degrees",
        "deltawatch_rotation_max_degrees",
        "Largest principal angle between the top-k right singular subspaces of W0 and W_t.",
    ),
    Binding(
        "rotation_mean_degrees",
        "deltawatch_rotation_mean_degrees",
        "Mean principal angle between the top-k right singular subspaces of W0 and W_t.",
    ),
    Binding(
        "spectral_shift_topk",
        "deltawatch_spectral_shift_topk_ratio",
        "Relative shift of the top-k singular values of W_t against W0.",
    ),
    Binding("step", "deltawatch_last_step", "Last training step reported."),
)

# Exported beside bf16_visible_ratio: the counts behind it.
VISIBLE_PARAMETERS_METRIC = "deltawatch_bf16_visible_parameters"
MATRIX_PARAMETERS_METRIC = "deltawatch_matrix_parameters"

BINDING_BY_KEY: dict[str, Binding] = {b.key: b for b in BINDINGS}

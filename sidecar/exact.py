"""The exact float64 reference of every DESIGN §2 key from (W0, W_t), by full SVDs.

Product code: the audit tier of `deltawatch replay --exact` and the tests' reference. Everything
is computed from the weights alone except what depends on the run's history:
  * `horizon_alignment` needs `horizon_V`, V_K at the horizon check h(t) (n×K);
  * `subspace_alignment` and `channel_energy_ratio` need `v_ref`, the locked V_ref (n×K);
  * `locked` / `lock_step` are the lock rule's decision over the whole run (client/lock.py) and
    are returned as None here.
Without those inputs the keys are None. `convergence` is 0.0 (nothing is estimated).
"""

from __future__ import annotations

import math

import torch
from deltawatch.client.masks import mask_count
from deltawatch.client.sketch import principal_angles_degrees, sim_k

from .keys import MATRIX_KEYS


def view_of(W: torch.Tensor, view: str) -> torch.Tensor:
    """The weight as the view keeps it: bf16 in "bf16", the tensor's own dtype in "native"."""
    if view not in ("bf16", "native"):
        raise ValueError(f"view must be 'bf16' or 'native', got {view!r}")
    return W.detach().to(torch.bfloat16) if view == "bf16" else W.detach()


def truncation(W: torch.Tensor, rank: int) -> torch.Tensor:
    """[W]_R = U_R Σ_R V_Rᵀ, the rank-R SVD reconstruction (float64); W itself when
    R ≥ min(m, n)."""
    if rank >= min(W.shape):
        return W.double()
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    R = min(rank, S.numel())
    return (U[:, :R] * S[:R]) @ Vh[:R]


def exact_thresholds(W0_view: torch.Tensor, alpha: float, mask_rank: int) -> dict:
    """a, b and the masks of DESIGN §2 by sorting: a = the ⌈α·mn⌉-th smallest |W0|,
    M_low = {|W0| ≤ a}; b = the ⌈α·mn⌉-th largest |[W0]_R|, M_princ = {|[W0]_R| ≥ b}."""
    magnitude = W0_view.double().abs()
    c = mask_count(alpha, magnitude.numel())
    a = torch.sort(magnitude.reshape(-1)).values[c - 1]
    principal = truncation(W0_view, mask_rank).abs()
    b = torch.sort(principal.reshape(-1), descending=True).values[c - 1]
    return {
        "a": float(a),
        "b": float(b),
        "low": magnitude.le(a),
        "principal": principal.ge(b),
        "truncation": principal,
    }


def visible_mask(W0: torch.Tensor, Wt: torch.Tensor) -> torch.Tensor:
    """M_vis = {bf16(W_t) ≠ bf16(W0)}, bitwise."""
    a = W0.detach().to(torch.bfloat16).view(torch.int16)
    b = Wt.detach().to(torch.bfloat16).view(torch.int16)
    return a != b


def right_vectors(W: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ, V_k) of W in float64 by a full SVD."""
    _, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return S, Vh[:k].T


def exact_anchor(
    W0: torch.Tensor,
    *,
    view: str = "bf16",
    alpha: float = 0.5,
    mask_rank: int = 64,
    k_rotation: int = 16,
) -> dict:
    """Everything the reference needs from W0 alone (thresholds, masks, σ and V_k of W0), so a
    trajectory's checks can share it: pass it to `exact_keys(..., anchor=...)`."""
    W0v = view_of(W0, view)
    S0, V0 = right_vectors(W0v, k_rotation)
    return {
        "W0": W0,
        "settings": (view, alpha, mask_rank, k_rotation),
        "masks": exact_thresholds(W0v, alpha, mask_rank),
        "sigma": S0,
        "V": V0,
    }


def exact_keys(
    W0: torch.Tensor,
    Wt: torch.Tensor,
    *,
    view: str = "bf16",
    rank: int = 16,
    alpha: float = 0.5,
    mask_rank: int = 64,
    k_rotation: int = 16,
    v_ref: torch.Tensor | None = None,
    horizon_V: torch.Tensor | None = None,
    anchor: dict | None = None,
) -> dict[str, float | bool | int | None]:
    """Every §2 key in float64 (see the module docstring for the history-dependent ones).
    `anchor`: the W0 part precomputed by `exact_anchor` with the same settings."""
    if anchor is None:
        anchor = exact_anchor(
            W0, view=view, alpha=alpha, mask_rank=mask_rank, k_rotation=k_rotation
        )
    if anchor["W0"] is not W0 or anchor["settings"] != (view, alpha, mask_rank, k_rotation):
        raise ValueError("exact_keys: the anchor was computed for another W0 or other settings")
    W0v, Wtv = view_of(W0, view), view_of(Wt, view)
    D = Wtv.double() - W0v.double()
    keys: dict[str, float | bool | int | None] = dict.fromkeys(MATRIX_KEYS)
    frob_sq = float(D.square().sum())
    keys["frobenius_norm"] = math.sqrt(frob_sq)
    keys["convergence"] = 0.0
    if frob_sq > 0:
        S, V_K = right_vectors(D, rank)
        s1 = float(S[0])
        keys["spectral_norm"] = s1
        keys["stable_rank"] = frob_sq / (s1 * s1)
        keys["topk_energy_ratio"] = float(S[:rank].square().sum()) / frob_sq
        k_sim = min(rank, *D.shape)  # a matrix with fewer than K directions: Sim over them
        if horizon_V is not None:
            keys["horizon_alignment"] = sim_k(V_K, horizon_V, k_sim)
        if v_ref is not None:
            keys["subspace_alignment"] = sim_k(V_K, v_ref, k_sim)
            keys["channel_energy_ratio"] = float((D @ v_ref.double()).square().sum()) / frob_sq
    else:
        keys["spectral_norm"] = 0.0
    vis = visible_mask(W0, Wt)
    masks = anchor["masks"]
    n_vis = int(vis.sum())
    keys["bf16_visible_ratio"] = n_vis / vis.numel()
    if n_vis:
        keys["low_magnitude_overlap"] = int((vis & masks["low"]).sum()) / n_vis
        keys["principal_overlap"] = int((vis & masks["principal"]).sum()) / n_vis
    S0, V0 = anchor["sigma"], anchor["V"]
    St, Vt = right_vectors(Wtv, k_rotation)
    angles = principal_angles_degrees(V0, Vt)
    keys["rotation_max_degrees"] = float(angles.max())
    keys["rotation_mean_degrees"] = float(angles.mean())
    k = min(k_rotation, S0.numel())
    keys["spectral_shift_topk"] = float(
        torch.linalg.vector_norm(St[:k] - S0[:k]) / torch.linalg.vector_norm(S0[:k])
    )
    return keys


def exact_counts(
    W0: torch.Tensor,
    Wt: torch.Tensor,
    *,
    view: str = "bf16",
    alpha: float = 0.5,
    mask_rank: int = 64,
) -> dict[str, int]:
    """The exact counts behind the ratios: visible, visible∩low, visible∩principal."""
    vis = visible_mask(W0, Wt)
    masks = exact_thresholds(view_of(W0, view), alpha, mask_rank)
    return {
        "visible": int(vis.sum()),
        "visible_low": int((vis & masks["low"]).sum()),
        "visible_principal": int((vis & masks["principal"]).sum()),
    }

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
from deltawatch.client.settings import VIEWS, AnchorSettings, SketchSettings
from deltawatch.client.sketch import principal_angles_degrees, sim_k

from .keys import MATRIX_KEYS

_ANCHOR, _SKETCH = AnchorSettings(), SketchSettings()  # the client's defaults are the reference's


def view_of(W: torch.Tensor, view: str) -> torch.Tensor:
    """The weight as the view keeps it: bf16 in "bf16", the tensor's own dtype in "native"."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    return W.detach().to(torch.bfloat16) if view == "bf16" else W.detach()


def truncation(W: torch.Tensor, R: int, svd: tuple | None = None) -> torch.Tensor:
    """[W]_R = U_R Σ_R V_Rᵀ, the rank-R SVD reconstruction (float64); W itself when
    R ≥ min(m, n). `svd`: W's (U, S, Vᴴ) in float64 when already computed."""
    if min(W.shape) <= R:
        return W.double()
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False) if svd is None else svd
    R = min(R, S.numel())
    return (U[:, :R] * S[:R]) @ Vh[:R]


def exact_thresholds(
    W0_view: torch.Tensor, alpha: float, mask_rank: int, svd: tuple | None = None
) -> dict:
    """a, b and the masks of DESIGN §2 by sorting: a = the ⌈α·mn⌉-th smallest |W0|,
    M_low = {|W0| ≤ a}; b = the ⌈α·mn⌉-th largest |[W0]_R|, M_princ = {|[W0]_R| ≥ b}."""
    magnitude = W0_view.double().abs()
    c = mask_count(alpha, magnitude.numel())
    a = torch.sort(magnitude.reshape(-1)).values[c - 1]
    principal = truncation(W0_view, mask_rank, svd).abs()
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


def spectrum_keys(S: torch.Tensor, frob_sq: float, channel_rank: int) -> dict[str, float]:
    """σ1, the stable rank ‖ΔW‖_F²/σ1² and the top-K energy Σ_{i≤K}σ_i²/‖ΔW‖_F² from ΔW's singular
    values S (descending) and ‖ΔW‖_F² > 0."""
    s1 = float(S[0])
    return {
        "spectral_norm": s1,
        "stable_rank": frob_sq / (s1 * s1),
        "topk_energy_ratio": float(S[:channel_rank].square().sum()) / frob_sq,
    }


def exact_anchor(
    W0: torch.Tensor,
    *,
    view: str = _ANCHOR.view,
    alpha: float = _ANCHOR.alpha,
    mask_rank: int = _ANCHOR.mask_rank,
    k_rotation: int = _SKETCH.channel_rank,
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
    view: str = _ANCHOR.view,
    channel_rank: int = _SKETCH.channel_rank,
    alpha: float = _ANCHOR.alpha,
    mask_rank: int = _ANCHOR.mask_rank,
    k_rotation: int = _SKETCH.channel_rank,
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
        S, V_K = right_vectors(D, channel_rank)
        keys.update(spectrum_keys(S, frob_sq, channel_rank))
        k_sim = min(channel_rank, *D.shape)  # a matrix with fewer than K directions: Sim over them
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
    view: str = _ANCHOR.view,
    alpha: float = _ANCHOR.alpha,
    mask_rank: int = _ANCHOR.mask_rank,
) -> dict[str, int]:
    """The exact counts behind the ratios: visible, visible∩low, visible∩principal."""
    vis = visible_mask(W0, Wt)
    masks = exact_thresholds(view_of(W0, view), alpha, mask_rank)
    return {
        "visible": int(vis.sum()),
        "visible_low": int((vis & masks["low"]).sum()),
        "visible_principal": int((vis & masks["principal"]).sum()),
    }


# -- the audit tier of `deltawatch replay --exact` (docs/replay.md) -------------------------------

AUDIT_ROTATION_RANK = 512  # the paper's k for principal angles (min(512, min(m, n)))
PAPER_FRACTION = 0.1  # p of the paper's code: k = ⌊p·min(m, n)⌋ for the left rotation, projection
AUDIT_KEYS: tuple[str, ...] = (
    "frobenius_norm",
    "spectral_norm",
    "stable_rank",
    "topk_energy_ratio",
    "bf16_visible_ratio",
    "low_magnitude_overlap",
    "principal_overlap",
    "rotation_mean_degrees",
    "rotation_max_degrees",
    "rotation_k512_mean_degrees",
    "rotation_k512_max_degrees",
    "rotation_left_mean_sine",
    "spectral_shift_topk",
    "spectral_shift",
    "final_alignment",
    "principal_projection_energy_ratio",
)


def paper_rank(shape: tuple[int, int], fraction: float = PAPER_FRACTION) -> int:
    """k = max(1, ⌊p·min(m, n)⌋), the subspace size of the paper's code."""
    return max(1, int(fraction * min(shape)))


def mean_sine(Ua: torch.Tensor, Ub: torch.Tensor) -> float:
    """Mean of sin θ_i over the principal angles between span(Ua) and span(Ub) (orthonormal,
    same width): the singular values of (I − Ua Uaᵀ) Ub, accurate for small angles too."""
    return float(torch.linalg.svdvals(Ub - Ua @ (Ua.T @ Ub)).clamp(0, 1).mean())


def audit_anchor(
    W0: torch.Tensor,
    *,
    view: str = _ANCHOR.view,
    alpha: float = _ANCHOR.alpha,
    mask_rank: int = _ANCHOR.mask_rank,
    fraction: float = PAPER_FRACTION,
) -> dict:
    """W0's part of the audit: the view in float64, its full SVD and the masks of §2."""
    W0v = view_of(W0, view)
    U0, S0, V0h = torch.linalg.svd(W0v.double(), full_matrices=False)
    return {
        "W0": W0,
        "view": view,
        "W0v": W0v.double(),
        "U": U0,
        "sigma": S0,
        "V": V0h.T,
        "masks": exact_thresholds(W0v, alpha, mask_rank, (U0, S0, V0h)),
        "k_paper": paper_rank(tuple(W0.shape), fraction),
    }


def audit_keys(
    anchor: dict,
    Wt: torch.Tensor,
    *,
    channel_rank: int = _SKETCH.channel_rank,
    k_rotation: int = _SKETCH.channel_rank,
) -> tuple[dict[str, float | None], torch.Tensor | None]:
    """The audit block of one matrix at one checkpoint, and V_K of ΔW (for `final_alignment`,
    filled in by `final_alignments` once the last checkpoint is known). Two full float64 SVDs,
    of ΔW and of view(W_t): O(m·n·min(m, n)) each.

      frobenius_norm, spectral_norm, stable_rank, topk_energy_ratio: from σ(ΔW), ΔW = view(W_t) −
        view(W0) in float64;
      bf16_visible_ratio, low_magnitude_overlap, principal_overlap: §2's counts, by sorting;
      rotation_{mean,max}_degrees: principal angles between the top-k right singular subspaces of
        view(W0) and view(W_t), k = `k_rotation`; rotation_k512_*: the same at k = min(512, min(m, n));
      rotation_left_mean_sine: mean sin θ between the top-k *left* singular subspaces,
        k = ⌊p·min(m, n)⌋ (the paper's code's definition);
      spectral_shift_topk: ‖σ_{1..k}(W_t) − σ_{1..k}(W0)‖₂ / ‖σ_{1..k}(W0)‖₂, k = `k_rotation`;
      spectral_shift: the same over the full spectrum (the paper's NSS);
      principal_projection_energy_ratio: ‖U_kᵀ ΔW V_k‖_F² / ‖ΔW‖_F², U_k, V_k the top-k left and
        right singular vectors of view(W0), k = ⌊p·min(m, n)⌋."""
    W0v = anchor["W0v"]
    Wtv = view_of(Wt, anchor["view"]).double().to(W0v.device)
    D = Wtv - W0v
    keys: dict[str, float | None] = dict.fromkeys(AUDIT_KEYS)
    frob_sq = float(D.square().sum())
    keys["frobenius_norm"] = math.sqrt(frob_sq)
    keys["spectral_norm"] = 0.0
    V_K = None
    k_paper = anchor["k_paper"]
    U0, S0, V0 = anchor["U"], anchor["sigma"], anchor["V"]
    if frob_sq > 0:
        _, S, Vh = torch.linalg.svd(D, full_matrices=False)
        V_K = Vh[: min(channel_rank, S.numel())].T
        keys.update(spectrum_keys(S, frob_sq, channel_rank))
        P = U0[:, :k_paper].T @ D @ V0[:, :k_paper]
        keys["principal_projection_energy_ratio"] = float(P.square().sum()) / frob_sq
    vis = visible_mask(anchor["W0"], Wt.to(anchor["W0"].device))
    n_vis = int(vis.sum())
    keys["bf16_visible_ratio"] = n_vis / vis.numel()
    if n_vis:
        masks = anchor["masks"]
        keys["low_magnitude_overlap"] = int((vis & masks["low"]).sum()) / n_vis
        keys["principal_overlap"] = int((vis & masks["principal"]).sum()) / n_vis
    Ut, St, Vth = torch.linalg.svd(Wtv, full_matrices=False)
    Vt = Vth.T
    for prefix, k in (("rotation_", k_rotation), ("rotation_k512_", AUDIT_ROTATION_RANK)):
        k = min(k, S0.numel())
        if k == V0.shape[0]:  # both subspaces are the whole input space: nothing rotates
            keys[prefix + "mean_degrees"] = keys[prefix + "max_degrees"] = 0.0
            continue
        angles = principal_angles_degrees(V0[:, :k], Vt[:, :k])
        keys[prefix + "mean_degrees"] = float(angles.mean())
        keys[prefix + "max_degrees"] = float(angles.max())
    keys["rotation_left_mean_sine"] = mean_sine(U0[:, :k_paper], Ut[:, :k_paper])
    k = min(k_rotation, S0.numel())
    norm = torch.linalg.vector_norm
    keys["spectral_shift_topk"] = float(norm(St[:k] - S0[:k]) / norm(S0[:k]))
    keys["spectral_shift"] = float(norm(St - S0) / norm(S0))
    return keys, V_K


def final_alignments(
    blocks: list[dict], V_Ks: list[torch.Tensor | None], channel_rank: int
) -> None:
    """final_alignment = Sim_K(V_K(t), V_K(end)) for each checkpoint of one matrix, in place
    (null where ΔW = 0 at t or at the end)."""
    V_end = V_Ks[-1]
    for block, V_K in zip(blocks, V_Ks, strict=True):
        if V_K is not None and V_end is not None:
            block["final_alignment"] = sim_k(V_K, V_end, min(channel_rank, V_K.shape[1]))

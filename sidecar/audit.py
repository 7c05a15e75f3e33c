"""The live self-audit's arithmetic (DESIGN §2 audit tier, issue 12 item 5): a matrix's full ΔW,
assembled from the blocks its ranks sent, gives exact float64 keys to hold the live estimates of
the same (matrix, step) against.

Only the keys that need ΔW alone are audited (`AUDITED_KEYS`): ‖ΔW‖_F, σ1, the stable rank and the
top-K energy. The rotation and the spectral shift need W0 and W_t (the sidecar never has the
weights), the alignments need V_K of earlier checks, the counts need W0's bits and masks.

Each key's error is reported as a ratio to its stated bound (`STATED_BOUNDS`): 1 is the bound, so
an audit error ratio above 1 is a live estimate outside its stated accuracy (the `audit_error`
rule). The ΔW travels in bf16 (2·m·n bytes): in the bf16 view ΔW = bf16(W_t) − bf16(W0) is exact in
bf16 wherever the two values are within a factor 2 of each other (Sterbenz), i.e. everywhere but
at sign changes and entries that more than doubled; in the native view the reference carries
bf16 rounding (≤ 2⁻⁹ relative per entry).
"""

from __future__ import annotations

import math

import torch
from deltawatch.client.sketch import DEFAULT_TOLERANCE

from .exact import right_vectors

AUDITED_KEYS = ("frobenius_norm", "spectral_norm", "stable_rank", "topk_energy_ratio")
# key -> ("relative" | "absolute", the stated bound): ‖ΔW‖_F is an exact statistic (issue 2's
# 1e-4); σ1 and the stable rank are reported only when their bound ≤ the tolerance; the top-K
# energy's accuracy is the measured one of docs/geometry.md (issue 2's 0.02).
STATED_BOUNDS = {
    "frobenius_norm": ("relative", 1e-4),
    "spectral_norm": ("relative", DEFAULT_TOLERANCE),
    "stable_rank": ("relative", DEFAULT_TOLERANCE),
    "topk_energy_ratio": ("absolute", 0.02),
}


class AuditError(ValueError):
    """A block that does not fit the matrix (names the field, what came, what was expected)."""


def assemble(
    shape: tuple[int, int], blocks: list[tuple[int, int, torch.Tensor]]
) -> torch.Tensor | None:
    """ΔW (float64, m×n) from (row offset, column offset, block) pieces, or None while some entry
    is not yet covered. A piece outside the matrix or overlapping another is refused."""
    m, n = shape
    D = torch.zeros((m, n), dtype=torch.float64)
    covered = torch.zeros((m, n), dtype=torch.bool)
    for row, col, block in blocks:
        if block.ndim != 2:
            raise AuditError(f"audit block: tensor has shape {list(block.shape)}, expected 2-D")
        h, w = block.shape
        if row < 0 or col < 0 or row + h > m or col + w > n:
            raise AuditError(
                f"audit block: rows {row}:{row + h}, cols {col}:{col + w} lie outside the "
                f"matrix of shape [{m}, {n}]"
            )
        if covered[row : row + h, col : col + w].any():
            raise AuditError(
                f"audit block: rows {row}:{row + h}, cols {col}:{col + w} overlap a block "
                f"already received"
            )
        D[row : row + h, col : col + w] = block.double()
        covered[row : row + h, col : col + w] = True
    return D if bool(covered.all()) else None


def exact_update_keys(D: torch.Tensor, rank: int) -> dict[str, float | None]:
    """The audited keys of ΔW by a float64 full SVD: ‖ΔW‖_F, σ1, ‖ΔW‖_F²/σ1², Σ_{i≤K}σ_i²/‖ΔW‖_F²
    (None where DESIGN §2 says null: ΔW = 0)."""
    frob_sq = float(D.double().square().sum())
    keys: dict[str, float | None] = dict.fromkeys(AUDITED_KEYS)
    keys["frobenius_norm"] = math.sqrt(frob_sq)
    if frob_sq == 0:
        keys["spectral_norm"] = 0.0
        return keys
    S, _ = right_vectors(D, rank)
    s1 = float(S[0])
    keys["spectral_norm"] = s1
    keys["stable_rank"] = frob_sq / (s1 * s1)
    keys["topk_energy_ratio"] = float(S[:rank].square().sum()) / frob_sq
    return keys


def error_ratios(live: dict, exact: dict) -> dict[str, float]:
    """|live − exact| / stated bound per audited key (relative keys: over |exact|); keys null on
    either side are left out."""
    out = {}
    for key in AUDITED_KEYS:
        value, ref = live.get(key), exact.get(key)
        if value is None or ref is None:
            continue
        kind, bound = STATED_BOUNDS[key]
        error = abs(float(value) - ref)
        if kind == "relative":
            if ref == 0:
                continue
            error /= abs(ref)
        out[key] = error / bound
    return out

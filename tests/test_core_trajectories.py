"""The synthetic trajectories the core's accuracy tests run (other areas may import them).

W0 (m×n): a pretrained-like decaying spectrum, W0 = U·diag(s)·Vᵀ with Haar U, V and
s_i = 2.9·i^(−1/2) (entries ≈ 0.02 rms, like a trained projection). One increment per step:

* OPD-like: a FIXED rank-16 channel, ΔW_step = 2e-2·U_c·(diag(c) + 0.1·N)·V_cᵀ with c linearly
  from 1 to 0.4 and N a fresh 16×16 standard Gaussian, plus faint dense noise 2e-5·N(0, 1) per entry.
* SFT-like: dense independent increments, 2e-4·N(0, 1) per entry (a random walk: flat spectrum).
* RLVR-like: increments 6e-4·N(0, 1) on a FIXED sparse support (5% of the entries, Bernoulli).

Generated in float64 and cast to the parameter dtype at each step (fp32 or bf16), so the bf16 view
sees exactly what a bf16 checkpoint would hold.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

KINDS = ("opd", "sft", "rlvr")


def pretrained_like(
    m: int, n: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """W0 = U·diag(2.9·i^(−1/2))·Vᵀ."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    s = 2.9 * torch.arange(1, k + 1, dtype=torch.float64) ** -0.5
    return ((U * s) @ V.T).to(dtype)


def trajectory(
    kind: str, W0: torch.Tensor, steps: int, seed: int = 0
) -> Iterator[tuple[int, torch.Tensor]]:
    """(step, W_t) for steps 1..steps, W_t in W0's dtype."""
    m, n = W0.shape
    g = torch.Generator().manual_seed(seed + 1)
    f64 = torch.float64
    W = W0.double().clone()
    if kind == "opd":
        Uc = torch.linalg.qr(torch.randn(m, 16, generator=g, dtype=f64))[0]
        Vc = torch.linalg.qr(torch.randn(n, 16, generator=g, dtype=f64))[0]
        c = torch.diag(torch.linspace(1.0, 0.4, 16, dtype=f64))
    elif kind == "rlvr":
        support = torch.rand(m, n, generator=g) < 0.05
    elif kind != "sft":
        raise ValueError(kind)
    for t in range(1, steps + 1):
        if kind == "opd":
            X = c + 0.1 * torch.randn(16, 16, generator=g, dtype=f64)
            inc = 2e-2 * Uc @ X @ Vc.T + 2e-5 * torch.randn(m, n, generator=g, dtype=f64)
        elif kind == "sft":
            inc = 2e-4 * torch.randn(m, n, generator=g, dtype=f64)
        else:
            inc = 6e-4 * torch.randn(m, n, generator=g, dtype=f64) * support
        W = W + inc
        yield t, W.to(W0.dtype)


def test_pretrained_like_has_a_decaying_spectrum() -> None:
    W0 = pretrained_like(64, 128)
    s = torch.linalg.svdvals(W0.double())
    expected = 2.9 * torch.arange(1, 65, dtype=torch.float64) ** -0.5
    assert torch.allclose(s, expected, rtol=1e-5)


def test_opd_update_is_a_fixed_low_rank_channel_sft_is_flat() -> None:
    W0 = pretrained_like(64, 128)
    for kind, low, high in (("opd", 0.99, 1.01), ("sft", 0.0, 0.7), ("rlvr", 0.0, 0.7)):
        *_, (_, W) = trajectory(kind, W0, 5)
        s = torch.linalg.svdvals(W.double() - W0.double())
        energy = float(s[:16].square().sum() / s.square().sum())
        assert low <= energy <= high, (kind, energy)

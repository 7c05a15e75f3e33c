"""Synthetic weight trajectories shared by the benchmarks: an anchor W0 with a pretrained-like
decaying spectrum and three update laws that look like on-policy distillation, SFT and RLVR.

The laws are those of the core's accuracy tests (tests/test_core_trajectories.py), written out
again here so bench/ does not depend on tests/, and normalised for size: the tests' constants are
for 256×512, and here every matrix gets the same entry scale as that one (so the bf16-visible
fraction, which depends on entry sizes, does not drift with the shape). With
ρ = √(m·n / (256·512)):

W0 (m×n), `pretrained_like`: W0 = U·diag(s)·Vᵀ with Haar U (m×k), V (n×k), k = min(m, n),
    s_i = σ·i^(−1/2),  σ = 2.9·√(H_256 / H_k)·ρ  (H_k = Σ_{i≤k} 1/i),
so the entry RMS is ≈ 0.02 at every shape, as in the tests at 256×512 (where σ = 2.9).

One increment per step, W_t = W_{t−1} + I_t (fp32 master weights):

* "opd" (a FIXED rank-16 channel plus faint dense noise):
      I_t = 2e-2·ρ·U_c·(diag(c) + 0.1·N_t)·V_cᵀ + 2e-5·N'_t,
  U_c (m×16), V_c (n×16) fixed Haar, c linear from 1 to 0.4, N_t a fresh 16×16 Gaussian,
  N'_t a fresh m×n Gaussian;
* "sft" (dense independent increments, a random walk with a flat spectrum): I_t = 2e-4·N_t;
* "rlvr" (increments on a FIXED sparse support): I_t = 6e-4·S ⊙ N_t, S a fixed Bernoulli(0.05)
  mask.

Differences from the tests, for speed at 4096×12288: drawn in float32 on the target device with a
seeded torch.Generator there (the tests draw float64 on the CPU), so the numbers differ from the
tests' and between CPU and CUDA, while the laws are the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

KINDS = ("opd", "sft", "rlvr")
REFERENCE_NUMEL = 256 * 512  # the tests' shape, whose entry scale every shape keeps
SPECTRUM_SCALE = 2.9
CHANNEL_RANK = 16
OPD_STEP = 2e-2
OPD_WOBBLE = 0.1
OPD_NOISE = 2e-5
SFT_STEP = 2e-4
RLVR_STEP = 6e-4
RLVR_DENSITY = 0.05


def generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A seeded generator on the device the tensors are drawn on."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def _haar(rows: int, cols: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """rows×cols with orthonormal columns: the Q of a Gaussian's QR."""
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, device=device))[0]


def _harmonic(k: int) -> float:
    return math.fsum(1.0 / i for i in range(1, k + 1))


def size_factor(m: int, n: int) -> float:
    """ρ = √(m·n / (256·512))."""
    return math.sqrt(m * n / REFERENCE_NUMEL)


def pretrained_like(
    m: int, n: int, *, seed: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """W0 = U·diag(σ·i^(−1/2))·Vᵀ, σ = 2.9·√(H_256/H_k)·ρ (module docstring), float32."""
    device = torch.device(device)
    g = generator(seed, device)
    k = min(m, n)
    sigma = SPECTRUM_SCALE * math.sqrt(_harmonic(256) / _harmonic(k)) * size_factor(m, n)
    s = sigma * torch.arange(1, k + 1, dtype=torch.float32, device=device) ** -0.5
    U = _haar(m, k, g, device)
    V = _haar(n, k, g, device)
    return (U * s) @ V.T


def trajectory(kind: str, W0: torch.Tensor, *, steps: int, seed: int = 1) -> Iterator[torch.Tensor]:
    """Yield W_1, …, W_steps (fp32, on W0's device) for one law of the module docstring.

    The same buffer is updated in place and yielded every step: copy it to keep a W_t."""
    if kind not in KINDS:
        raise ValueError(f"trajectory kind must be one of {KINDS}, got {kind!r}")
    m, n = W0.shape
    device = W0.device
    g = generator(seed, device)
    W = W0.detach().float().clone()
    if kind == "opd":
        k = min(CHANNEL_RANK, m, n)
        U_c = _haar(m, k, g, device) * (OPD_STEP * size_factor(m, n))
        V_c = _haar(n, k, g, device)
        c = torch.diag(torch.linspace(1.0, 0.4, k, device=device))
    elif kind == "rlvr":
        support = torch.rand(m, n, generator=g, device=device) < RLVR_DENSITY
    for _ in range(steps):
        noise = torch.randn(m, n, generator=g, device=device)
        if kind == "opd":
            X = c + OPD_WOBBLE * torch.randn(k, k, generator=g, device=device)
            W.add_(noise, alpha=OPD_NOISE)
            W.addmm_(U_c @ X, V_c.T)
        elif kind == "sft":
            W.add_(noise, alpha=SFT_STEP)
        else:
            W.add_(noise.mul_(support), alpha=RLVR_STEP)
        yield W

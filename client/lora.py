"""The update of a PEFT LoRA adapter: ΔW = Σ_adapters scaling · B · A (DESIGN §2, Adapters).

`scaling` = lora_alpha / r, or lora_alpha / √r with rsLoRA (Kalajdzievski 2023); A is [r, in],
B is [out, r]; with `fan_in_fan_out` (GPT-2's Conv1D keeps weights as [in, out]) the update is
transposed into the weight's layout. Pure functions on tensors, shared by whoever needs the math
(the offline replay of adapter checkpoints reads the factors from `adapter_model.safetensors`).
"""

from __future__ import annotations

import math

import torch


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """scaling = α / r (LoRA), α / √r (rsLoRA)."""
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    return float(lora_alpha) / (math.sqrt(r) if use_rslora else r)


def lora_update(
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    *,
    fan_in_fan_out: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """ΔW = scaling · B · A in `dtype` ([out, in]; [in, out] when `fan_in_fan_out`)."""
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"LoRA factors must be B [out, r] and A [r, in]; got B {list(B.shape)}, "
            f"A {list(A.shape)}"
        )
    D = (B.to(dtype) @ A.to(dtype)).mul_(scaling)
    return D.T.contiguous() if fan_in_fan_out else D

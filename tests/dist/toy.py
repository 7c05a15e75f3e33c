"""Shared by the torchrun scripts and the single-process reference: a toy transformer-shaped model
with uneven and empty shards, a deterministic weight trajectory, and a collective counter.

The trajectory is fixed in advance (OPD-like: a rank-3 channel growing with the step plus faint
dense noise, on weights with a decaying spectrum), so a sharded run and a single-process run see
bit-identical float32 weights at every step: `apply_step` writes W0 + ΔW_t into each rank's block.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

# (m, n) per monitored matrix; chosen so FSDP2's torch.chunk split is uneven (97 rows -> 49/48),
# a fused QKV puts whole parts on one rank and splits another, the 1-row gate leaves rank 1 with
# an empty block, and Shard(1) of down_proj (97 columns) is uneven too.
D, F = 64, 97


class Attention(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        if fused:
            self.qkv_proj = nn.Linear(D, 96, bias=False)  # [q; k; v], 32 rows each
        else:
            self.q_proj = nn.Linear(D, F, bias=False)


class MLP(nn.Module):
    def __init__(self, gate: bool) -> None:
        super().__init__()
        self.down_proj = nn.Linear(F, D, bias=False)
        if gate:
            self.gate = nn.Linear(D, 1, bias=False)


class Block(nn.Module):
    def __init__(self, i: int) -> None:
        super().__init__()
        self.self_attn = Attention(fused=i == 1)
        self.mlp = MLP(gate=i == 0)
        self.input_layernorm = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Σ over the block's linear layers of ‖lin(x[:, :in])‖²: a loss touching every weight,
        for the runs that take a real optimizer step (FSDP1 and ZeRO-3 gather a unit's weights
        around its forward)."""
        total = x.new_zeros(())
        for module in self.modules():
            if isinstance(module, nn.Linear):
                total = total + module(x[:, : module.in_features]).square().sum()
        return total


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(0), Block(1)])


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Inner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(block(x) for block in self.model.layers)


FUSED = {r"self_attn\.qkv_proj": ["q_proj", "k_proj", "v_proj"]}


def initial_weights() -> dict[str, torch.Tensor]:
    """W0 for every 2-D weight: U·diag(s)·Vᵀ with s_i = 0.05·(i+1)^-0.7 (pretrained-like)."""
    out = {}
    toy = Toy()
    for k, (name, p) in enumerate(toy.named_parameters()):
        if p.dim() != 2:
            continue
        m, n = p.shape
        g = torch.Generator().manual_seed(1000 + k)
        U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        q = min(m, n)
        s = 0.05 * (torch.arange(q, dtype=torch.float64) + 1) ** -0.7
        out[name] = (U[:, :q] * s) @ V[:, :q].T
    return {k: v.float() for k, v in out.items()}


def update(name: str, shape: tuple[int, int], step: int) -> torch.Tensor:
    """ΔW_t (float64, full matrix): step·η·(rank-3 channel) + Σ_{s≤t} faint dense noise."""
    m, n = shape
    k = sum(map(ord, name))
    g = torch.Generator().manual_seed(k)
    A = torch.randn(m, 3, generator=g, dtype=torch.float64)
    B = torch.randn(3, n, generator=g, dtype=torch.float64)
    D_t = step * 2e-3 * (A @ B) / (m * n) ** 0.25
    for s in range(1, step + 1):
        gs = torch.Generator().manual_seed(k * 7919 + s)
        D_t += 2e-4 * torch.randn(m, n, generator=gs, dtype=torch.float64)
    return D_t


def weights_at(step: int, W0: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W_t = float32(W0 + ΔW_t) for every weight (the same bits on every rank)."""
    return {k: (W.double() + update(k, tuple(W.shape), step)).float() for k, W in W0.items()}


class CollectiveCounter:
    """Counts the elements each torch.distributed collective moves, by wrapping the real calls
    (the real collective still runs). `calls` is a list of (name, numel)."""

    NAMES = (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "reduce_scatter_tensor",
        "broadcast",
        "all_to_all_single",
        "reduce",
        "gather",
        "scatter",
    )

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self._orig = {}
        self.active = False

    def install(self) -> None:
        for name in self.NAMES:
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrapped(*args, _orig=orig, _name=name, **kwargs):
                if self.active:
                    t = args[0] if args else next(iter(kwargs.values()))
                    numel = sum(x.numel() for x in t) if isinstance(t, list) else t.numel()
                    if _name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
                        numel = max(numel, args[1].numel() if len(args) > 1 else 0)
                    self.calls.append((_name, int(numel)))
                return _orig(*args, **kwargs)

            setattr(dist, name, wrapped)

    def uninstall(self) -> None:
        for name, orig in self._orig.items():
            setattr(dist, name, orig)
        self._orig = {}

"""The tiny mixture-of-experts model and its training, shared by tests/test_moe.py and
tests/dist/run_moe.py (single process and FSDP2 train the same steps on the same tokens).

`tiny_qwen3_moe`: a randomly initialised `transformers` Qwen3MoeForCausalLM (2 blocks, hidden 64,
8 experts of 48×64 gate/up and 64×48 down, top-2 routing; nothing downloaded). `starve`: layer
0's router is rewritten so that expert `STARVED` never receives a token (rows 0/1 and 2/3 are
negatives of each other, so two logits are always positive while the starved expert's row is 0)
and frozen, so it stays that way; with Adam (no weight decay) the starved expert's weights never
move.
"""

from __future__ import annotations

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

STARVED = 7  # the expert of layer 0 that no token reaches
EXPERTS = 8
LAYERS = 2
STEPS = 3
MONITOR = {"every": 1}  # the default K = 16, p = 16 (r = 32 < 48: the tracked path)


def tiny_qwen3_moe() -> Qwen3MoeForCausalLM:
    """Seed torch first for identical weights in every process."""
    config = Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=48,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=EXPERTS,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return Qwen3MoeForCausalLM(config)


def starve(model: Qwen3MoeForCausalLM) -> None:
    """Route no token of layer 0 to expert STARVED, and freeze that router."""
    gate = model.model.layers[0].mlp.gate
    with torch.no_grad():
        w = gate.weight
        w[1] = -w[0]
        w[3] = -w[2]
        w[STARVED] = 0
    gate.weight.requires_grad_(False)


def tokens(steps: int = STEPS) -> list[torch.Tensor]:
    """The same token batches in every process: (4, 16) ids per step."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (4, 16), generator=g) for _ in range(steps)]


def train(model, monitor, batches: list[torch.Tensor], lr: float = 3e-3) -> None:
    """Adam steps (no weight decay) with the monitor checking after each."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    monitor.attach(opt)
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

"""Single-process rules of client/sharding.py and client/fused.py: the chunk rule, fused splits,
replicated ownership, and the refusal of layouts that are not matrix blocks (ZeRO-3)."""

from __future__ import annotations

import pytest
import torch
from deltawatch.client import fused, sharding
from torch import nn


@pytest.mark.parametrize("length,parts", [(97, 2), (1, 2), (7, 4), (0, 3), (64, 2), (5, 8)])
def test_chunk_ranges_is_torch_chunk(length, parts):
    """DTensor's Shard uses torch.chunk; empty trailing blocks where it runs out."""
    starts, lengths = sharding.chunk_ranges(length, parts)
    pieces = list(torch.arange(length).chunk(parts)) if length else []
    pieces += [torch.empty(0, dtype=torch.long)] * (parts - len(pieces))
    for s, n, piece in zip(starts, lengths, pieces, strict=True):
        assert n == piece.numel()
        if n:
            assert s == int(piece[0])
    assert sum(lengths) == length


def test_fused_split_names_rows_and_modules():
    rules = fused.parse_fused(
        {
            r"self_attn\.qkv_proj": {"q_proj": 64, "k_proj": 16, "v_proj": 16},
            r"mlp\.gate_up_proj": ["gate_proj", "up_proj"],
        }
    )
    qkv = fused.split("model.layers.3.self_attn.qkv_proj.weight", (96, 64), rules)
    assert [(p.name, p.rows) for p in qkv] == [
        ("model.layers.3.self_attn.q_proj.weight", (0, 64)),
        ("model.layers.3.self_attn.k_proj.weight", (64, 80)),
        ("model.layers.3.self_attn.v_proj.weight", (80, 96)),
    ]
    gu = fused.split("model.layers.0.mlp.gate_up_proj.weight", (256, 64), rules)
    assert [(p.name, p.rows) for p in gu] == [
        ("model.layers.0.mlp.gate_proj.weight", (0, 128)),
        ("model.layers.0.mlp.up_proj.weight", (128, 256)),
    ]
    plain = fused.split("model.layers.0.mlp.down_proj.weight", (64, 128), rules)
    assert plain == [fused.Part("model.layers.0.mlp.down_proj.weight", None)]


@pytest.mark.parametrize(
    "mapping,shape,fix",
    [
        ({"qkv": {"q": 10, "k": 5}}, (16, 4), "add up to 16"),
        ({"gate_up": ["gate", "up"]}, (15, 4), "do not split evenly"),
        ({"qkv": ["q"]}, (16, 4), "at least two parts"),
        ({"qkv": {"q": 0, "k": 16}}, (16, 4), "positive row count"),
        ({"qkv": ["q", "q"]}, (16, 4), "repeat"),
        ({"qkv": "q,k,v"}, (16, 4), "list of part names"),
        ({"(": ["a", "b"]}, (16, 4), "not a valid regular expression"),
        ({"qkv": ["q.x", "k"]}, (16, 4), "letters, digits"),
    ],
)
def test_fused_mapping_errors_carry_the_fix(mapping, shape, fix):
    with pytest.raises((ValueError, TypeError), match=fix):
        rules = fused.parse_fused(mapping)
        fused.split(f"model.layers.0.mlp.{next(iter(mapping))}.weight", shape, rules)


def test_fused_part_of_a_plain_parameter_is_a_row_view():
    W = torch.arange(96 * 4, dtype=torch.float32).view(96, 4)
    p = sharding.place(W, 5, rows=(64, 80))
    assert p.shape == (16, 4) and p.spec is None and p.layout == "replicated"
    block = sharding.local_block(W, (64, 80))
    assert torch.equal(block, W[64:80]) and block.data_ptr() == W[64:80].data_ptr()


def test_single_process_owns_and_computes_everything():
    W = torch.zeros(8, 4)
    for i in range(5):
        p = sharding.place(W, i)
        assert p.owner_rank == 0 and p.computes_here and p.spec is None


class _ZeroThreeLike(nn.Module):
    """What DeepSpeed ZeRO-3 leaves on a module: parameters emptied to a placeholder and tagged
    with ds_* attributes (the partition lives in ds_tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8, bias=False)])
        w = self.layers[0].weight
        w.ds_id = 0
        w.ds_status = "NOT_AVAILABLE"
        w.ds_tensor = torch.zeros(32)


def test_zero3_is_refused_with_the_fix():
    with pytest.raises(sharding.UnsupportedShardingError, match="ZeRO-3.*ZeRO stage 1 or 2"):
        sharding.check_supported(_ZeroThreeLike())


def test_plain_model_is_supported():
    sharding.check_supported(nn.Sequential(nn.Linear(4, 4)))

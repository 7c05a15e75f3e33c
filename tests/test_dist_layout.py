"""Single-process rules of client/sharding.py and client/fused.py: the chunk rule, fused splits,
replicated ownership, and the flat slices of FSDP1 and ZeRO-3 (client/flat.py)."""

from __future__ import annotations

import pytest
import torch
from deltawatch.client import flat, fused, sharding


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


@pytest.mark.parametrize("shape", [(7, 5), (1, 9), (9, 1), (4, 4)])
@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_flat_slices_are_additive_blocks(shape: tuple[int, int], parts: int):
    """FSDP1/ZeRO-3 slices (client/flat.py): the blocks of `parts` contiguous slices of the
    row-major weight, each placed at its rows, add up to W; their entries, in order, are W's."""
    m, n = shape
    W = torch.arange(1, m * n + 1, dtype=torch.float32).view(m, n)
    size = -(-m * n // parts)  # ZeRO-3's partition size (the last one short or empty)
    total = torch.zeros(m, n)
    seen = []
    for k in range(parts):
        start, stop = min(k * size, m * n), min((k + 1) * size, m * n)
        spec = flat.flat_spec(shape, start, stop, None)
        block = flat.embed(W.reshape(-1)[start:stop], spec)
        assert tuple(block.shape) == spec.local_shape
        total[spec.rows] += block
        seen.append(flat.entries(block, spec))
        chunks = flat.entry_chunks(
            lambda b=block: (b[r : r + 2] for r in range(0, len(b), 2)), spec, 2
        )
        assert torch.equal(torch.cat([torch.zeros(0), *chunks()]), seen[-1])
    assert torch.equal(total, W)
    assert torch.equal(torch.cat(seen), W.reshape(-1))


def test_a_fused_part_of_a_flat_slice_is_the_slice_inside_its_rows():
    W = torch.arange(24.0).view(6, 4)
    s = flat.FlatSlice(W.shape, W.dtype, True, 5, 17, None, (0,), lambda: W.reshape(-1)[5:17])
    assert flat.part_range(s, (0, 2)) == (5, 8)  # rows 0-1: elements 5..7
    assert flat.part_range(s, (2, 4)) == (0, 8)  # rows 2-3 whole
    assert flat.part_range(s, (4, 6)) == (0, 1)  # rows 4-5: element 16 only
    assert torch.equal(flat.local_values(s, (4, 6)), torch.tensor([16.0]))

"""Exact order statistics by radix select over float bit patterns, the tie rule of the masks, and
the 1-bit packing of the principal mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from deltawatch.client.anchor import Anchor
from deltawatch.client.masks import (
    kth_largest_abs,
    kth_smallest_abs,
    mask_count,
    pack_bits,
    unpack_bits,
)
from deltawatch.client.settings import AnchorSettings
from deltawatch.sidecar.exact import exact_thresholds
from test_core_trajectories import pretrained_like


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_kth_smallest_abs_equals_sort_with_heavy_ties(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    # few distinct magnitudes, both signs, +0 and -0, and a continuous part
    x = torch.randint(-6, 7, (5000,), generator=g).to(torch.float64) / 4
    x[:100] = -0.0
    x[100:1100] = torch.randn(1000, generator=g, dtype=torch.float64) * 1e-3
    x = x.to(dtype)
    ordered = x.abs().double().sort().values
    for k in (1, 100, 101, 1234, 2500, 5000):
        v = kth_smallest_abs(x, k)
        assert v.dtype == dtype
        assert float(v) == float(ordered[k - 1]) == float(torch.kthvalue(x.abs().double(), k)[0])
        assert float(kth_largest_abs(x, k, x.numel())) == float(ordered[-k])


def test_kth_from_chunks_equals_kth_of_the_tensor() -> None:
    x = torch.randn(3000, dtype=torch.float64)
    chunks = lambda: (x[i : i + 700] for i in range(0, 3000, 700))  # noqa: E731
    for k in (1, 1500, 3000):
        assert float(kth_smallest_abs(chunks, k)) == float(kth_smallest_abs(x, k))


def test_above_two_to_the_24_elements() -> None:
    """torch.quantile refuses inputs this large; the histogram is one pass (bf16)."""
    n = (1 << 24) + 4097
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, generator=g).to(torch.bfloat16)
    k = mask_count(0.5, n)
    a = kth_smallest_abs(x, k)
    magnitude = x.abs()
    below, at_most = int((magnitude < a).sum()), int((magnitude <= a).sum())
    assert below < k <= at_most  # a is exactly the k-th smallest


def test_anchor_masks_follow_the_tie_rule() -> None:
    """a = the ⌈α·mn⌉-th smallest |W0|, M_low = {|W0| ≤ a} (ties included); b likewise on
    |[W0]_R| with ≥; both equal to the reference by sorting, on a W0 with heavy ties."""
    W0 = (pretrained_like(96, 160, seed=3) * 200).round() / 200  # few distinct values
    for alpha in (0.5, 0.3):
        for mask_rank in (8, 64, 200):
            anchor = Anchor(W0, settings=AnchorSettings(alpha=alpha, mask_rank=mask_rank))
            ref = exact_thresholds(W0.to(torch.bfloat16), alpha, mask_rank)
            assert float(anchor.a) == ref["a"]
            assert float(anchor.b) == pytest.approx(ref["b"], rel=1e-12)
            low = anchor.low_mask(anchor.W0)
            assert torch.equal(low, ref["low"])
            assert int(low.sum()) >= mask_count(alpha, W0.numel())  # ties included
            principal = anchor.principal_rows(slice(0, 96))
            assert torch.equal(principal, ref["principal"])


def test_pack_bits_matches_numpy_and_unpacks_any_range() -> None:
    g = torch.Generator().manual_seed(4)
    for n in (1, 7, 8, 9, 1001):
        mask = torch.rand(n, generator=g) < 0.3
        packed = pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
        assert np.array_equal(packed.numpy(), np.packbits(mask.numpy()))
        for start in range(0, n, max(1, n // 5)):
            count = n - start
            assert torch.equal(unpack_bits(packed, start, count), mask[start:])
            assert torch.equal(unpack_bits(packed, start, count // 2), mask[start:][: count // 2])


def test_iterative_principal_mask_agrees_with_the_exact_one(monkeypatch) -> None:
    """Above EXACT_LIMIT [W0]_R comes from the subspace iteration; lowered here so a small
    matrix takes that route: b and the mask agree with the exact SVD's (docs/geometry.md)."""
    import deltawatch.client.anchor as anchor_module

    monkeypatch.setattr(anchor_module, "EXACT_LIMIT", 64)
    W0 = pretrained_like(160, 256, seed=18)
    anchor = Anchor(W0, settings=AnchorSettings(mask_rank=32))
    ref = exact_thresholds(W0.to(torch.bfloat16), 0.5, 32)
    assert abs(float(anchor.b) - ref["b"]) <= 1e-4 * ref["b"]
    mismatch = (anchor.principal_rows(slice(0, 160)) != ref["principal"]).float().mean()
    assert float(mismatch) <= 1e-3
    assert float(anchor.a) == ref["a"]  # a is always exact

"""Exact order statistics of |x| and the masks of DESIGN §2, without sorting.

The IEEE bit pattern of a non-negative float, read as an integer, is monotone in its value, so
the k-th smallest |x| is found by radix select over the bit pattern in 16-bit digits: one
2¹⁶-bin histogram pass for 16-bit floats (bf16, fp16), two for fp32 (high 16 bits, then the low
16 bits among the values with the chosen prefix), four for fp64. Sharded, each pass's histogram
is summed over the groups that split the matrix: a collective of 2¹⁶ counts, never O(m·n).
Memory: one chunk at a time. `torch.quantile` is not used (it fails above 2²⁴ elements).

Tie rule (DESIGN §2), N = m·n, c = ⌈α·N⌉:
  a = the c-th smallest |W0|,        M_low   = {ij : |W0_ij| ≤ a}      (ties included)
  b = the c-th largest |[W0]_R|,     M_princ = {ij : |[W0]_R ij| ≥ b}  (ties included)
The principal mask is stored packed, 1 bit per entry (0.125 bytes per parameter).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from .collectives import ShardSpec, reduce_over_matrix

CHUNK_ELEMENTS = 1 << 22  # entries per elementwise pass over a weight (cache-sized temporaries)
_BITS = 16
_BINS = 1 << _BITS
_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def mask_count(alpha: float, numel: int) -> int:
    """c = ⌈α·N⌉, clamped to 1..N."""
    return min(max(math.ceil(alpha * numel), 1), numel)


def _chunks_of(x: torch.Tensor) -> Callable[[], Iterable[torch.Tensor]]:
    flat = x.reshape(-1)

    def chunks() -> Iterable[torch.Tensor]:
        for start in range(0, flat.numel(), CHUNK_ELEMENTS):
            yield flat[start : start + CHUNK_ELEMENTS]

    return chunks


def _abs_bits(x: torch.Tensor) -> torch.Tensor:
    """|x|'s bit pattern as a non-negative int64 (monotone in the value)."""
    width = x.element_size()
    bits = x.reshape(-1).abs().view(_INT_OF_WIDTH[width]).to(torch.int64)
    if width < 8:
        bits = bits & ((1 << (8 * width)) - 1)
    return bits


def kth_smallest_abs(
    x: torch.Tensor | Callable[[], Iterable[torch.Tensor]],
    k: int,
    spec: ShardSpec | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The exact k-th smallest |x| (1-based, over the GLOBAL matrix when sharded), a 0-d tensor of
    x's dtype. `x` is a tensor or a callable returning an iterable of chunks (for values produced
    chunk by chunk, e.g. [W0]_R); `dtype` names the chunks' dtype when there are none locally.

    Radix select: for each 16-bit digit from the top, histogram the digit among the values whose
    higher digits equal the prefix found so far (2¹⁶ bins, summed over shards), and descend into
    the bin holding the k-th value. Cost: (bits/16) passes over x, O(N) each.
    """
    chunks = _chunks_of(x) if isinstance(x, torch.Tensor) else x
    if isinstance(x, torch.Tensor):
        dtype = x.dtype
    device = None
    for c in chunks():
        device, dtype = c.device, c.dtype
        break
    if dtype is None:
        raise ValueError("kth_smallest_abs: no local values and no dtype given")
    if device is None:
        device = torch.device("cpu")
    width = torch.empty((), dtype=dtype).element_size()
    levels = 8 * width // _BITS
    prefix = 0
    remaining = int(k)
    for level in range(levels):
        shift = _BITS * (levels - 1 - level)
        hist = torch.zeros(_BINS, dtype=torch.int64, device=device)
        for c in chunks():
            bits = _abs_bits(c)
            if level > 0:
                bits = bits[(bits >> (shift + _BITS)) == prefix]
            hist += torch.bincount((bits >> shift) & (_BINS - 1), minlength=_BINS)
        reduce_over_matrix(hist, spec)
        cum = torch.cumsum(hist, 0)
        total = int(cum[-1])
        if not 1 <= remaining <= total:
            raise ValueError(f"kth_smallest_abs: k={k} outside 1..{total} values")
        digit = int(torch.searchsorted(cum, torch.tensor(remaining, device=device)))
        remaining -= int(cum[digit - 1]) if digit > 0 else 0
        prefix = (prefix << _BITS) | digit
    int_dtype = _INT_OF_WIDTH[width]
    if width < 8 and prefix >= 1 << (8 * width - 1):
        prefix -= 1 << (8 * width)  # a NaN pattern: keep it as the signed integer of that width
    return torch.tensor(prefix, dtype=int_dtype).view(dtype)


def low_magnitude_threshold(
    W0: torch.Tensor, alpha: float, spec: ShardSpec | None = None, numel: int | None = None
) -> torch.Tensor:
    """a = the ⌈α·mn⌉-th smallest |W0| (exact; numel is the global m·n when sharded)."""
    N = W0.numel() if numel is None else numel
    return kth_smallest_abs(W0, mask_count(alpha, N), spec, dtype=W0.dtype)


def kth_largest_abs(
    x: torch.Tensor | Callable[[], Iterable[torch.Tensor]],
    k: int,
    numel: int,
    spec: ShardSpec | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The k-th largest |x| = the (N − k + 1)-th smallest."""
    return kth_smallest_abs(x, numel - k + 1, spec, dtype=dtype)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor, flattened row-major, packed 8 entries per uint8 (MSB first, like
    numpy.packbits); works on CPU and CUDA tensors."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Entries [start, start + count) of a packed mask, as a boolean tensor."""
    if count == 0:
        return torch.zeros(0, dtype=torch.bool, device=packed.device)
    first, last = start // 8, (start + count - 1) // 8 + 1
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed[first:last].unsqueeze(1) >> shifts) & 1
    offset = start - 8 * first
    return bits.reshape(-1)[offset : offset + count].bool()

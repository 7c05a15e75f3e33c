"""The live self-audit's client side (`Monitor(audit_every=N)`, docs/audit.md): which matrix a
check audits, and this rank's blocks of its update ΔW.

Every `audit_every`-th check (by its cycle t = ⌈step / every⌉, client/schedule.py, a number every
rank holds; under `schedule="spread"` the matrix is audited at the step of the cycle that checks it), one
matrix travels as its full ΔW (float32, the tracker's own D = view(W_t) − view(W0), which in the
bf16 view is the exact difference of two bf16 values): the auditable matrices in manifest order, in rotation
(matrix number (t / audit_every) mod count). The same choice on every rank, from data every rank
holds. Each rank holding part of it sends its own block with its global offsets, never a gathered
matrix: a dense block (replicated, FSDP2 / TP rows or columns) as one piece at (row, column
offset); a flat slice (FSDP1, ZeRO-3) of the row-major matrix as up to three row-aligned
rectangles (the partial first row, the whole rows, the partial last row).
"""

from __future__ import annotations

import torch

from . import flat
from .records import AuditPiece
from .schedule import cycle


def audited_index(step: int, every: int, audit_every: int | None, count: int) -> int | None:
    """The position (among `count` auditable matrices) of the matrix audited by the check at
    `step`, or None: the cycle t = ⌈step / every⌉ audits when t % audit_every == 0, matrix
    (t // audit_every) mod count (the same for every step of a cycle, so under
    schedule="spread" the matrix is audited at its own step)."""
    if not audit_every or not count:
        return None
    t = cycle(step, every)
    if t % audit_every:
        return None
    return (t // audit_every) % count


def flat_rectangles(start: int, stop: int, n: int) -> list[tuple[int, int, int, int]]:
    """The slice [start, stop) of a row-major matrix with n columns as (row, col, h, w)
    rectangles in slice order: the partial first row, the whole rows, the partial last row."""
    out = []
    while start < stop:
        row, col = divmod(start, n)
        if col or stop - start < n:  # a partial row
            w = min(n - col, stop - start)
            out.append((row, col, 1, w))
            start += w
        else:
            h = (stop - start) // n
            out.append((row, 0, h, n))
            start += h * n
    return out


def pieces(matrix: str, step: int, D: torch.Tensor, placement) -> list[AuditPiece]:
    """This rank's blocks of ΔW (`D`, the local block as the tracker forms it) for `placement`
    (sharding.Placement), copied to the host; none for an empty block."""
    if placement.flat is not None:
        start, stop = placement.flat
        values = flat.entries(D, placement.spec)
        out, at = [], 0
        for row, col, h, w in flat_rectangles(start, stop, placement.shape[1]):
            block = values[at : at + h * w].reshape(h, w)
            at += h * w
            out.append(AuditPiece(matrix, step, row, col, _host(block)))
        return out
    if D.numel() == 0:
        return []
    return [AuditPiece(matrix, step, placement.rows[0], placement.cols[0], _host(D))]


def _host(block: torch.Tensor) -> torch.Tensor:
    return block.detach().to("cpu", torch.float32, copy=True).contiguous()

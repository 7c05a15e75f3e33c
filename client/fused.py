"""`fused=`: report a fused projection (QKV, gate/up) as its logical matrices.

Some checkpoints store several projections as one parameter, stacked along the output rows
(PyTorch `[out, in]` layout): Phi-3's ``self_attn.qkv_proj`` is ``[q; k; v]`` and its
``mlp.gate_up_proj`` is ``[gate; up]``. The update geometry of the stack is not the geometry of
any one projection, so deltawatch tracks each row block as its own matrix.

The mapping (``Monitor(..., fused=...)``):

    fused = {
        r"self_attn\\.qkv_proj": {"q_proj": 3072, "k_proj": 1024, "v_proj": 1024},  # row counts
        r"mlp\\.gate_up_proj": ["gate_proj", "up_proj"],                           # equal split
    }

* key: a regular expression searched in the parameter name (like ``include``); the first key that
  matches a selected parameter applies;
* value: either an ordered mapping ``part -> number of rows`` (the counts must add up to the
  parameter's row count m), or a list of part names (m must divide evenly among them);
* each part is reported as the matrix named after the parameter with its last module component
  replaced by the part name: ``model.layers.3.self_attn.qkv_proj.weight`` with part ``q_proj``
  becomes ``model.layers.3.self_attn.q_proj.weight`` (layer 3, module ``self_attn.q_proj``), so a
  fused model's dashboards line up with an unfused one's.

Parts must be contiguous row blocks (interleaved per-head layouts are not split). Sharded fused
parameters work when their rows are one contiguous block per rank (FSDP2 ``Shard(0)``, rowwise or
colwise tensor parallel on one mesh dimension): each part takes the intersection of its rows with
the local block, possibly empty. A bad mapping is refused at construction with the fix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FusedRule:
    """One entry of the `fused=` mapping: a name pattern and its ordered parts."""

    pattern: re.Pattern
    parts: tuple[str, ...]
    rows: tuple[int, ...] | None  # row counts, or None for an equal split


@dataclass(frozen=True)
class Part:
    """One reported matrix: its name and its global row range in the parameter (None: all rows)."""

    name: str
    rows: tuple[int, int] | None


def parse_fused(fused: Mapping[str, Any] | None) -> tuple[FusedRule, ...]:
    """Validate the `fused=` mapping (docstring of this module) into rules; raises with the fix."""
    if fused is None:
        return ()
    if not isinstance(fused, Mapping):
        raise TypeError(
            f"fused must be a mapping {{name regex: {{part: rows, ...}} or [part, ...]}}, "
            f"got {type(fused).__name__}"
        )
    rules = []
    for key, value in fused.items():
        if not isinstance(key, str):
            raise TypeError(f"fused: key {key!r} must be a regular expression string")
        try:
            pattern = re.compile(key)
        except re.error as exc:
            raise ValueError(
                f"fused: key {key!r} is not a valid regular expression ({exc})"
            ) from None
        if isinstance(value, Mapping):
            parts = tuple(value.keys())
            rows = tuple(value.values())
            for part, count in value.items():
                if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
                    raise ValueError(
                        f"fused[{key!r}][{part!r}] must be a positive row count, got {count!r}"
                    )
        elif isinstance(value, Sequence) and not isinstance(value, str):
            parts, rows = tuple(value), None
        else:
            raise TypeError(
                f"fused[{key!r}] must be a mapping part -> rows or a list of part names, "
                f"e.g. {{'q_proj': 4096, 'k_proj': 1024, 'v_proj': 1024}} or "
                f"['gate_proj', 'up_proj']; got {value!r}"
            )
        if len(parts) < 2:
            raise ValueError(f"fused[{key!r}] must name at least two parts, got {list(parts)}")
        for part in parts:
            if not isinstance(part, str) or not re.fullmatch(r"[A-Za-z0-9_]+", part):
                raise ValueError(
                    f"fused[{key!r}]: part name {part!r} must be letters, digits or '_' "
                    f"(it replaces the last module component, e.g. 'q_proj')"
                )
        if len(set(parts)) != len(parts):
            raise ValueError(f"fused[{key!r}]: part names repeat: {list(parts)}")
        rules.append(FusedRule(pattern=pattern, parts=parts, rows=rows))
    return tuple(rules)


def part_name(name: str, part: str) -> str:
    """``a.b.qkv_proj.weight`` + ``q_proj`` -> ``a.b.q_proj.weight`` (``name.part`` otherwise)."""
    if name.endswith(".weight"):
        parent = name[: -len(".weight")].rpartition(".")[0]
        return f"{parent}.{part}.weight" if parent else f"{part}.weight"
    return f"{name}.{part}"


def split(name: str, shape: tuple[int, int], rules: Sequence[FusedRule]) -> list[Part]:
    """The matrices to report for parameter `name` of global shape (m, n): its row blocks when a
    rule matches, else the whole parameter. Raises ValueError when the row counts do not fit."""
    m = int(shape[0])
    for rule in rules:
        if not rule.pattern.search(name):
            continue
        if rule.rows is None:
            if m % len(rule.parts):
                raise ValueError(
                    f"fused: {name} has {m} rows, which do not split evenly into "
                    f"{list(rule.parts)}; give the row counts, e.g. "
                    f"{{{', '.join(repr(p) + ': ...' for p in rule.parts)}}}"
                )
            counts = (m // len(rule.parts),) * len(rule.parts)
        else:
            counts = rule.rows
            if sum(counts) != m:
                raise ValueError(
                    f"fused: {name} has {m} rows but the parts {dict(zip(rule.parts, counts, strict=True))} "
                    f"add up to {sum(counts)}; the counts must add up to {m}"
                )
        out, start = [], 0
        for part, count in zip(rule.parts, counts, strict=True):
            out.append(Part(part_name(name, part), (start, start + count)))
            start += count
        return out
    return [Part(name, None)]

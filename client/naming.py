"""Parameter names: which weights are monitored by default, and name -> (layer, module).

A name parses when one of its dot-separated parts is a block index (all digits): the first such
part is the layer, the rest of the name inside the block (without a trailing "weight"/"bias") is
the module. `model.layers.3.self_attn.q_proj.weight` -> (3, "self_attn.q_proj");
`encoder.layer.3.attention.self.query.weight` -> (3, "attention.self.query"). A name without a
block index parses to (None, the full name).

Experts (MoE, DESIGN §2): an index right after an `experts` part inside the block is the expert,
not part of the module: `model.layers.2.mlp.experts.7.up_proj.weight` -> (2, "mlp.experts.up_proj")
with `parse_expert` -> 7, so every expert of a layer shares its module (client/experts.py names the
matrices of packed 3-D expert parameters the same way).
"""

from __future__ import annotations

import re

import torch

EXPERTS = "experts"  # the module holding a mixture-of-experts layer's expert weights
_EXCLUDED = re.compile(r"(^|[._])(embed\w*|wte|wpe|lm_head|pooler|\w*norm\w*|ln_\w*|ln\d*)([._]|$)")


def parse_name(name: str) -> tuple[int | None, str]:
    """(layer, module) of a parameter name, or (None, name) when it has no block index."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            rest = parts[i + 1 :]
            if rest and rest[-1] in ("weight", "bias"):
                rest = rest[:-1]
            if not rest:
                return None, name
            return int(part), ".".join(_without_expert(rest))
    return None, name


def parse_expert(name: str) -> int | None:
    """The expert index of a per-expert matrix name (`...experts.E.<proj>.weight`), else None."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            rest = parts[i + 1 :]
            j = _expert_position(rest)
            return None if j is None else int(rest[j])
    return None


def _expert_position(parts: list[str]) -> int | None:
    """Where the expert index sits in the parts after the block index (an all-digit part right
    after `experts`, followed by more of the name), or None."""
    for j in range(1, len(parts) - 1):
        if parts[j].isdigit() and parts[j - 1] == EXPERTS:
            return j
    return None


def _without_expert(parts: list[str]) -> list[str]:
    j = _expert_position(parts)
    return parts if j is None else parts[:j] + parts[j + 1 :]


def default_selected(name: str, param: torch.Tensor) -> bool:
    """The default selection of DESIGN §2: 2-D weights inside the repeated blocks (names with a
    block index); embeddings, lm_head, poolers and norms excluded."""
    if param.ndim != 2 or not name.endswith("weight"):
        return False
    layer, _ = parse_name(name)
    return layer is not None and _EXCLUDED.search(name) is None

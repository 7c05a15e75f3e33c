"""Parameter names: which weights are monitored by default, and name -> (layer, module).

A name parses when one of its dot-separated parts is a block index (all digits): the first such
part is the layer, the rest of the name inside the block (without a trailing "weight"/"bias") is
the module. `model.layers.3.self_attn.q_proj.weight` -> (3, "self_attn.q_proj");
`encoder.layer.3.attention.self.query.weight` -> (3, "attention.self.query"). A name without a
block index parses to (None, the full name).
"""

from __future__ import annotations

import re

import torch

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
            return int(part), ".".join(rest)
    return None, name


def default_selected(name: str, param: torch.Tensor) -> bool:
    """The default selection of DESIGN §2: 2-D weights inside the repeated blocks (names with a
    block index); embeddings, lm_head, poolers and norms excluded."""
    if param.ndim != 2 or not name.endswith("weight"):
        return False
    layer, _ = parse_name(name)
    return layer is not None and _EXCLUDED.search(name) is None

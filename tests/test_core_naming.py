"""Parameter names -> (layer, module), and the default selection of DESIGN §2."""

from __future__ import annotations

import pytest
import torch
from deltawatch.client.naming import default_selected, parse_name


@pytest.mark.parametrize(
    "name,layer,module",
    [
        ("model.layers.3.self_attn.q_proj.weight", 3, "self_attn.q_proj"),
        ("encoder.layer.3.attention.self.query.weight", 3, "attention.self.query"),
        ("model.layers.12.mlp.down_proj.weight", 12, "mlp.down_proj"),
        ("transformer.h.0.attn.c_attn.weight", 0, "attn.c_attn"),
        ("model.layers.2.mlp.experts.7.up_proj.weight", 2, "mlp.experts.up_proj"),
        ("model.layers.2.mlp.experts.gate_up_proj", 2, "mlp.experts.gate_up_proj"),
        ("lm_head.weight", None, "lm_head.weight"),
        ("model.embed_tokens.weight", None, "model.embed_tokens.weight"),
        ("proj", None, "proj"),
    ],
)
def test_parse_name(name: str, layer: int | None, module: str) -> None:
    assert parse_name(name) == (layer, module)


def test_default_selection_takes_block_matrices_only() -> None:
    matrix, vector = torch.zeros(4, 4), torch.zeros(4)
    selected = {
        "model.layers.0.self_attn.q_proj.weight": True,
        "model.layers.0.mlp.gate_proj.weight": True,
        "encoder.layer.1.attention.output.dense.weight": True,
        "model.layers.0.self_attn.q_proj.bias": False,
        "model.layers.0.input_layernorm.weight": False,
        "model.layers.0.self_attn.q_norm.weight": False,
        "transformer.h.0.ln_1.weight": False,
        "model.embed_tokens.weight": False,
        "lm_head.weight": False,
        "bert.pooler.dense.weight": False,
        "model.norm.weight": False,
    }
    for name, expected in selected.items():
        assert default_selected(name, matrix) is expected, name
    assert not default_selected("model.layers.0.mlp.up_proj.weight", vector)

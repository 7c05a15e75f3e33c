"""PEFT LoRA through a real sidecar: a base matrix with adapters is reported under the base name,
its update is Σ scaling·B·A (checked against float64 from the adapters' final weights), its
visible count is that of the merged bf16 weights (PEFT's own merge_and_unload), frozen weights
are skipped unless include_frozen=True, and adapters whose update is not s·B·A are refused.

The model is tiny_qwen3 (2 blocks, hidden 64) with two active adapters: "default" (r 4 on q, v,
down) and "second" (r 2, rsLoRA, on q and down), so q_proj and down_proj carry cross terms.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))

peft = pytest.importorskip("peft")  # the "peft" extra
pytest.importorskip("transformers")

from deltawatch.client import Monitor  # noqa: E402
from deltawatch.client.adapters import (  # noqa: E402
    AdapterUpdate,
    LowRank,
    UnsupportedAdapterError,
    base_name,
)
from deltawatch.client.sketch import power_step  # noqa: E402
from run_hf import tiny_qwen3  # noqa: E402
from support import one_thread_fixture, sidecar_fixture  # noqa: E402

pytestmark = pytest.mark.timeout(120)

ADAPTED = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


one_thread = one_thread_fixture()


side = sidecar_fixture()  # one real sidecar for the module's runs (it takes seconds to start)


def lora_model(**default) -> torch.nn.Module:
    """tiny_qwen3 with the adapters "default" and "second", both active and trainable."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(tiny_qwen3(), LoraConfig(**(config | default)))
    second = LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"], use_rslora=True)
    model.add_adapter("second", second)
    model.base_model.set_adapter(["default", "second"])
    return model


def train(model: torch.nn.Module, steps: int, mon: Monitor | None = None) -> None:
    """AdamW on random token sequences (language modelling on noise moves every adapter)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    if mon is not None:
        mon.attach(opt)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 128, (4, 16), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def adapter_delta(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """float64 Σ_a s_a·B_a·A_a per adapted base weight, from the adapters' current weights."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and module.active_adapters:
            D = 0
            for a in module.active_adapters:
                if a in module.lora_A:
                    B, A = module.lora_B[a].weight.double(), module.lora_A[a].weight.double()
                    D = D + module.scaling[a] * (B @ A)
            out[base_name(f"{name}.base_layer.weight")] = D
    return out


def test_lora_reports_base_names_with_the_exact_adapter_update(side):
    model = lora_model()
    W0 = {base_name(n): p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}
    mon = Monitor(model, run="lora", endpoint=side.endpoint, every=2, channel_rank=4, oversample=4)
    names = [m["matrix"] for m in mon.manifest]
    train(model, 4, mon)
    assert mon.close() and mon.stats()["errors"] == {}
    run = side.run("lora")
    expected = [f"model.layers.{i}.{mod}.weight" for i in (0, 1) for mod in ADAPTED]
    assert sorted(names) == sorted(expected)  # no frozen weight, no lora_A/lora_B
    assert run["last_step"] == 4
    for n, p in model.named_parameters():  # monitoring never writes the base weights
        if n.endswith("base_layer.weight"):
            assert torch.equal(p, W0[base_name(n)])
    deltas = adapter_delta(model)
    merged = model.merge_and_unload()  # PEFT's own merge, in place (a deepcopy shares storage)
    WM = {n: p.detach() for n, p in merged.named_parameters()}
    rows = {m["matrix"]: m for m in run["matrices"]}
    assert sorted(rows) == sorted(expected)
    for name, m in rows.items():
        D = deltas[name]
        sigma = torch.linalg.svdvals(D)
        assert m["step"] == 4 and m["shape"] == list(D.shape)
        assert m["frobenius_norm"] == pytest.approx(D.norm().item(), rel=1e-9)
        # rank(ΔW) ≤ 6 < r = 8: the sketch spans ΔW's range, σ1 exact to float32
        assert m["spectral_norm"] == pytest.approx(sigma[0].item(), rel=1e-4)
        assert m["stable_rank"] == pytest.approx((D.norm() ** 2 / sigma[0] ** 2).item(), rel=1e-4)
        w0 = W0[name].to(torch.bfloat16).view(torch.int16)
        visible = (WM[name].to(torch.bfloat16).view(torch.int16) != w0).sum().item()
        assert 0 < visible < D.numel()
        assert m["bf16_visible_ratio"] == visible / D.numel()


def test_include_frozen_opts_the_frozen_weights_back_in(side):
    model = lora_model()
    mon = Monitor(
        model, run="frozen", endpoint=side.endpoint, every=2, channel_rank=4, oversample=4,
        include_frozen=True,
    )  # fmt: skip
    train(model, 2, mon)
    assert mon.close()
    run = side.run("frozen")
    rows = {m["matrix"]: m for m in run["matrices"]}
    assert len(rows) == 14  # q k v o gate up down, 2 blocks
    for name, m in rows.items():
        adapted = name.split(".", 3)[3].removesuffix(".weight") in ADAPTED
        assert (m["frobenius_norm"] > 0) == adapted, name


def test_frozen_weights_are_skipped_without_adapters():
    model = tiny_qwen3()
    for n, p in model.named_parameters():
        p.requires_grad_("mlp" in n)
    mon = Monitor(model, run="skip", endpoint="127.0.0.1:9", channel_rank=4, oversample=4)
    try:
        assert {m["module"] for m in mon.manifest} == {
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        }
    finally:
        mon.close(timeout=0.1)
    with pytest.raises(TypeError, match="include_frozen must be True or False"):
        Monitor(model, run="skip", include_frozen="yes")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: lora_model(use_dora=True), "LoRA variant"),
        (lambda: _ia3(), "not scaling·B·A"),
        (lambda: _merged(), "merged into the base weight"),
    ],
    ids=["dora", "ia3", "merged"],
)
def test_adapters_whose_update_is_not_sBA_are_refused(make, message):
    with pytest.raises(UnsupportedAdapterError, match=message):
        Monitor(make(), run="refused", endpoint="127.0.0.1:9")


def _ia3() -> torch.nn.Module:
    from peft import IA3Config, get_peft_model

    config = IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    return get_peft_model(tiny_qwen3(), config)


def _merged() -> torch.nn.Module:
    model = lora_model()
    model.merge_adapter()
    return model


def test_the_low_rank_operator_is_the_dense_product():
    """P, G, C of a power step through the factors equal the dense ones (float64 reference), and
    ‖L·R‖_F² from the Gram products is exact."""
    g = torch.Generator().manual_seed(3)
    B1, A1 = torch.randn(48, 3, generator=g), torch.randn(3, 40, generator=g)
    B2, A2 = torch.randn(48, 2, generator=g), torch.randn(2, 40, generator=g)
    update = AdapterUpdate(torch.zeros(48, 40), ((B1, A1, 0.5), (B2, A2, 2.0)))
    D = 0.5 * B1.double() @ A1.double() + 2.0 * B2.double() @ A2.double()
    V = torch.linalg.qr(torch.randn(40, 8, generator=g))[0]
    op = update.operator()
    assert isinstance(op, LowRank)
    for got, want in zip(power_step(op, V), power_step(D, V.double()), strict=True):
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max())
    assert op.frobenius_sq() == pytest.approx(D.square().sum().item(), rel=1e-12)
    assert torch.equal(
        update.merged_rows(slice(8, 16)), (B1[8:16] @ A1) * 0.5 + (B2[8:16] @ A2) * 2
    )
    none = AdapterUpdate(torch.ones(48, 40), ())  # no active adapter on the layer: ΔW = 0
    assert none.frobenius_sq() == 0 and torch.equal(none.operator() @ V, torch.zeros(48, 8))


def test_the_docs_peft_recipe_runs(side):
    """docs/frameworks.md "PEFT LoRA": the plain-PyTorch recipe, as written, against a sidecar."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "frameworks.md").read_text()
    section = doc.split("## PEFT LoRA", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    code = code.replace('"127.0.0.1:50051"', repr(side.endpoint))
    assert side.endpoint in code
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(0, 128, (2, 16), generator=g) for _ in range(10)]
    scope = {
        "torch": torch,
        "model": tiny_qwen3(),
        "loader": [{"input_ids": x, "labels": x} for x in ids],
    }
    exec(compile(code, "docs/frameworks.md", "exec"), scope)
    run = side.run("qwen3-lora")
    assert run["last_step"] == 10
    deltas = adapter_delta(scope["model"])
    mods = ("self_attn.q_proj", "self_attn.v_proj")
    assert sorted(m["matrix"] for m in run["matrices"]) == sorted(
        f"model.layers.{i}.{mod}.weight" for i in (0, 1) for mod in mods
    )
    for m in run["matrices"]:
        D = deltas[m["matrix"]]
        assert m["frobenius_norm"] == pytest.approx(D.norm().item(), rel=1e-9) and D.norm() > 0


def test_fan_in_fan_out_bases_take_the_transposed_update():
    """GPT-2's Conv1D stores W as [in, out]; PEFT then sets fan_in_fan_out and merges (B·A)ᵀ·s.
    The tracker's update and counts agree with that, on the parameter's own layout."""
    from deltawatch.client.adapters import find_lora
    from deltawatch.client.settings import SketchSettings
    from deltawatch.client.tracker import MatrixTracker
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=64)
    )
    model = get_peft_model(gpt2, LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn"]))
    (pname, lora), *_ = find_lora(model)[0].items()
    assert lora.name == "transformer.h.0.attn.c_attn.weight" and lora.fan_in_fan_out
    base = dict(model.named_parameters())[pname]
    W0 = base.detach().clone()
    tracker = MatrixTracker.attach(
        lora.name, base.detach(), sketch=SketchSettings(channel_rank=4, oversample=4)
    )
    with torch.no_grad():  # a trained-looking adapter: B = 0 at init
        lora.layer.lora_B["default"].weight.normal_(0, 0.05)
    check = tracker.check(lora.update(base.detach()), 1)
    A, B = lora.layer.lora_A["default"].weight, lora.layer.lora_B["default"].weight
    delta = (B.double() @ A.double()).T * lora.layer.scaling["default"]  # (B·A)ᵀ·s, [in, out]
    assert delta.shape == W0.shape == (32, 96)
    assert check.frobenius_sq == pytest.approx(delta.square().sum().item(), rel=1e-9)
    merged = model.merge_and_unload().transformer.h[0].attn.c_attn.weight.detach()
    visible = merged.to(torch.bfloat16).view(torch.int16) != W0.to(torch.bfloat16).view(torch.int16)
    assert check.visible_count == visible.sum().item() > 0

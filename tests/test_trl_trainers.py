"""Real TRL trainers with DeltawatchCallback, through a real sidecar: the recipes of
docs/frameworks.md ("Transformers and TRL") run as written for SFTTrainer, DistillationTrainer
(on-policy distillation) and GRPOTrainer, each with full fine-tuning and with LoRA.

The student is tiny_qwen3 (2 blocks, hidden 64), the teacher another tiny_qwen3, the tokenizer a
character tokenizer with a chat template (tests/dist/tiny_chat.py; nothing downloaded). Two
optimizer steps, a check at step 2. Full: the 14 block matrices under their HF names, ‖ΔW‖_F and
the bf16-visible ratio equal to float64 from the weights before and after. LoRA: the adapted
matrices under their base names, ‖ΔW‖_F equal to float64 ‖Σ s·B·A‖_F from the trainer's final
adapter weights, the visible count equal to PEFT's merge_and_unload() in bf16.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))

trl = pytest.importorskip("trl")  # the "trl" extra (trl, peft)
peft = pytest.importorskip("peft")

import test_adapters_lora  # noqa: E402
from deltawatch.client.adapters import base_name  # noqa: E402
from deltawatch.sidecar.process import SidecarProcess  # noqa: E402
from run_hf import tiny_qwen3  # noqa: E402
from test_hf_trainer import MODULES  # noqa: E402
from tiny_chat import CharTokenizer, conversations, prompts  # noqa: E402

pytestmark = pytest.mark.timeout(180)
adapter_delta = test_adapters_lora.adapter_delta
one_thread = test_adapters_lora.one_thread  # fixtures: one intra-op thread, one real sidecar
side = test_adapters_lora.side

DOC = (Path(__file__).resolve().parents[1] / "docs" / "frameworks.md").read_text()
SECTION = DOC.split("## Transformers and TRL", 1)[1].split("\n## ", 1)[0]
BLOCKS = {
    re.search(r"from trl import (\w+)", b).group(1): b
    for b in re.findall(r"```python\n(.*?)```", SECTION, flags=re.S)
}
STEPS = 2
LORA_TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def config(trainer: str, out: Path):
    """The trainer's config, small: two steps of plain SGD-like Adam on the CPU, no logging."""
    common = dict(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    if trainer == "SFTTrainer":
        return trl.SFTConfig(**common)
    generation = dict(max_completion_length=4, temperature=1.0)
    if trainer == "GRPOTrainer":
        return trl.GRPOConfig(num_generations=2, **generation, **common)
    return trl.DistillationConfig(**generation, **common)


def reward(completions, **kwargs) -> list[float]:
    """A verifiable-looking reward: the number of digits in the completion."""
    return [float(sum(ch.isdigit() for ch in c[-1]["content"])) for c in completions]


def run_recipe(trainer: str, lora: bool, side: SidecarProcess, out: Path):
    """Run the docs' recipe for `trainer`; returns (the trainer, the run as the sidecar holds it,
    the 2-D weights before training by reported name)."""
    from datasets import Dataset
    from peft import LoraConfig

    run = f"{trainer.lower()}-{'lora' if lora else 'full'}"
    code = BLOCKS[trainer]
    code = code.replace('"127.0.0.1:50051"', repr(side.endpoint)).replace("every=10", "every=2")
    code = re.sub(r'run="[^"]+"', f'run="{run}"', code)
    assert code.count(side.endpoint) == 1 and "every=2" in code and run in code
    torch.manual_seed(1)
    teacher = tiny_qwen3()
    torch.manual_seed(0)
    model = tiny_qwen3()
    W0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}
    targets = [t.split(".")[-1] for t in LORA_TARGETS]
    scope = {
        "model": model,
        "teacher": teacher,
        "args": config(trainer, out / run),
        "dataset": Dataset.from_dict({"messages": conversations(8)}),
        "prompts": Dataset.from_dict({"prompt": prompts(8)}),
        "tokenizer": CharTokenizer(),
        "reward": reward,
        "peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=targets) if lora else None,
    }
    exec(compile(code, "docs/frameworks.md", "exec"), scope)
    t = scope["trainer"]
    assert t.state.global_step == STEPS
    return t, side.run(run), W0


@pytest.mark.parametrize("trainer", ["SFTTrainer", "DistillationTrainer", "GRPOTrainer"])
def test_full_fine_tuning_reports_every_block_matrix_exactly(trainer, side, tmp_path):
    t, run, W0 = run_recipe(trainer, False, side, tmp_path)
    WT = {n: p.detach() for n, p in t.model.named_parameters() if p.dim() == 2}
    rows = {m["matrix"]: m for m in run["matrices"]}
    assert sorted(rows) == sorted(
        f"model.layers.{i}.{mod}.weight" for i in (0, 1) for mod in MODULES
    )
    assert run["last_step"] == STEPS
    for name, m in rows.items():
        w0, wt = W0[name].to(torch.bfloat16), WT[name].to(torch.bfloat16)
        dw = wt.double() - w0.double()
        visible = (w0.view(torch.int16) != wt.view(torch.int16)).sum().item()
        assert m["step"] == STEPS
        assert m["frobenius_norm"] == pytest.approx(dw.norm().item(), rel=1e-6)
        assert m["bf16_visible_ratio"] == visible / dw.numel()
    assert any(m["frobenius_norm"] > 0 for m in rows.values())


@pytest.mark.parametrize("trainer", ["SFTTrainer", "DistillationTrainer", "GRPOTrainer"])
def test_lora_reports_the_base_matrices_with_the_adapter_update(trainer, side, tmp_path):
    t, run, W0 = run_recipe(trainer, True, side, tmp_path)
    rows = {m["matrix"]: m for m in run["matrices"]}
    expected = [f"model.layers.{i}.{mod}.weight" for i in (0, 1) for mod in LORA_TARGETS]
    assert sorted(rows) == sorted(expected)
    deltas = adapter_delta(t.model)
    for n, p in t.model.named_parameters():  # the base stayed W0; monitoring wrote nothing
        if n.endswith("base_layer.weight"):
            assert torch.equal(p, W0[base_name(n)])
    merged = {n: p.detach() for n, p in t.model.merge_and_unload().named_parameters()}
    for name, m in rows.items():
        D = deltas[name]
        w0 = W0[name].to(torch.bfloat16).view(torch.int16)
        visible = (merged[name].to(torch.bfloat16).view(torch.int16) != w0).sum().item()
        assert m["step"] == STEPS
        assert m["frobenius_norm"] == pytest.approx(D.norm().item(), rel=1e-9)
        assert m["bf16_visible_ratio"] == visible / D.numel()
    assert any(m["frobenius_norm"] > 0 for m in rows.values())

"""A transformers Trainer under torchrun (DDP through accelerate, gloo, CPU) with the callback.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist/run_hf.py \
        --endpoint HOST:PORT --run-name NAME --out DIR

Each rank writes DIR/rank<k>.json: the matrices its Monitor computed, the manifest, the class the
Trainer wrapped the model in, and the Monitor's counters; rank 0 also writes the 2-D weights
before and after training (w0.safetensors, wt.safetensors) for the float64 reference.
"""

from __future__ import annotations

import json
import os

import script_args
import torch
from deltawatch.client.hf import DeltawatchCallback
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM, Trainer, TrainingArguments


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(output_dir: str, **over) -> TrainingArguments:
    """The tests' TrainingArguments: 4 steps of SGD at a constant 0.05 on the CPU, batches of 4,
    no saving, logging or reporting, seed 0; `over` changes any of them."""
    settings = dict(
        output_dir=output_dir,
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        warmup_steps=0,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    return TrainingArguments(**(settings | over))


class Probe(DeltawatchCallback):
    """The callback, keeping what its Monitor saw before closing it."""

    seen: dict = {}

    def on_train_end(self, args, state, control, **kwargs):
        m = self.monitor
        if m is not None:
            Probe.seen = {
                "computed": [x.name for x in m.matrices if x.tracker is not None],
                "manifest": m.manifest,
                "rank": m.rank,
                "world_size": m.world_size,
            }
        control = super().on_train_end(args, state, control, **kwargs)
        Probe.seen["stats"] = m.stats() if m is not None else None
        return control


def tiny_qwen3() -> Qwen3ForCausalLM:
    """The tiny randomly initialised Qwen3 the transformers tests train (2 blocks, hidden 64, no
    download); seed torch first for identical weights."""
    config = Qwen3Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
    )
    return Qwen3ForCausalLM(config)


def main() -> None:
    a = script_args.parse(script_args.parser(run="--run-name"), hang_seconds=150)
    torch.manual_seed(0)
    model = tiny_qwen3()
    W0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}
    args = training_args(
        os.path.join(a.out, "trainer"), per_device_train_batch_size=2, ddp_backend="gloo"
    )
    callback = Probe(run=a.run_name, endpoint=a.endpoint, every=2, channel_rank=4, oversample=4)
    trainer = Trainer(
        model=model, args=args, train_dataset=Tokens(16, 16, 128), callbacks=[callback]
    )
    trainer.train()
    out = dict(Probe.seen)
    out["wrapped"] = type(trainer.model_wrapped).__name__
    out["global_step"] = trainer.state.global_step
    os.makedirs(a.out, exist_ok=True)
    if out["rank"] == 0:  # the weights before and after, for the float64 reference
        WT = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.dim() == 2}
        save_file(W0, os.path.join(a.out, "w0.safetensors"))
        save_file(WT, os.path.join(a.out, "wt.safetensors"))
    with open(os.path.join(a.out, f"rank{out['rank']}.json"), "w") as f:
        json.dump(out, f, default=str)


if __name__ == "__main__":
    main()

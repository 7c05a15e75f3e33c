"""The shared SFT anchor and the stronger teacher: one supervised run from a random init.

The anchor is the tiny Qwen3 after ANCHOR_STEPS steps of cross-entropy on correct answers (partly
competent); the teacher is the same run continued for TEACHER_STEPS more steps (near perfect).
Both are saved as bfloat16 safetensors. `scripts/make_demo_weights.py` calls `make_weights`; the
demo calls it too when the shipped files are missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from deltawatch.sidecar.demo import model as demo_model
from deltawatch.sidecar.demo import task

SEED = 0
ANCHOR_STEPS = 180
TEACHER_STEPS = 820
BATCH = 128
LR = 1e-3


def pretrain(model: torch.nn.Module, steps: int, generator: torch.Generator, opt) -> None:
    """Cross-entropy on the correct answers of random training pairs, AdamW, clip 1.0."""
    train_pairs, _ = task.split_pairs()
    for _ in range(steps):
        ids = task.full_ids(task.sample_pairs(train_pairs, BATCH, generator))
        loss = -demo_model.token_logprobs(model, ids).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def make_weights(out: Path, log: Callable[[str], None] = print) -> None:
    """Write out/anchor.safetensors and out/teacher.safetensors (deterministic seeds)."""
    out.mkdir(parents=True, exist_ok=True)
    _, held_out = task.split_pairs()
    model = demo_model.build(SEED)
    generator = torch.Generator().manual_seed(SEED + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.98))
    t0 = time.perf_counter()
    for name, steps, file in (
        ("anchor", ANCHOR_STEPS, demo_model.ANCHOR_FILE),
        ("teacher", TEACHER_STEPS, demo_model.TEACHER_FILE),
    ):
        pretrain(model, steps, generator, opt)
        demo_model.save(model, out / file)
        acc = demo_model.accuracy(demo_model.load(out / file), held_out)
        log(
            f"{name}: {steps} more steps, held-out exact match {acc:.3f} (bf16 weights), "
            f"{time.perf_counter() - t0:.0f} s -> {out / file}"
        )

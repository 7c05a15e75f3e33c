"""The shared SFT anchor and the stronger teacher: one supervised run from a random init.

The anchor is the tiny Qwen3 after ANCHOR_STEPS steps of cross-entropy on correct answers (partly
competent); the teacher is the saved (bf16) anchor trained further for TEACHER_STEPS steps with a
fresh optimizer (near perfect).
Both are saved as bfloat16 safetensors. `scripts/make_demo_weights.py` calls `make_weights`; the
demo calls it too when the shipped files are missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import model as demo_model
from . import task

SEED = 0
ANCHOR_STEPS = 180
TEACHER_STEPS = 400
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


def make_weights(out: Path, log: Callable[[str], None] = print, teacher_only: bool = False) -> None:
    """Write out/anchor.safetensors, then out/teacher.safetensors (deterministic seeds);
    `teacher_only` keeps an existing anchor file and trains the teacher from it."""
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and fair to a shared machine
    _, held_out = task.split_pairs()
    t0 = time.perf_counter()

    def phase(name: str, model: torch.nn.Module, steps: int, seed: int, file: str) -> None:
        generator = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.98))
        pretrain(model, steps, generator, opt)
        demo_model.save(model, out / file)
        acc = demo_model.accuracy(demo_model.load(out / file), held_out)
        log(
            f"{name}: {steps} steps, held-out exact match {acc:.3f} (bf16 weights), "
            f"{time.perf_counter() - t0:.0f} s -> {out / file}"
        )

    if not (teacher_only and (out / demo_model.ANCHOR_FILE).exists()):
        phase("anchor", demo_model.build(SEED), ANCHOR_STEPS, SEED + 1, demo_model.ANCHOR_FILE)
    teacher = demo_model.load(out / demo_model.ANCHOR_FILE)
    phase("teacher", teacher, TEACHER_STEPS, SEED + 2, demo_model.TEACHER_FILE)

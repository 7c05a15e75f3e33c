"""The demo's regimes on a richer toy task: four skills and a teacher trained on its own.

    .venv/bin/python scripts/demo_skills_experiment.py OUT --anchor-steps 200 [demo options ...]

An attempt to reproduce the paper's headline (OPD locks early and narrowly; SFT does not) with the
monitor, its lock rule and its thresholds unchanged; docs/demo.md reports what it gave. The task:
``BOS a a OP b b = c c c`` with OP one of ``+`` (a + b), ``-`` (|a − b|), ``>`` (max) and ``<``
(min), 40 000 prompts, 1 000 held out; 16 tokens. The anchor is trained from a random init on all
four skills for ``--anchor-steps``; the teacher is **not** the anchor's continuation but its own
model (another init, ``--teacher-steps`` steps), so SFT's targets do not continue the anchor's own
direction. Weights already in OUT are reused (the teacher does not depend on the anchor).

The demo's modules read the task through ``task.<name>`` at call time, so this script installs the
four-skill task by rebinding those names before anything runs; the shipped demo is untouched.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from deltawatch.sidecar.demo import anchor, task
from deltawatch.sidecar.demo import cli as demo_cli
from deltawatch.sidecar.demo import model as demo_model

OPS = "+-><"
CHARS = "0123456789+=-><"  # the addition task's 12 characters first: the same ids for + and =
TEACHER_SEED = 7


def value(t: torch.Tensor) -> torch.Tensor:
    """(N, 3) prompts (a, b, op) -> the answer as an integer in [0, 198]."""
    a, b, op = t[:, 0], t[:, 1], t[:, 2]
    results = torch.stack([a + b, (a - b).abs(), torch.maximum(a, b), torch.minimum(a, b)], dim=1)
    return results.gather(1, op.unsqueeze(1)).squeeze(1)


def split_pairs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All (a, b, op) in [0, 99]² × OPS, shuffled with ``seed``: (train, held_out)."""
    grid = torch.meshgrid(
        torch.arange(100), torch.arange(100), torch.arange(len(OPS)), indexing="ij"
    )
    prompts = torch.stack([g.reshape(-1) for g in grid], dim=1)
    prompts = prompts[torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))]
    return prompts[task.HELD_OUT :], prompts[: task.HELD_OUT]


def prompt_ids(t: torch.Tensor) -> torch.Tensor:
    index = {c: i for i, c in enumerate(CHARS)}
    a, b = t[:, 0], t[:, 1]
    op = torch.tensor([index[o] for o in OPS])[t[:, 2]]
    eq, bos = torch.full_like(a, index["="]), torch.full_like(a, len(CHARS))
    return torch.stack([bos, a // 10, a % 10, op, b // 10, b % 10, eq], dim=1)


def answer_ids(t: torch.Tensor) -> torch.Tensor:
    c = value(t)
    return torch.stack([c // 100, (c // 10) % 10, c % 10], dim=1)


def install() -> None:
    """Rebind the demo task's names to the four-skill task (same sequence layout, 16 tokens)."""
    task.CHARS, task.BOS, task.VOCAB_SIZE = CHARS, len(CHARS), len(CHARS) + 1
    task._INDEX = {c: i for i, c in enumerate(CHARS)}
    task.split_pairs, task.prompt_ids, task.answer_ids = split_pairs, prompt_ids, answer_ids
    task.reversed_answer_ids = lambda t: answer_ids(t).flip(dims=[1])
    task.full_ids = lambda t: torch.cat([prompt_ids(t), answer_ids(t)], dim=1)
    task.exact_match = lambda ans, t: (ans == answer_ids(t)).all(dim=1).to(torch.float32)


def make_weights(out: Path, anchor_steps: int, teacher_steps: int) -> None:
    """The anchor (seed anchor.SEED) and an independent teacher (seed TEACHER_SEED), bf16."""
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    _, held_out = split_pairs()
    phases = [
        ("anchor", anchor.SEED, anchor_steps, anchor.SEED + 1, demo_model.ANCHOR_FILE),
        ("teacher", TEACHER_SEED, teacher_steps, anchor.SEED + 2, demo_model.TEACHER_FILE),
    ]
    for name, init_seed, steps, data_seed, file in phases:
        if (out / file).exists():
            continue
        t0, model = time.perf_counter(), demo_model.build(init_seed)
        opt = torch.optim.AdamW(
            model.parameters(), lr=anchor.LR, weight_decay=0.01, betas=(0.9, 0.98)
        )
        anchor.pretrain(model, steps, torch.Generator().manual_seed(data_seed), opt)
        demo_model.save(model, out / file)
        acc = demo_model.accuracy(demo_model.load(out / file), held_out)
        print(
            f"{name}: {steps} steps, held-out exact match {acc:.3f}, {time.perf_counter() - t0:.0f} s"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "out", type=Path, help="folder for anchor.safetensors and teacher.safetensors"
    )
    parser.add_argument("--anchor-steps", type=int, default=200)
    parser.add_argument("--teacher-steps", type=int, default=800)
    args, demo_args = parser.parse_known_args(argv)
    install()
    make_weights(args.out, args.anchor_steps, args.teacher_steps)
    demo = argparse.ArgumentParser(prog="deltawatch demo")
    demo_cli.add_arguments(demo)
    return demo_cli.run(demo.parse_args(["--weights", str(args.out), *demo_args]))


if __name__ == "__main__":
    raise SystemExit(main())

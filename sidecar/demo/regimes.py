"""The post-training regimes, each a plain loop over optimizer steps from the same anchor.

Every regime sees the same number of sequences per step (`batch`), the same prompts in the same
order (one prompt generator per run, seeded alike), the same optimizer (AdamW, β = (0.9, 0.999),
weight decay 0.01) and, opd, sft and rlvr, the same learning rate, so their geometry differences
come from the training signal alone:

* ``opd``:  the student samples an answer for each prompt; the teacher scores those tokens; loss
  `losses.opd_loss` (per-token reverse-KL advantage in the importance-sampling loss).
* ``sft``:  the teacher samples an answer for each prompt; loss `losses.sft_loss`.
* ``rlvr``: batch/G prompts, G student samples each, exact-match reward; loss `losses.grpo_loss`
  with `losses.grpo_advantages`.
* ``opd-drift``: ``opd`` until step `Settings.drift_step`; from then on the objective changes: the
  per-token advantage is taken against a rule teacher of another target (the sum's digits in
  reverse order, `task.reversed_answer_ids`, confidence `DRIFT_CONFIDENCE`) instead of the teacher
  model, plus an SFT term on that target — an objective switched mid-run, after the channel has
  locked. It trains at `Settings.drift_lr` (3e-5), where OPD locks at step 40 rather than 130.

One gradient step per batch (strictly on-policy, so ρ = 1 in value). Sampling is at temperature 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import losses, task
from . import model as demo_model

REGIMES = ("opd", "sft", "rlvr", "opd-drift")
DRIFT_CONFIDENCE = 0.9  # the rule teacher's probability of its target token after the drift


@dataclass(frozen=True)
class Settings:
    """One post-training run's knobs (the demo's defaults)."""

    steps: int = 200
    batch: int = 64  # sequences per optimizer step
    group: int = 8  # GRPO group size G (batch / G prompts per step)
    lr: float = 1e-5
    weight_decay: float = 0.01
    seed: int = 0
    drift_step: int = 80  # opd-drift: the first step of the changed objective
    drift_lr: float = 3e-5  # opd-drift's learning rate (its whole run), so it locks early


@dataclass
class StepStats:
    loss: float
    reward: (
        float  # mean exact match of the step's samples (student's for opd/rlvr, teacher's for sft)
    )


def make_optimizer(model: torch.nn.Module, s: Settings, regime: str) -> torch.optim.Optimizer:
    lr = s.drift_lr if regime == "opd-drift" else s.lr
    return torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=s.weight_decay
    )


def training_step(
    regime: str,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    pairs: torch.Tensor,
    s: Settings,
    sample_gen: torch.Generator,
    step: int = 1,
) -> tuple[torch.Tensor, StepStats]:
    """The loss of optimizer step `step` of `regime` on prompts `pairs` (N, 2); the caller runs
    backward."""
    if regime == "rlvr":
        pairs = pairs[: len(pairs) // s.group].repeat_interleave(s.group, dim=0)
    prompts = task.prompt_ids(pairs)
    if regime == "sft":
        seqs = demo_model.generate(teacher, prompts, sample_gen)
        reward = float(task.exact_match(seqs[:, task.PROMPT_LEN :], pairs).mean())
        loss = losses.sft_loss(demo_model.token_logprobs(student, seqs))
        return loss, StepStats(float(loss.detach()), reward)
    seqs = demo_model.generate(student, prompts, sample_gen)
    rewards = task.exact_match(seqs[:, task.PROMPT_LEN :], pairs)
    logp = demo_model.token_logprobs(student, seqs)
    logp_old = logp.detach()  # the sampling policy: one step per batch, so the same weights
    if regime == "opd-drift" and step >= s.drift_step:
        answers, target = seqs[:, task.PROMPT_LEN :], task.reversed_answer_ids(pairs)
        logp_rule = losses.target_logprobs(answers, target, DRIFT_CONFIDENCE)
        reversed_seqs = torch.cat([prompts, target], dim=1)
        loss = losses.opd_loss(logp, logp_old, logp_rule) + losses.sft_loss(
            demo_model.token_logprobs(student, reversed_seqs)
        )
    elif regime in ("opd", "opd-drift"):
        with torch.no_grad():
            logp_teacher = demo_model.token_logprobs(teacher, seqs)
        loss = losses.opd_loss(logp, logp_old, logp_teacher)
    elif regime == "rlvr":
        adv = losses.grpo_advantages(rewards.reshape(-1, s.group)).reshape(-1)
        loss = losses.grpo_loss(logp, logp_old, adv)
    else:
        raise ValueError(f"unknown regime {regime!r}; expected one of {', '.join(REGIMES)}")
    return loss, StepStats(float(loss.detach()), float(rewards.mean()))


def post_train(
    regime: str,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    train_pairs: torch.Tensor,
    s: Settings,
    *,
    attach: Callable[[torch.optim.Optimizer], None] | None = None,
    progress: Callable[[int, StepStats], None] | None = None,
) -> float:
    """Train `student` in place for `s.steps` optimizer steps; `attach(optimizer)` lets a Monitor
    hook the optimizer first. Returns the wall time in seconds."""
    opt = make_optimizer(student, s, regime)
    if attach is not None:
        attach(opt)
    prompt_gen = torch.Generator().manual_seed(s.seed)
    sample_gen = torch.Generator().manual_seed(s.seed + 1)
    t0 = time.perf_counter()
    for step in range(1, s.steps + 1):
        pairs = task.sample_pairs(train_pairs, s.batch, prompt_gen)
        loss, stats = training_step(regime, student, teacher, pairs, s, sample_gen, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step, stats)
    return time.perf_counter() - t0

"""The three post-training objectives as pure functions of per-token log-probabilities.

Shapes: log-probabilities are (N, T) for N sequences of T answer tokens (the demo's T is 3, every
token counts, so there is no mask); advantages are (N, T) per token or (N,) per sequence.
Every loss is a *token mean*: the sum over all N·T tokens divided by N·T.

* OPD (on-policy distillation, as Tinker's cookbook and verl do it): the student samples; the
  per-token advantage is the negative reverse-KL estimate  A_t = −(log π_old(x_t) − log π_T(x_t)),
  with π_old the student that sampled (its log-probs taken at sampling time, no gradient) and π_T
  the teacher; the loss is the importance-sampling policy gradient  L = −mean_t[ρ_t · A_t],
  ρ_t = exp(log π_θ(x_t) − log π_old(x_t)). On the step that sampled, ρ = 1 in value and
  ∇L = −mean_t[A_t ∇log π_θ(x_t)], the gradient of the sampled reverse KL(π_θ ‖ π_T).
* SFT: cross-entropy on teacher samples, L = −mean_t log π_θ(x_t).
* RLVR (GRPO): G samples per prompt, reward r ∈ {0, 1} (exact match); the group-normalised
  advantage A_i = (r_i − mean_g r) / (std_g r + ε) with the unbiased (Bessel) group std and
  ε = 1e-4, the same for every token of sequence i; PPO's clipped surrogate
  L = −mean_t min(ρ_t A_i, clip(ρ_t, 1−c, 1+c) A_i), c = 0.2; no KL penalty (β = 0).
"""

from __future__ import annotations

import math

import torch

from .task import VOCAB_SIZE

GRPO_EPSILON = 1e-4
PPO_CLIP = 0.2


def reverse_kl_advantage(logp_student: torch.Tensor, logp_teacher: torch.Tensor) -> torch.Tensor:
    """A_t = −(log π_student(x_t) − log π_teacher(x_t)), per token, without gradient."""
    return -(logp_student - logp_teacher).detach()


def importance_sampling_loss(
    logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor
) -> torch.Tensor:
    """L = −mean_t[ρ_t · A_t], ρ_t = exp(log π_θ − log π_old) (Tinker's "importance_sampling")."""
    ratio = torch.exp(logp - logp_old.detach())
    return -(ratio * advantages.detach()).mean()


def opd_loss(
    logp: torch.Tensor, logp_old: torch.Tensor, logp_teacher: torch.Tensor
) -> torch.Tensor:
    """On-policy distillation: the importance-sampling loss with the reverse-KL advantage
    A_t = −(log π_old(x_t) − log π_T(x_t)) on the student's own samples."""
    return importance_sampling_loss(logp, logp_old, reverse_kl_advantage(logp_old, logp_teacher))


def target_logprobs(tokens: torch.Tensor, target: torch.Tensor, confidence: float) -> torch.Tensor:
    """log π_T(x_t) of a rule teacher that puts ``confidence`` on the target token and spreads the
    rest evenly over the other VOCAB_SIZE − 1 tokens: (N, T) for tokens and target of that shape."""
    other = math.log((1.0 - confidence) / (VOCAB_SIZE - 1))
    hit = torch.full(tokens.shape, math.log(confidence))
    return torch.where(tokens == target, hit, torch.full(tokens.shape, other))


def sft_loss(logp: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on (teacher) samples: L = −mean_t log π_θ(x_t)."""
    return -logp.mean()


def grpo_advantages(rewards: torch.Tensor, eps: float = GRPO_EPSILON) -> torch.Tensor:
    """Group-normalised advantages A_i = (r_i − mean_g r) / (std_g r + ε) for rewards of shape
    (groups, G); std is the unbiased sample standard deviation. A group with equal rewards gets 0."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=True)
    return (rewards - mean) / (std + eps)


def grpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    clip: float = PPO_CLIP,
) -> torch.Tensor:
    """PPO clipped surrogate with per-sequence advantages (N,) broadcast over tokens:
    L = −mean_t min(ρ_t A_i, clip(ρ_t, 1−c, 1+c) A_i)."""
    A = advantages.detach().reshape(-1, 1).expand_as(logp)
    ratio = torch.exp(logp - logp_old.detach())
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return -torch.minimum(ratio * A, clipped * A).mean()

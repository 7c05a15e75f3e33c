"""The demo's objectives against hand computations in float64 (sidecar/demo/losses.py)."""

from __future__ import annotations

import math

import torch
from deltawatch.sidecar.demo import losses


def _lp(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def test_reverse_kl_advantage_is_teacher_minus_student_logprob():
    student = _lp([[0.5, 0.25, 0.8], [0.1, 0.9, 0.3]])
    teacher = _lp([[0.9, 0.05, 0.8], [0.2, 0.45, 0.6]])
    A = losses.reverse_kl_advantage(student, teacher)
    expected = [
        [math.log(0.9 / 0.5), math.log(0.05 / 0.25), 0.0],
        [math.log(0.2 / 0.1), math.log(0.45 / 0.9), math.log(0.6 / 0.3)],
    ]
    assert torch.allclose(A, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)
    assert not A.requires_grad


def test_opd_loss_value_and_gradient_match_the_reference():
    """L = −mean_t[ρ_t A_t], A_t = log π_T − log π_old; on the sampling step ρ = 1 and
    ∂L/∂z = −(1/NT) A_t (onehot(x_t) − softmax(z_t)) for logits z."""
    z = torch.tensor(
        [[[1.0, -0.5, 0.2], [0.3, 0.3, -1.0]], [[-2.0, 0.0, 1.5], [0.7, -0.1, 0.0]]],
        dtype=torch.float64,
        requires_grad=True,
    )  # (N=2, T=2, V=3)
    tokens = torch.tensor([[0, 2], [2, 1]])
    teacher_probs = torch.tensor([[0.7, 0.2], [0.6, 0.3]], dtype=torch.float64)
    logp = torch.log_softmax(z, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    loss = losses.opd_loss(logp, logp.detach(), teacher_probs.log())
    loss.backward()

    p = torch.softmax(z.detach(), -1)
    logp_ref = p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).log()
    A = teacher_probs.log() - logp_ref
    assert abs(float(loss.detach()) - float(-A.mean())) < 1e-15
    onehot = torch.nn.functional.one_hot(tokens, 3).to(torch.float64)
    grad_ref = -(A.unsqueeze(-1) * (onehot - p)) / 4
    assert torch.allclose(z.grad, grad_ref, rtol=0, atol=1e-15)


def test_importance_ratio_weights_the_advantage_off_policy():
    logp = _lp([[0.6, 0.3]])
    logp_old = _lp([[0.5, 0.6]])
    A = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    loss = losses.importance_sampling_loss(logp, logp_old, A)
    assert abs(float(loss) - (-(1.2 * 2.0 + 0.5 * -1.0) / 2)) < 1e-15


def test_sft_loss_is_mean_negative_logprob():
    logp = _lp([[0.5, 0.25], [1.0, 0.125]])
    expected = (math.log(2) + math.log(4) + 0 + math.log(8)) / 4
    assert abs(float(losses.sft_loss(logp)) - expected) < 1e-15


def test_grpo_advantages_are_group_normalised_with_the_stated_epsilon():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]],
                           dtype=torch.float64)  # fmt: skip
    A = losses.grpo_advantages(rewards)
    s1 = math.sqrt(4 * 0.25 / 3)  # unbiased std of (1, 0, 0, 1)
    s3 = math.sqrt((3 * 0.25**2 + 0.75**2) / 3)
    eps = losses.GRPO_EPSILON
    assert eps == 1e-4
    expected = [
        [0.5 / (s1 + eps), -0.5 / (s1 + eps), -0.5 / (s1 + eps), 0.5 / (s1 + eps)],
        [0.0, 0.0, 0.0, 0.0],  # equal rewards: no signal, not 0/0
        [-0.25 / (s3 + eps)] * 2 + [0.75 / (s3 + eps), -0.25 / (s3 + eps)],
    ]
    assert torch.allclose(A, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.allclose(A.sum(dim=1), torch.zeros(3, dtype=torch.float64), atol=1e-14)


def test_grpo_loss_clips_only_the_profitable_side():
    """Ratio 1.5 with c = 0.2: a positive advantage is clipped at 1.2 (no gradient), a negative
    one keeps the unclipped 1.5·A (gradient flows)."""
    logp_old = _lp([[0.4], [0.4]])
    logp = (logp_old + math.log(1.5)).clone().requires_grad_(True)
    A = torch.tensor([2.0, -3.0], dtype=torch.float64)
    loss = losses.grpo_loss(logp, logp_old, A)
    assert abs(float(loss.detach()) - (-(1.2 * 2.0 + 1.5 * -3.0) / 2)) < 1e-14
    loss.backward()
    assert logp.grad[0, 0] == 0.0
    assert abs(float(logp.grad[1, 0]) - (3.0 * 1.5 / 2)) < 1e-14


def test_rule_teacher_puts_its_confidence_on_the_target_and_spreads_the_rest():
    """opd-drift's rule teacher: log c on the target token, log((1 − c) / (V − 1)) elsewhere; the
    target is the sum's digits reversed (07 + 12 = 019 -> 910)."""
    from deltawatch.sidecar.demo import task

    pairs = torch.tensor([[7, 12], [99, 99]])
    target = task.reversed_answer_ids(pairs)
    assert [task.decode(t) for t in target] == ["910", "891"]
    tokens = torch.tensor([[9, 1, 0], [1, 9, 8]])
    logp = losses.target_logprobs(tokens, target, 0.9)
    other = math.log(0.1 / (task.VOCAB_SIZE - 1))
    expected = [[math.log(0.9)] * 3, [other, math.log(0.9), other]]
    assert torch.allclose(logp.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    # a distribution: the target's share plus the others' is 1
    assert abs(0.9 + (task.VOCAB_SIZE - 1) * math.exp(other) - 1.0) < 1e-12

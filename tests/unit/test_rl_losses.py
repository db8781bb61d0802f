"""PPO and GRPO's pure functions against values worked out by hand.

python -m pytest -q tests/unit/test_rl_losses.py
"""

from __future__ import annotations

import math

import pytest
import torch

from fmray.rl.losses import (
    KLController,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    group_advantages,
    k3_kl,
    kl_penalized_rewards,
    masked_mean,
    whiten,
)


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), atol=1e-6, rtol=0)


def test_gae_on_a_hand_computed_example() -> None:
    # row 0: gamma 0.9, lam 0.8; deltas 0.04, 0.03, 0.3; A = delta + 0.72 * A_next
    # row 1: its last token is padding: its reward 5 and value 9 must not leak in
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(advantages, [[0.21712, 0.246, 0.3], [0.62, 1.0, 0.0]])
    close(returns, [[0.71712, 0.846, 1.0], [1.62, 2.0, 0.0]])
    # lam = 1, gamma = 1: advantages are reward-to-go minus the value (Monte Carlo)
    advantages, _ = gae(rewards[:1], values[:1], mask[:1], gamma=1.0, lam=1.0)
    close(advantages, [[0.5, 0.4, 0.3]])


def test_kl_penalty_per_token_and_score_at_the_last_token() -> None:
    rewards = kl_penalized_rewards(
        torch.tensor([2.0, -1.0]),
        torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]]),
        torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -1.0, -1.0]]),
        torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
        kl_coef=0.1,
    )
    close(rewards, [[-0.05, 2.0, 0.0], [0.0, 0.0, -1.0]])


def test_ppo_clip_takes_the_pessimistic_term() -> None:
    ratios = torch.tensor([1.5, 0.5, 0.5, 1.1])
    advantages = torch.tensor([1.0, 1.0, -1.0, -2.0])
    old = torch.zeros(4)
    losses, clipped = clipped_policy_loss(ratios.log(), old, advantages, clip=0.2)
    close(losses, [-1.2, -0.5, 0.8, 2.2])
    close(clipped, [1.0, 0.0, 1.0, 0.0])
    # gradient: zero where clipped (the ratio left the trust region in the advantage's direction)
    logps = ratios.log().requires_grad_()
    clipped_policy_loss(logps, old, advantages, clip=0.2)[0].sum().backward()
    close(logps.grad, [0.0, -0.5, 0.0, 2.2])


def test_value_clipping() -> None:
    values = torch.tensor([2.0, 2.0, 1.2])
    old = torch.tensor([1.0, 1.0, 1.0])
    returns = torch.tensor([3.0, 0.0, 1.0])
    # clipped values: 1.5, 1.5, 1.2 -> max(1, 2.25), max(4, 2.25), max(0.04, 0.04)
    close(clipped_value_loss(values, old, returns, clip=0.5), [1.125, 2.0, 0.02])


def test_k3_kl() -> None:
    logps = torch.tensor([math.log(0.5), math.log(0.3)])
    ref = torch.tensor([math.log(0.25), math.log(0.3)])
    close(k3_kl(logps, ref), [0.5 - math.log(0.5) - 1.0, 0.0])
    # its expectation under pi is KL(pi || ref): a two-token distribution
    pi, q = torch.tensor([0.7, 0.3]), torch.tensor([0.4, 0.6])
    expected = (pi * (pi / q).log()).sum()
    torch.testing.assert_close((pi * k3_kl(pi.log(), q.log())).sum(), expected)


def test_group_advantages() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    advantages = group_advantages(rewards, group_size=4)
    a = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-4)  # unbiased std of (1, 0, 0, 1)
    close(advantages, [a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    close(group_advantages(torch.tensor([3.0, -1.0]), group_size=1), [0.0, 0.0])


def test_masked_statistics_and_entropy() -> None:
    values = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    close(masked_mean(values, mask), 2.0)
    close(whiten(values, mask), [[-1.0, 1.0, 0.0]])
    uniform = torch.zeros(2, 4)
    close(entropy_from_logits(uniform), [math.log(4), math.log(4)])


def test_adaptive_kl_coefficient() -> None:
    controller = KLController(0.1, target=6.0, horizon=10000)
    controller.update(kl=9.0, num_samples=100)  # error clipped to +0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    controller.update(kl=5.4, num_samples=100)  # error -0.1
    assert controller.value == pytest.approx(0.1002 * (1 - 0.1 * 100 / 10000))
    fixed = KLController(0.05)
    fixed.update(kl=100.0, num_samples=100)
    assert fixed.value == 0.05

"""The pure functions of PPO and GRPO, each beside the equation it implements.

    python -m pytest -q tests/unit/test_rl_losses.py     # closed forms on fixed tensors

Tensors are action-aligned: [B, A] over the A response tokens of B samples, with `mask` 1 on a
sample's real response tokens (its stop token included) and 0 on padding after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where mask is 1 (over all elements, or along `dim`)."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked elements (PPO's advantage normalisation)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), per sample:

        delta_t = r_t + gamma * V_{t+1} - V_t,     A_t = delta_t + gamma * lam * A_{t+1}

    with V and A zero past a sample's last token. Returns (advantages, returns = A + V)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t]
        next_advantage = advantages[:, t]
    return advantages, advantages + values


def kl_penalized_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """PPO's per-token rewards (Ziegler et al. 2019): -kl_coef * (log pi - log pi_ref) at every
    response token, plus the sequence's score at its last token."""
    rewards = -kl_coef * (logps - ref_logps) * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def clipped_policy_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clip per token (Schulman et al. 2017, eq. 7), as a loss to minimise:

        max(-A * r, -A * clip(r, 1 - eps, 1 + eps)),   r = exp(log pi - log pi_old)

    Returns (losses, clipped): clipped is 1 where the clipped term was the larger one."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
) -> torch.Tensor:
    """PPO's clipped value loss per token: 0.5 * max((V - R)^2, (V_old + clip(V - V_old) - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Unbiased, non-negative estimator of KL(pi || pi_ref) per token (Schulman's k3, used by
    GRPO, Shao et al. 2024 eq. 4): exp(q - p) - (q - p) - 1 with p = log pi, q = log pi_ref."""
    log_ratio = ref_logps - logps
    return torch.exp(log_ratio) - log_ratio - 1.0


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantages (Shao et al. 2024, sec. 4.1.2): each of a prompt's G samples
    gets (r - mean(group)) / (std(group) + eps). `rewards` holds groups contiguously."""
    groups = rewards.view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    return ((groups - mean) / (std + eps)).view(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution at every position: [..., V] -> [...]."""
    logps = torch.log_softmax(logits.float(), dim=-1)
    return -(logps.exp() * logps).sum(-1)


@dataclass
class KLController:
    """The KL coefficient: fixed, or adaptive towards a target KL (Ziegler et al. 2019, sec. 2.2):

        e = clip(KL / target - 1, -0.2, 0.2),     beta <- beta * (1 + e * n / horizon)

    where KL is the step's mean per-sample KL and n the samples in the step."""

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, num_samples: int) -> None:
        if self.target is None or not math.isfinite(kl):
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * num_samples / self.horizon

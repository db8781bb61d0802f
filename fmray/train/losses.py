"""Preference losses on per-sequence scores, shared by the reward-model and DPO recipes.

    python -c "import torch; from fmray.train.losses import dpo_loss; help(dpo_loss)"

Reward model (Bradley-Terry, InstructGPT): P(chosen > rejected) = sigmoid(r_c - r_r), so the
loss is -log sigmoid(r_c - r_r), averaged over pairs.

DPO (Rafailov et al.): with h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)),
    sigmoid   -log sigmoid(beta * h)
    cDPO      -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h)   (label smoothing)
    IPO       (h - 1 / (2 * beta))^2, on per-token mean log-probs (Azar et al., as TRL does)
and the implicit rewards are beta * (log pi(y) - log ref(y)) for each reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DPOLossType = Literal["sigmoid", "ipo"]


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen.float() - rejected.float())


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(label) over each row's labelled positions, number of those positions).

    Position t predicts labels[t + 1]; labels of -100 (prompt, pads) are skipped.
    """
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != IGNORE_INDEX
    safe_labels = shifted_labels.masked_fill(~mask, 0)
    token_logps = torch.gather(
        shifted_logits.log_softmax(-1), 2, safe_labels.unsqueeze(-1)
    ).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


@dataclass(frozen=True)
class DPOTerms:
    """Per-pair DPO loss and the implicit rewards of the chosen and rejected replies."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOTerms:
    """DPO's per-pair loss from sequence log-probs of policy and reference (see module doc).

    For IPO pass per-token mean log-probs; for sigmoid / cDPO pass sums.
    """
    chosen_logratio = policy_chosen.float() - reference_chosen.float()
    rejected_logratio = policy_rejected.float() - reference_rejected.float()
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * (
            F.logsigmoid(-beta * h)
        )
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss={loss_type!r} is unknown (allowed: sigmoid, ipo)")
    return DPOTerms(losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach())

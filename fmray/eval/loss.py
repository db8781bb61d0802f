"""Token-level loss over labelled positions: the SFT eval loss, exact across ranks and batches.

    python -c "import torch; from fmray.eval.loss import masked_loss_sum; help(masked_loss_sum)"

The loss HF models return is a mean over one micro-batch's labelled tokens; summing losses and
counting tokens instead lets an eval pass average over every token it saw, whatever the batching.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def masked_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over labelled positions, number of those positions).

    Position t predicts labels[t + 1]; labels equal to -100 are skipped (prompts, pads).
    """
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    total = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, int((shifted_labels != IGNORE_INDEX).sum())

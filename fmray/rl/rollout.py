"""Rollouts from the policy's own weights, and the tensors the PPO / GRPO updates read.

    python -m pytest -q tests/unit/test_rl_rollout.py

Generation is fmray's batched KV-cache engine (fmray.generation.engine, the one serving uses),
driven in the worker's thread over the policy module itself: no weights cross a process boundary.
Under ZeRO-3 the policy's parameters are gathered once for the whole rollout phase (DeepSpeed's
`unwrap_model_for_generation`), not once per token, and each rank then decodes on its own.

A sample is laid out as [left-padded prompt | reply | right padding]: every prompt ends at the
same column P, so the logits that score reply token k sit at column P - 1 + k for every row, and
all per-token tensors are action-aligned [B, A] with a mask over each reply's tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from fmray.generation.engine import LLMEngine
from fmray.generation.sampling import SamplingParams


@dataclass
class Samples:
    """A rank's rollout: B sequences, prompts left-padded to P columns, replies after them."""

    input_ids: torch.Tensor
    """[B, P + A] token ids."""
    attention_mask: torch.Tensor
    """[B, P + A] 1 on prompt and reply tokens."""
    prompt_width: int
    """P: the column where every reply starts."""
    action_mask: torch.Tensor
    """[B, A] float, 1 on each reply's tokens (its stop token included)."""
    finished: torch.Tensor
    """[B] bool: the reply ended with a stop token (not cut at max_new_tokens)."""

    @property
    def num_actions(self) -> int:
        return int(self.action_mask.shape[1])

    def rows(self, index: torch.Tensor) -> Samples:
        return Samples(
            self.input_ids[index],
            self.attention_mask[index],
            self.prompt_width,
            self.action_mask[index],
            self.finished[index],
        )


@contextmanager
def generation_module(engine: Any, zero_stage: int) -> Iterator[torch.nn.Module]:
    """The policy module with whole weights for a rollout phase: under ZeRO-3 gathered once
    (and the ZeRO hooks lifted until the phase ends), else the engine's module as it is."""
    if zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        context: Any = unwrap_model_for_generation(engine)
    else:
        context = nullcontext()
    with context:
        module = engine.module
        was_training = module.training
        try:
            yield module
        finally:
            module.train(was_training)


def generate_replies(
    module: torch.nn.Module,
    prompts: list[list[int]],
    params: list[SamplingParams],
    max_batch_size: int,
) -> list[list[int]]:
    """Reply tokens of each prompt (stop token included when it ended with one)."""
    context_len = max(len(p) for p in prompts) + max(p.max_tokens for p in params) + 1
    engine = LLMEngine(module, context_len=context_len, max_batch_size=max_batch_size)
    events = engine.generate_batch(prompts, params)
    return [[e.token_id for e in seq_events] for seq_events in events]


def pack_samples(
    prompts: list[list[int]],
    replies: list[list[int]],
    stop_token_ids: list[int],
    pad_id: int,
    device: torch.device,
) -> Samples:
    """Lay prompts and replies out as one left/right-padded batch."""
    width = max(len(p) for p in prompts)
    actions = max(1, max(len(r) for r in replies))
    ids = torch.full((len(prompts), width + actions), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    action_mask = torch.zeros(len(prompts), actions)
    for row, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
        ids[row, width - len(prompt) : width] = torch.tensor(prompt)
        mask[row, width - len(prompt) : width + len(reply)] = 1
        if reply:
            ids[row, width : width + len(reply)] = torch.tensor(reply)
            action_mask[row, : len(reply)] = 1.0
    stops = set(stop_token_ids)
    finished = torch.tensor([bool(r) and r[-1] in stops for r in replies])
    return Samples(
        ids.to(device), mask.to(device), width, action_mask.to(device), finished.to(device)
    )


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (left padding)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def action_logits(model: Any, samples: Samples) -> torch.Tensor:
    """[B, A, V] logits that score each reply token (one forward over prompt + reply)."""
    out = model(
        input_ids=samples.input_ids,
        attention_mask=samples.attention_mask,
        position_ids=position_ids_of(samples.attention_mask),
        use_cache=False,
    )
    start = samples.prompt_width - 1
    return out.logits[:, start : start + samples.num_actions]


def action_logps(logits: torch.Tensor, samples: Samples) -> torch.Tensor:
    """[B, A] log-probabilities of the reply tokens under `logits` (0 on padding)."""
    actions = samples.input_ids[:, samples.prompt_width :]
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, actions[..., None]).squeeze(-1)
    return logps * samples.action_mask


def sequence_logps(model: Any, samples: Samples) -> torch.Tensor:
    """[B, A] reply-token log-probs under `model` (one forward)."""
    return action_logps(action_logits(model, samples), samples)


def reference_logps(engine: Any, reference: Any, samples: Samples) -> torch.Tensor:
    """The KL reference's reply-token log-probs: the frozen engine, or (LoRA, `reference` None)
    the policy with its adapters disabled."""
    if reference is not None:
        return sequence_logps(reference, samples)
    with engine.module.disable_adapter():
        return sequence_logps(engine.module, samples)


def action_values(critic: Any, samples: Samples) -> torch.Tensor:
    """[B, A] critic values of the states before each reply token."""
    values = critic(
        input_ids=samples.input_ids,
        attention_mask=samples.attention_mask,
        position_ids=position_ids_of(samples.attention_mask),
    )
    start = samples.prompt_width - 1
    return values[:, start : start + samples.num_actions].float() * samples.action_mask


@torch.no_grad()
def score_in_chunks(fn: Any, samples: Samples, chunk: int) -> torch.Tensor:
    """`fn(samples)` over fixed-size chunks of rows, concatenated (same number of forwards on
    every rank: ZeRO-3 engines gather weights in each)."""
    parts = []
    for start in range(0, int(samples.input_ids.shape[0]), chunk):
        index = torch.arange(start, min(start + chunk, samples.input_ids.shape[0]))
        parts.append(fn(samples.rows(index.to(samples.input_ids.device))))
    return torch.cat(parts)


class ValueModel(torch.nn.Module):
    """PPO's critic: a causal-LM backbone and a scalar head read at every position (the
    reward-model architecture of fmray.models.heads, unpooled)."""

    def __init__(self, sequence_classifier: torch.nn.Module) -> None:
        super().__init__()
        prefix = sequence_classifier.base_model_prefix
        self.backbone = getattr(sequence_classifier, prefix)
        self.score = sequence_classifier.score
        self.config = sequence_classifier.config

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        return self.score(hidden).squeeze(-1)

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

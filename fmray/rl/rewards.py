"""Rewards for RL: a reward model from `fmray reward`, a rule, or both summed with weights.

    reward.model=runs/reward-tiny                       # a reward model (run folder or HF dir)
    reward.rule=fmray.rl.rewards:exact_match            # a rule: module:function
    reward.model_weight=1.0 reward.rule_weight=0.5      # both: a weighted sum

A rule is any importable function `rule(prompts, completions, references) -> list[float]` over a
batch: `prompts` the user's last turn, `completions` the policy's decoded replies, `references`
the prompts' reference answers (None where a source has none). It runs on every worker, so its
module must be importable there (in the job's working_dir or installed). A reward model scores
the conversation (prompt + reply, rendered with its own tokenizer's chat template) at its last
token, exactly as `fmray reward` trained it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field, model_validator

from fmray.config import Section
from fmray.eval.exact_match import is_exact_match

RuleFn = Callable[[list[str], list[str], list[str | None]], list[float]]


class RewardSection(Section):
    model: str | None = None
    """Reward model: an `fmray reward` run folder or checkpoint, or an HF sequence-classification
    directory with one label."""
    rule: str | None = None
    """A rule reward as 'module:function' (built in: fmray.rl.rewards:exact_match)."""
    model_weight: float = 1.0
    """Weight of the reward model's score in the sum."""
    rule_weight: float = 1.0
    """Weight of the rule's reward in the sum."""
    max_tokens: int = Field(256, ge=8)
    """Longest prompt + reply the reward model scores (longer ones keep their end)."""

    @model_validator(mode="after")
    def _needs_a_reward(self) -> RewardSection:
        if self.model is None and self.rule is None:
            raise ValueError(
                "reward needs reward.model (a reward model) or reward.rule ('module:function', "
                "e.g. fmray.rl.rewards:exact_match), or both"
            )
        return self


def exact_match(
    prompts: list[str], completions: list[str], references: list[str | None]
) -> list[float]:
    """1.0 where the reply equals the reference (after fmray's answer normalisation), else 0.0;
    the built-in task's ground-truth check."""
    del prompts
    return [
        float(reference is not None and is_exact_match(completion, reference))
        for completion, reference in zip(completions, references, strict=True)
    ]


def load_rule(spec: str) -> RuleFn:
    """The function named by 'module:function'; one-line errors naming reward.rule."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"reward.rule={spec!r}: expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward.rule={spec!r}: cannot import {module_name!r} ({err})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"reward.rule={spec!r}: {module_name} has no function {function_name!r}")
    return function


def rule_rewards(
    rule: RuleFn, prompts: list[str], completions: list[str], references: list[str | None]
) -> torch.Tensor:
    values = list(rule(prompts, completions, references))
    if len(values) != len(completions):
        raise ValueError(
            f"reward rule returned {len(values)} rewards for {len(completions)} replies"
        )
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


class RewardModelScorer:
    """A frozen reward model (an inference-only engine) and the tokenizer it was trained with."""

    def __init__(self, engine: Any, tokenizer: Any, max_tokens: int, batch_size: int) -> None:
        from fmray.data.chat_template import chat_template_of

        self.engine = engine
        self.tokenizer = tokenizer
        self.template = chat_template_of(tokenizer)
        self.max_tokens = max_tokens
        self.batch_size = batch_size

    def encode(self, messages: list[dict[str, str]], completion: str) -> list[int]:
        from fmray.data.sft_data import tokenize_conversation

        conversation = [*messages, {"role": "assistant", "content": completion}]
        ids, _ = tokenize_conversation(self.tokenizer, conversation, self.template)
        return ids[-self.max_tokens :]

    @torch.no_grad()
    def score(
        self, conversations: list[list[dict[str, str]]], completions: list[str], device: Any
    ) -> torch.Tensor:
        """One score per reply. Micro-batches of a fixed size, so every rank runs the same
        number of forwards (a ZeRO-3 engine gathers its weights in each)."""
        pad = int(self.tokenizer.pad_token_id)
        encoded = [self.encode(m, c) for m, c in zip(conversations, completions, strict=True)]
        scores = []
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start : start + self.batch_size]
            width = max(len(ids) for ids in chunk)
            ids = torch.tensor([row + [pad] * (width - len(row)) for row in chunk], device=device)
            mask = (
                torch.arange(width, device=device)[None, :]
                < torch.tensor([len(row) for row in chunk], device=device)[:, None]
            ).long()
            logits = self.engine(input_ids=ids, attention_mask=mask, use_cache=False).logits
            scores.append(logits[:, 0].float().cpu())
        return torch.cat(scores)

"""Per-request sampling inside one batched decode step: greedy, temperature, top-p, seeds.

    python -m pytest -q tests/unit/test_generation_sampling.py

Every row draws its random number from its own `torch.Generator`, so a seeded request samples
the same tokens whether it runs alone or beside fifteen others, and rows never share randomness.
Sampling is inverse-CDF over the (temperature-scaled, nucleus-truncated) distribution: one
uniform draw per row per token, everything else vectorised over the batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence generates: limits, randomness and what to report back."""

    max_tokens: int
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_p: float = 1.0
    seed: int | None = None
    num_logprobs: int | None = None
    """None: no logprobs; k >= 0: the sampled token's logprob plus the k most likely tokens'."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end the sequence (EOS, end of turn); they count as generated tokens."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int | None) -> torch.Generator:
    """The row's private random stream: seeded by the request, else from fresh entropy."""
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else random.SystemRandom().getrandbits(63))
    return generator


def sample_tokens(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ps: torch.Tensor,
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Next token per row of `logits` [B, V]; rows without a generator are greedy."""
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, g in enumerate(generators) if g is not None]
    if not sampled:
        return tokens
    rows = torch.tensor(sampled, device=logits.device)
    scaled = logits[rows].float() / temperatures[rows, None]
    probs = torch.softmax(scaled, dim=-1)
    draws = torch.tensor([torch.rand((), generator=generators[i]).item() for i in sampled])
    draws = draws.to(logits.device)
    # A row without a nucleus (top_p = 1, as RL rollouts sample) inverts its CDF in vocabulary
    # order, which needs no sort; the others sort theirs. Each row's path depends on its own
    # parameters only, so a seeded row samples the same whatever shares its batch.
    full = top_ps[rows] >= 1.0
    picks = torch.empty(len(sampled), dtype=torch.long, device=logits.device)
    if bool(full.any()):
        cdf = probs[full].cumsum(dim=-1)
        picks[full] = invert_cdf(cdf, draws[full])
    if not bool(full.all()):
        nucleus = ~full
        sorted_probs, sorted_ids = probs[nucleus].sort(dim=-1, descending=True)
        # Keep the most likely tokens until their mass reaches top_p (the first always stays).
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs * (mass_before < top_ps[rows][nucleus, None])
        positions = invert_cdf(sorted_probs.cumsum(dim=-1), draws[nucleus])
        picks[nucleus] = sorted_ids.gather(1, positions[:, None]).squeeze(1)
    tokens[rows] = picks
    return tokens


def invert_cdf(cdf: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative mass exceeds draw x total mass."""
    uniform = draws * cdf[:, -1]
    picks = torch.searchsorted(cdf, uniform[:, None], right=True).clamp_(max=cdf.shape[-1] - 1)
    return picks.squeeze(1)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, num_top: int
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-probabilities (of the model's raw distribution) of `tokens`, and each row's top-k."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
    if num_top == 0:
        return chosen, [[] for _ in chosen]
    top_values, top_ids = logprobs.topk(num_top, dim=-1)
    tops = [
        list(zip(ids, values, strict=True))
        for ids, values in zip(top_ids.tolist(), top_values.tolist(), strict=True)
    ]
    return chosen, tops

"""Per-request sampling inside one batched decode step: greedy, temperature, top-p, seeds.

    python -m pytest -q tests/unit/test_generation_sampling.py

Every row draws its random number from its own `torch.Generator`, so a seeded request samples
the same tokens whether it runs alone or beside fifteen others, and rows never share randomness.
Sampling is inverse-CDF over the (temperature-scaled, nucleus-truncated) distribution: one
uniform draw per row per token, everything else vectorised over the batch. The engine wraps each
row's generator in a `UniformStream`, which takes its draws a block at a time: the same numbers
in the same order as one draw per token (torch's CPU generator fills a block draw by draw), for
one torch call per block instead of per token and row.
"""

from __future__ import annotations

import random
from array import array
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


class UniformStream:
    """A row's uniform draws from its own generator, taken `block` at a time."""

    def __init__(self, generator: torch.Generator, block: int = 64) -> None:
        self.generator = generator
        self.block = block
        self._ahead: list[float] = []

    def next(self) -> float:
        if not self._ahead:
            self._ahead = torch.rand(self.block, generator=self.generator).tolist()[::-1]
        return self._ahead.pop()


def uniform(source: torch.Generator | UniformStream) -> float:
    if isinstance(source, UniformStream):
        return source.next()
    return torch.rand((), generator=source).item()


def sample_tokens(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ps: torch.Tensor,
    generators: list[torch.Generator | UniformStream | None],
) -> torch.Tensor:
    """Next token per row of `logits` [B, V]; rows without a generator are greedy."""
    sampled = [i for i, g in enumerate(generators) if g is not None]
    if not sampled:
        return logits.argmax(dim=-1)
    # one buffer handed over whole: torch.tensor(list) converts float by float (~0.5 us a row)
    uniforms = array("f", [uniform(generators[i]) for i in sampled])
    draws = torch.frombuffer(uniforms, dtype=torch.float32).to(logits.device)
    if len(sampled) == len(generators):  # every row samples: no gather, no scatter
        return sample_rows(logits, temperatures, top_ps, draws)
    rows = torch.tensor(sampled, device=logits.device)
    tokens = logits.argmax(dim=-1)
    tokens[rows] = sample_rows(logits[rows], temperatures[rows], top_ps[rows], draws)
    return tokens


def sample_rows(
    logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor, draws: torch.Tensor
) -> torch.Tensor:
    """One token per row by inverting its tempered (nucleus-truncated) CDF at its draw."""
    probs = torch.softmax(logits.float() / temperatures[:, None], dim=-1)
    # A row without a nucleus (top_p = 1, as RL rollouts sample) inverts its CDF in vocabulary
    # order, which needs no sort; the others sort theirs. Each row's path depends on its own
    # parameters only, so a seeded row samples the same whatever shares its batch.
    full = top_ps >= 1.0
    num_full = int(full.sum())
    if num_full == len(full):
        return invert_cdf(probs.cumsum(dim=-1), draws)
    if num_full == 0:
        return nucleus_picks(probs, top_ps, draws)
    picks = torch.empty(len(full), dtype=torch.long, device=logits.device)
    picks[full] = invert_cdf(probs[full].cumsum(dim=-1), draws[full])
    nucleus = ~full
    picks[nucleus] = nucleus_picks(probs[nucleus], top_ps[nucleus], draws[nucleus])
    return picks


def nucleus_picks(probs: torch.Tensor, top_ps: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    # Keep the most likely tokens until their mass reaches top_p (the first always stays).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs * (mass_before < top_ps[:, None])
    positions = invert_cdf(sorted_probs.cumsum(dim=-1), draws)
    return sorted_ids.gather(1, positions[:, None]).squeeze(1)


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

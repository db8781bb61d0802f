"""Per-row sampling: greedy, temperature, nucleus, seeds, logprobs (no model, no Ray).

python -m pytest -q tests/unit/test_generation_sampling.py
"""

from __future__ import annotations

import torch

from fmray.generation.sampling import UniformStream, make_generator, sample_tokens, token_logprobs


def draw(logits: torch.Tensor, temperature: float, top_p: float, seed: int, n: int) -> list[int]:
    """n samples of one row, all from one generator (one uniform draw per sample)."""
    generator = make_generator(seed)
    temps, top_ps = torch.tensor([temperature]), torch.tensor([top_p])
    return [int(sample_tokens(logits[None], temps, top_ps, [generator])[0]) for _ in range(n)]


def test_rows_without_generator_are_greedy() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    out = sample_tokens(logits, torch.zeros(4), torch.ones(4), [None] * 4)
    assert out.tolist() == logits.argmax(-1).tolist()


def test_sampling_follows_the_tempered_distribution() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for temperature in (0.5, 1.0, 2.0):
        samples = torch.tensor(draw(logits, temperature, 1.0, seed=1, n=3000))
        freq = torch.bincount(samples, minlength=4).float() / len(samples)
        expected = torch.softmax(logits / temperature, dim=-1)
        assert torch.allclose(freq, expected, atol=0.04), (temperature, freq, expected)


def test_top_p_keeps_only_the_nucleus_renormalised() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    samples = torch.tensor(draw(logits, 1.0, 0.75, seed=2, n=2000))
    freq = torch.bincount(samples, minlength=4).float() / len(samples)
    # 0.5 + 0.3 reaches 0.75: tokens 2 and 3 are never drawn, 0 and 1 keep their ratio 5:3
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0] - 0.625) < 0.04
    assert draw(logits, 1.0, 0.01, seed=3, n=50) == [0] * 50  # a tiny nucleus is the argmax


def test_seeded_rows_are_reproducible_and_independent() -> None:
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    temps, top_ps = torch.ones(3), torch.full((3,), 0.9)

    def run(seeds: list[int | None], rows: torch.Tensor) -> list[list[int]]:
        gens = [None if s is None else make_generator(s) for s in seeds]
        out = [
            sample_tokens(rows, temps[: len(seeds)], top_ps[: len(seeds)], gens) for _ in range(20)
        ]
        return torch.stack(out, dim=1).tolist()

    batched = run([7, 8, None], logits)
    alone = run([7], logits[:1])
    assert batched[0] == alone[0]  # neighbours do not change a seeded row
    assert batched[0] != batched[1]  # different seeds, different streams
    assert batched[2] == [int(logits[2].argmax())] * 20


def test_logprobs_match_log_softmax() -> None:
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(4))
    chosen_ids = torch.tensor([3, 17])
    chosen, tops = token_logprobs(logits, chosen_ids, 2)
    reference = torch.log_softmax(logits, dim=-1)
    assert chosen == [float(reference[0, 3]), float(reference[1, 17])]
    for row in range(2):
        values, ids = reference[row].topk(2)
        assert [t for t, _ in tops[row]] == ids.tolist()
        assert [v for _, v in tops[row]] == values.tolist()


def test_uniform_stream_draws_what_the_generator_draws_one_by_one() -> None:
    """Drawing a block at a time changes no number: the engine's rows sample the same tokens as
    one torch.rand per token would."""
    one_by_one = make_generator(11)
    expected = [torch.rand((), generator=one_by_one).item() for _ in range(150)]
    stream = UniformStream(make_generator(11), block=64)
    assert [stream.next() for _ in range(150)] == expected
    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(5))
    temps, top_ps = torch.tensor([0.8, 1.2]), torch.tensor([1.0, 0.7])
    plain = [make_generator(1), make_generator(2)]
    streams = [UniformStream(make_generator(1)), UniformStream(make_generator(2))]
    for _ in range(30):
        a = sample_tokens(logits, temps, top_ps, plain)  # type: ignore[arg-type]
        assert torch.equal(a, sample_tokens(logits, temps, top_ps, streams))

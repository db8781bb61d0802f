"""The continuous-batching engine against `generate` on the same tiny model (no Ray).

python -m pytest -q tests/unit/test_generation_engine.py
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fmray.generation.engine import EngineOverloaded, EngineStopped, LLMEngine, TokenEvent
from fmray.generation.sampling import SamplingParams

PROMPTS = [
    "Anton has a purple dog.",
    "Hugo lives in Rome. Hugo has a blue turtle. Hugo is",
    "30 minus 8 is",
    "Grace works as a doctor. Grace lives in Paris. Grace has a purple dog. 27 minus 1 is 26.",
    "Emma",
]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> torch.nn.Module:
    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(tiny_model_dir: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def reference(model: torch.nn.Module, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from transformers' own generate (stops at EOS like the engine)."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(ids) :].tolist()


def greedy(max_tokens: int, eos: int = 0) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=(eos,))


async def collect(engine: LLMEngine, ids: list[int], params: SamplingParams) -> list[TokenEvent]:
    return [event async for event in engine.generate(ids, params)]


def tokens(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events]


def test_concurrent_greedy_equals_generate(model, prompt_ids) -> None:
    """Different prompt lengths and limits in one batch: each row equals its solo generate."""
    limits = [24, 5, 17, 30, 1]
    refs = [reference(model, ids, n) for ids, n in zip(prompt_ids, limits, strict=True)]
    engine = LLMEngine(model, context_len=512, max_batch_size=8)
    engine.start()

    async def run() -> list[list[TokenEvent]]:
        calls = [collect(engine, ids, greedy(n)) for ids, n in zip(prompt_ids, limits, strict=True)]
        return await asyncio.gather(*calls)

    try:
        results = asyncio.run(run())
    finally:
        engine.shutdown()
    for events, ref, limit in zip(results, refs, limits, strict=True):
        assert tokens(events) == ref
        expected = "stop" if ref[-1] == 0 and len(ref) < limit else "length"
        assert events[-1].finish_reason == expected
        assert all(e.finish_reason is None for e in events[:-1])


def test_requests_join_and_leave_at_token_boundaries(model, prompt_ids) -> None:
    """Step by hand: a late request joins a running batch, a short one leaves it early."""
    engine = LLMEngine(model, context_len=512, max_batch_size=8)

    async def run() -> None:
        long_seq = engine.submit(prompt_ids[3], greedy(20))
        engine.step()
        engine.step()
        assert engine.running == [long_seq] and long_seq.num_generated == 3
        short_seq = engine.submit(prompt_ids[2], greedy(3))
        engine.step()  # joins: prefill gives its first token, then one shared decode step
        assert engine.running == [long_seq, short_seq]
        assert (long_seq.num_generated, short_seq.num_generated) == (4, 2)
        engine.step()  # the short one finishes and leaves; the long one goes on
        assert engine.running == [long_seq] and engine.batch.num_rows == 1
        while engine.running:
            engine.step()
        await asyncio.sleep(0)  # let call_soon_threadsafe deliveries land
        for seq, limit in ((long_seq, 20), (short_seq, 3)):
            got = [e.token_id for batch in _drain(seq.queue) for e in batch]
            ref = reference(model, seq.prompt_ids, limit)
            assert got == ref

    with torch.inference_mode():
        asyncio.run(run())


def _drain(queue: asyncio.Queue) -> list:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def test_seeded_sampling_is_independent_of_the_batch(model, prompt_ids) -> None:
    """A seeded row samples the same alone and beside other rows; greedy rows stay greedy."""
    sampled = [
        SamplingParams(max_tokens=12, temperature=t, top_p=p, seed=s)
        for t, p, s in ((0.7, 1.0, 1), (1.3, 0.9, 2), (1.0, 0.5, 3), (0.9, 0.95, 1))
    ]
    engine = LLMEngine(model, context_len=512, max_batch_size=16)
    engine.start()

    async def run() -> tuple[list, list, list]:
        mixed = [collect(engine, prompt_ids[i % 5], p) for i, p in enumerate(sampled)]
        mixed += [collect(engine, prompt_ids[1], greedy(12, eos=-1))]
        together = await asyncio.gather(*mixed)
        alone = [await collect(engine, prompt_ids[i % 5], p) for i, p in enumerate(sampled)]
        reseeded = await collect(engine, prompt_ids[0], SamplingParams(12, 0.7, 1.0, seed=99))
        return together, alone, reseeded

    try:
        together, alone, reseeded = asyncio.run(run())
    finally:
        engine.shutdown()
    for a, b in zip(together[:4], alone, strict=True):
        assert tokens(a) == tokens(b)
    assert tokens(together[4]) == reference(model, prompt_ids[1], 12)[:12]
    assert tokens(reseeded) != tokens(alone[0])  # the seed, not the prompt, drives sampling
    assert tokens(together[0]) != tokens(together[3])  # same seed, different prompt


def test_abort_overload_and_shutdown(model, prompt_ids) -> None:
    engine = LLMEngine(model, context_len=512, max_batch_size=1, max_waiting=1)
    engine.start()

    async def run() -> None:
        first = engine.submit(prompt_ids[0], greedy(400, eos=-1))
        second = engine.submit(prompt_ids[1], greedy(400, eos=-1))
        with pytest.raises(EngineOverloaded):
            engine.submit(prompt_ids[2], greedy(4))
        engine.abort(first)
        engine.abort(second)
        for seq in (first, second):
            events = [e async for e in engine.stream(seq)]
            assert events[-1].finish_reason == "abort"
        assert len(await collect(engine, prompt_ids[2], greedy(4, eos=-1))) == 4

    asyncio.run(run())
    assert engine.stats()["running"] == 0
    engine.shutdown(drain_timeout_s=1.0)
    with pytest.raises(EngineStopped):
        asyncio.run(collect(engine, prompt_ids[0], greedy(2)))


def test_failed_forward_fails_its_requests_not_the_engine(model, prompt_ids, monkeypatch) -> None:
    engine = LLMEngine(model, context_len=512)
    engine.start()
    forward = model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    try:
        failed = asyncio.run(collect(engine, prompt_ids[0], greedy(6, eos=-1)))
        assert failed[-1].finish_reason == "error" and "injected" in (failed[-1].error or "")
        monkeypatch.setattr(model, "forward", forward)
        ok = asyncio.run(collect(engine, prompt_ids[0], greedy(6)))
        assert tokens(ok) == reference(model, prompt_ids[0], 6)
        engine.check_health()
    finally:
        engine.shutdown()


def test_context_window_ends_generation(model, prompt_ids) -> None:
    ids = prompt_ids[3]
    engine = LLMEngine(model, context_len=len(ids) + 3)
    engine.start()
    try:
        events = asyncio.run(collect(engine, ids, greedy(50, eos=-1)))
    finally:
        engine.shutdown()
    assert len(events) == 3 and events[-1].finish_reason == "length"


def test_logprobs_are_the_models_distribution(model, prompt_ids) -> None:
    ids = prompt_ids[2]
    engine = LLMEngine(model, context_len=512)
    engine.start()
    params = SamplingParams(max_tokens=1, temperature=0.0, num_logprobs=3)
    try:
        (event,) = asyncio.run(collect(engine, ids, params))
    finally:
        engine.shutdown()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], dim=-1)
    top = logprobs.topk(3)
    assert event.token_id == int(top.indices[0])
    assert event.logprob == pytest.approx(float(top.values[0]), abs=1e-5)
    assert [t for t, _ in event.top_logprobs or []] == top.indices.tolist()


def test_non_streaming_sequences_get_their_events_at_the_end(model, prompt_ids) -> None:
    engine = LLMEngine(model, context_len=512)

    async def run() -> None:
        held = engine.submit(prompt_ids[0], greedy(5, eos=-1), stream=False)
        streamed = engine.submit(prompt_ids[1], greedy(5, eos=-1))
        while engine.running or engine.waiting or engine._incoming:
            engine.step()
        await asyncio.sleep(0)
        deliveries = _drain(held.queue)
        assert len(deliveries) == 1 and len(deliveries[0]) == 5  # one wake-up, all tokens
        assert len(_drain(streamed.queue)) > 1
        assert [e.token_id for e in deliveries[0]] == reference(model, prompt_ids[0], 5)

    with torch.inference_mode():
        asyncio.run(run())


def test_long_generations_outgrow_the_preallocated_cache(model, prompt_ids) -> None:
    """150 tokens: the KV buffers and the mask grow past their spare room at least once."""
    engine = LLMEngine(model, context_len=512)
    engine.start()

    async def run() -> list[list[TokenEvent]]:
        calls = [collect(engine, ids, greedy(150, eos=-1)) for ids in prompt_ids[:3]]
        return await asyncio.gather(*calls)

    try:
        results = asyncio.run(run())
    finally:
        engine.shutdown()
    for ids, events in zip(prompt_ids, results, strict=False):
        ref = model.generate(
            torch.tensor([ids]), max_new_tokens=150, do_sample=False, eos_token_id=None
        )
        assert tokens(events) == ref[0, len(ids) :].tolist()


def test_shutdown_drains_live_sequences_then_reports_unhealthy(model, prompt_ids) -> None:
    engine = LLMEngine(model, context_len=512)
    engine.start()

    async def run() -> list[TokenEvent]:
        seq = engine.submit(prompt_ids[0], greedy(40, eos=-1))
        stopper = asyncio.get_running_loop().run_in_executor(None, engine.shutdown, 30.0)
        events = [event async for event in engine.stream(seq)]
        await stopper
        return events

    events = asyncio.run(run())
    assert len(events) == 40 and events[-1].finish_reason == "length"  # finished, not aborted
    with pytest.raises(RuntimeError, match="not running"):
        engine.check_health()


def test_generate_batch_runs_in_the_callers_thread(model, prompt_ids) -> None:
    """RL's path: more sequences than max_batch_size, no engine thread; greedy rows equal
    generate, seeded rows equal the threaded engine's, and a failed forward raises."""
    limits = [24, 5, 17, 30, 1]
    params = [greedy(n) for n in limits] + [SamplingParams(12, 0.9, 0.95, seed=s) for s in (1, 2)]
    prompts = prompt_ids + prompt_ids[:2]
    engine = LLMEngine(model, context_len=512, max_batch_size=3)
    results = engine.generate_batch(prompts, params)
    assert engine.stats()["running"] == 0 and engine.stats()["live"] == 0
    for events, ids, limit in zip(results[:5], prompt_ids, limits, strict=True):
        assert tokens(events) == reference(model, ids, limit)
        assert events[-1].finish_reason in ("stop", "length")
    threaded = LLMEngine(model, context_len=512)
    threaded.start()
    try:
        for ids, seq_params, events in zip(prompts[5:], params[5:], results[5:], strict=True):
            assert tokens(asyncio.run(collect(threaded, ids, seq_params))) == tokens(events)
    finally:
        threaded.shutdown()
    with pytest.raises(ValueError, match="prompt needs"):
        engine.generate_batch([list(range(600))], [greedy(2)])

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    engine.model.forward = broken
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            engine.generate_batch(prompt_ids[:1], [greedy(3)])
    finally:
        del engine.model.forward


def test_rows_that_finish_ride_along_until_compacted(model, prompt_ids) -> None:
    """Rows finish one by one below the compaction threshold, while new sequences join (some
    with a prompt already in the batch, prefilled once): every greedy row still equals its solo
    generate, and a seeded row samples what it samples alone."""
    limits = [3, 4, 5, 6, 7, 30, 30, 30, 30, 30, 30, 30, 8, 12, 20, 2]
    prompts = [prompt_ids[i % 5] for i in range(len(limits))]
    params = [greedy(n, eos=-1) for n in limits]
    params[9] = SamplingParams(14, 0.8, 1.0, seed=5)  # a prompt three other rows share
    engine = LLMEngine(model, context_len=512, max_batch_size=12)
    seen_dead = []
    step = engine.step

    def spying_step() -> None:
        step()
        seen_dead.append(engine.batch.num_dead)

    engine.step = spying_step  # type: ignore[method-assign]
    results = engine.generate_batch(prompts, params)
    assert max(seen_dead) > 0  # finished rows did stay in the batch for a while
    for events, ids, limit, seq_params in zip(results, prompts, limits, params, strict=True):
        if seq_params.greedy:
            assert tokens(events) == reference(model, ids, limit)
        assert events[-1].finish_reason == "length"
    alone = LLMEngine(model, context_len=512).generate_batch([prompts[9]], [params[9]])
    assert tokens(alone[0]) == tokens(results[9])

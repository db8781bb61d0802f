"""Continuous-batching generation engine: one shared forward per step, for serving and RL.

    python -m pytest -q tests/unit/test_generation_engine.py
    python bench/serve_llm.py --preset tiny        # against generate() and transformers' CB
    python bench/rollout.py                        # RL rollouts against HF generate

Serving runs it on a background thread (`start`, then `submit`/`stream` from any event loop);
RL rollouts drive the same steps in the caller's thread (`generate_batch`), so both share one
decoder.

Each step (1) admits waiting sequences: their prompts are prefilled together (right-padded, so
causal attention never sees the padding) and their first token is sampled at once; (2) runs one
decode forward for every running sequence over the left-padded batch KV cache (`BatchKV`);
(3) drops the sequences that finished (their KV rows are reclaimed in bulk, see kv_batch). So a
request joins and leaves at a token boundary and a short request is never held behind a long
one. Events go back to each request's asyncio queue with one `call_soon_threadsafe` per event
loop per step (a non-streaming sequence gets all of its events at once when it ends).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from fmray.generation.kv_batch import BatchKV
from fmray.generation.sampling import (
    SamplingParams,
    UniformStream,
    make_generator,
    sample_tokens,
    token_logprobs,
)

logger = logging.getLogger(__name__)


class EngineOverloaded(RuntimeError):
    """The engine already holds max_batch_size + max_waiting sequences."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new sequences."""


@dataclass
class TokenEvent:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    """None while generating; then 'stop', 'length', 'abort' or 'error'."""
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop | None
    """The requester's event loop; None for a sequence run in the caller's thread, whose
    events collect in `queue`'s place, `done_events`."""
    queue: asyncio.Queue[list[TokenEvent]] | None
    generator: UniformStream | None = None
    stream: bool = True
    """False: events are held and delivered together when the sequence ends (one wake-up of the
    request's event loop instead of one per token: fewer GIL hand-offs in a busy replica)."""
    held: list[TokenEvent] = field(default_factory=list)
    done_events: list[TokenEvent] = field(default_factory=list)
    num_generated: int = 0
    last_token: int = -1
    finished: bool = False
    limit: int = 0
    """Tokens it may generate: max_tokens, or fewer where the context window ends first."""


class LLMEngine:
    """Continuous batching over any HF causal LM whose forward takes `cache` and `position_ids`."""

    def __init__(
        self,
        model: PreTrainedModel,
        context_len: int,
        max_batch_size: int = 16,
        max_waiting: int = 64,
        max_prefill_tokens: int = 4096,
        stall_timeout_s: float = 60.0,
    ) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.context_len = context_len
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.stall_timeout_s = stall_timeout_s
        # sdpa takes a ready boolean mask; other attention kernels get HF's 2D -> 4D conversion
        sdpa = getattr(model.config, "_attn_implementation", None) == "sdpa"
        self.batch = BatchKV(self.device, mask_4d=sdpa)
        self.running: list[Sequence] = []
        self._sampling_rows: list[Sequence] = []
        self._sampling_inputs: tuple[torch.Tensor, torch.Tensor, list] | None = None
        self.waiting: deque[Sequence] = deque()
        self._incoming: list[Sequence] = []
        self._aborted: set[Sequence] = set()
        self._num_live = 0
        self._accepting = True
        self._stop = False
        self._wake = threading.Condition()
        self._heartbeat = time.monotonic()
        self._thread: threading.Thread | None = None
        self.num_steps = 0
        self.num_generated_tokens = 0

    # ---- request side (any thread / event loop) ----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fmray-llm-engine", daemon=True)
        self._thread.start()

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, stream: bool = True
    ) -> Sequence:
        """Queue a sequence; its events arrive on `seq.queue` in the calling event loop."""
        if not prompt_ids or len(prompt_ids) >= self.context_len:
            raise ValueError(f"prompt needs 1..{self.context_len - 1} tokens")
        loop = asyncio.get_running_loop()
        seq = self._sequence(prompt_ids, params, loop, asyncio.Queue(), stream)
        with self._wake:
            if not self._accepting:
                raise EngineStopped("the engine is shutting down")
            if self._num_live >= self.max_batch_size + self.max_waiting:
                raise EngineOverloaded(
                    f"{self._num_live} sequences are running or waiting "
                    f"(max_batch_size {self.max_batch_size} + max_waiting {self.max_waiting})"
                )
            self._num_live += 1
            self._incoming.append(seq)
            self._wake.notify()
        return seq

    def abort(self, seq: Sequence) -> None:
        with self._wake:
            if seq.finished:
                return
            if seq in self._incoming:  # not scheduled yet: free its place right away
                self._incoming.remove(seq)
                seq.finished = True
                self._num_live -= 1
                self._deliver({seq: [TokenEvent(-1, finish_reason="abort")]})
                return
            self._aborted.add(seq)
            self._wake.notify()

    def generate_batch(
        self, prompts: list[list[int]], params: list[SamplingParams]
    ) -> list[list[TokenEvent]]:
        """Run sequences to completion in the calling thread (the engine thread is not started):
        continuous batching over the prompts, at most max_batch_size at a time. Returns each
        sequence's events in order; the last one carries its finish reason ('stop' or
        'length'). A failed forward raises instead of failing its sequences."""
        if self._thread is not None:
            raise RuntimeError("generate_batch needs an engine whose thread is not started")
        seqs = []
        for prompt_ids, seq_params in zip(prompts, params, strict=True):
            if not prompt_ids or len(prompt_ids) >= self.context_len:
                raise ValueError(f"prompt needs 1..{self.context_len - 1} tokens")
            seqs.append(self._sequence(prompt_ids, seq_params, None, None, False))
        self.waiting.extend(seqs)
        self._num_live += len(seqs)
        with torch.inference_mode():
            while self.waiting or self.running:
                self.step()
        for seq in seqs:
            last = seq.done_events[-1]
            if last.finish_reason == "error":
                raise RuntimeError(f"generation failed: {last.error}")
        return [seq.done_events for seq in seqs]

    def _sequence(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop | None,
        queue: asyncio.Queue[list[TokenEvent]] | None,
        stream: bool,
    ) -> Sequence:
        uniforms = None if params.greedy else UniformStream(make_generator(params.seed))
        seq = Sequence(list(prompt_ids), params, loop, queue, uniforms, stream)
        seq.limit = min(params.max_tokens, self.context_len - len(prompt_ids))
        return seq

    async def stream(self, seq: Sequence) -> AsyncIterator[TokenEvent]:
        """Token events of a submitted sequence; closing the iterator early aborts it."""
        done = False
        try:
            while not done:
                for event in await seq.queue.get():
                    done = event.finish_reason is not None
                    yield event
        finally:
            if not done:
                self.abort(seq)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        """Submit and stream one sequence."""
        seq = self.submit(prompt_ids, params)
        async with aclosing(self.stream(seq)) as events:
            async for event in events:
                yield event

    def check_health(self) -> None:
        """Raise when the engine thread died or stopped making progress."""
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the engine thread is not running")
        stalled = time.monotonic() - self._heartbeat
        if stalled > self.stall_timeout_s:
            raise RuntimeError(f"the engine made no progress for {stalled:.0f}s")

    def stats(self) -> dict[str, Any]:
        return {
            "live": self._num_live,
            "running": len(self.running),
            "waiting": len(self.waiting) + len(self._incoming),
            "steps": self.num_steps,
            "generated_tokens": self.num_generated_tokens,
        }

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Stop taking sequences, let the live ones finish (up to the timeout), then stop."""
        with self._wake:
            self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while self._num_live > 0 and time.monotonic() < deadline and self._is_alive():
            time.sleep(0.02)
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10.0)

    def _is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- engine thread ----

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    if self._stop:
                        break
                    if not (self._incoming or self.waiting or self.running or self._aborted):
                        self._wake.wait(timeout=0.5)
                    self._heartbeat = time.monotonic()
                self.step()
        self._finish_all(self.running + list(self.waiting) + self._incoming, "abort")

    def step(self) -> None:
        """One scheduling round: take arrivals and aborts, prefill joiners, decode the batch."""
        events: dict[Sequence, list[TokenEvent]] = {}
        self._take_incoming(events)
        joined = self._admit()
        if joined:
            self._guarded(self._prefill, joined, events)
        if self.running:
            self._guarded(self._decode, list(self.running), events)
        self._deliver(events)
        self.num_steps += 1
        if not self.running:  # hold no finished sequences through the sampling cache
            self._sampling_rows, self._sampling_inputs = [], None

    def _take_incoming(self, events: dict[Sequence, list[TokenEvent]]) -> None:
        with self._wake:
            self.waiting.extend(self._incoming)
            self._incoming.clear()
            aborted, self._aborted = self._aborted, set()
        if not aborted:
            return
        self.waiting = deque(s for s in self.waiting if s not in aborted)
        self._drop_running(aborted)
        for seq in aborted:
            self._finish(seq, TokenEvent(-1, finish_reason="abort"), events)

    def _admit(self) -> list[Sequence]:
        """Waiting sequences (FIFO) that fit in the batch and this step's prefill budget."""
        joined: list[Sequence] = []
        width = 0
        while self.waiting and len(self.running) + len(joined) < self.max_batch_size:
            width = max(width, len(self.waiting[0].prompt_ids))
            if joined and width * (len(joined) + 1) > self.max_prefill_tokens:
                break
            joined.append(self.waiting.popleft())
        return joined

    def _prefill(self, seqs: list[Sequence], events: dict[Sequence, list[TokenEvent]]) -> None:
        # Equal prompts (GRPO's G samples of a prompt, a request's n choices) are prefilled once
        # and share the KV rows and logits; each sequence still samples from its own stream.
        prompts: dict[tuple[int, ...], int] = {}
        sources = [prompts.setdefault(tuple(s.prompt_ids), len(prompts)) for s in seqs]
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.tensor([list(p) + [0] * (width - len(p)) for p in prompts])
        last = torch.tensor([[n - 1] for n in lengths], device=self.device)
        cache = DynamicCache()
        # logits only where each prompt ends: the lm_head over a long prompt is the costly part
        out = self.model(
            input_ids=ids.to(self.device), cache=cache, use_cache=True, logits_to_keep=last
        )
        logits = out.logits[:, -1]
        if len(prompts) < len(seqs):
            logits = logits.index_select(0, torch.tensor(sources, device=self.device))
        tokens, alive = self._sample(seqs, logits, events)
        if not alive:
            return
        if len(alive) < len(seqs):
            tokens = tokens.index_select(0, torch.tensor(alive, device=self.device))
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        alive_sources = [sources[i] for i in alive]
        self.batch.append(layers, alive_sources, [lengths[i] for i in alive_sources], tokens)
        self.running.extend(seqs[i] for i in alive)

    def _decode(self, seqs: list[Sequence], events: dict[Sequence, list[TokenEvent]]) -> None:
        ids, cache, mask, positions = self.batch.decode_inputs()
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
        )
        logits = out.logits[:, -1]
        if self.batch.live_rows is not None:  # finished rows still in the batch: skip them
            logits = logits.index_select(0, self.batch.live_rows)
        tokens, alive = self._sample(seqs, logits, events)
        self.batch.advance(tokens)
        if len(alive) < len(seqs):
            kept = set(alive)
            self._drop_running({seq for row, seq in enumerate(seqs) if row not in kept})

    def _sample(
        self, seqs: list[Sequence], logits: torch.Tensor, events: dict[Sequence, list[TokenEvent]]
    ) -> tuple[torch.Tensor, list[int]]:
        """Pick each row's next token, emit it; return the tokens and the rows that go on."""
        tokens = sample_tokens(logits, *self._sampling_params(seqs))
        token_list = tokens.tolist()
        logprob_rows = self._logprobs(seqs, logits, tokens)
        self.num_generated_tokens += len(seqs)
        alive = []
        chosen = top = None
        for row, (seq, token) in enumerate(zip(seqs, token_list, strict=True)):
            seq.last_token = token
            seq.num_generated += 1
            if token in seq.params.stop_token_ids:
                reason: str | None = "stop"
            elif seq.num_generated >= seq.limit:
                reason = "length"
            else:
                reason = None
            if logprob_rows:
                chosen, top = logprob_rows.get(row, (None, None))
            event = TokenEvent(token, chosen, top, reason)
            if reason is not None:
                self._finish(seq, event, events)
            elif seq.stream:
                events.setdefault(seq, []).append(event)
                alive.append(row)
            else:
                seq.held.append(event)
                alive.append(row)
        return tokens, alive

    def _sampling_params(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Temperatures, top-ps and random streams per row; a decode step reuses the previous
        step's while the running rows stay the same."""
        if self._sampling_inputs is None or self._sampling_rows != seqs:
            temperatures = [s.params.temperature for s in seqs]
            top_ps = [s.params.top_p for s in seqs]
            self._sampling_rows = list(seqs)
            self._sampling_inputs = (
                torch.tensor(temperatures, dtype=torch.float32, device=self.device),
                torch.tensor(top_ps, dtype=torch.float32, device=self.device),
                [s.generator for s in seqs],
            )
        return self._sampling_inputs

    def _logprobs(
        self, seqs: list[Sequence], logits: torch.Tensor, tokens: torch.Tensor
    ) -> dict[int, tuple[float, list[tuple[int, float]]]]:
        rows = [i for i, s in enumerate(seqs) if s.params.num_logprobs is not None]
        if not rows:
            return {}
        num_top = max(seqs[i].params.num_logprobs or 0 for i in rows)
        index = torch.tensor(rows, device=self.device)
        chosen, tops = token_logprobs(logits[index], tokens[index], num_top)
        return {
            row: (chosen[j], tops[j][: seqs[row].params.num_logprobs]) for j, row in enumerate(rows)
        }

    def _finish(
        self, seq: Sequence, event: TokenEvent, events: dict[Sequence, list[TokenEvent]]
    ) -> None:
        with self._wake:
            if seq.finished:
                return
            seq.finished = True
            self._num_live -= 1
            self._aborted.discard(seq)
        events.setdefault(seq, []).extend(seq.held)
        events[seq].append(event)
        seq.held = []

    def _guarded(self, phase: Any, seqs: list[Sequence], events: dict) -> None:
        """Run a forward phase; if it fails, fail its sequences, never the engine."""
        try:
            phase(seqs, events)
        except Exception as err:  # noqa: BLE001 - one bad batch must not kill the replica
            logger.exception("engine step failed; failing %d sequences", len(seqs))
            failed = set(seqs)
            self._drop_running(failed)
            for seq in seqs:
                self._finish(seq, TokenEvent(-1, finish_reason="error", error=repr(err)), events)

    def _drop_running(self, gone: set[Sequence]) -> None:
        """Running sequences that finished, failed or were aborted leave the batch."""
        rows = [i for i, s in enumerate(self.running) if s in gone]
        if rows:
            self.running = [s for s in self.running if s not in gone]
            self.batch.drop(rows)

    def _finish_all(self, seqs: list[Sequence], reason: str) -> None:
        events: dict[Sequence, list[TokenEvent]] = {}
        for seq in seqs:
            self._finish(seq, TokenEvent(-1, finish_reason=reason), events)
        self._deliver(events)

    @staticmethod
    def _deliver(events: dict[Sequence, list[TokenEvent]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, list]]] = {}
        for seq, seq_events in events.items():
            if seq.loop is None or seq.queue is None:  # run in the caller's thread
                seq.done_events.extend(seq_events)
                continue
            by_loop.setdefault(seq.loop, []).append((seq.queue, seq_events))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the request's event loop is closed: nobody is listening
                pass


def _put_all(items: list[tuple[asyncio.Queue, list[TokenEvent]]]) -> None:
    for queue, seq_events in items:
        queue.put_nowait(seq_events)

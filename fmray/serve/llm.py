"""One served model, in-process: OpenAI request -> prompts -> engine -> OpenAI response or SSE.

    python bench/serve_llm.py --preset tiny     # uses it directly as the no-HTTP reference

A Serve replica (`fmray.serve.deployment.LLMDeployment`) holds exactly one `LLMServer`; the
unit tests and the benchmark use it without Ray. Streams raise every request error before their
first chunk, so the ingress can still answer with a proper status code.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fmray.data.chat_template import stop_token_ids
from fmray.generation.engine import EngineOverloaded, EngineStopped, LLMEngine, Sequence
from fmray.serve.config import EngineSection
from fmray.serve.detokenize import TextAssembler
from fmray.serve.errors import internal_error, overloaded
from fmray.serve.loading import context_length, load_model, load_serving_tokenizer
from fmray.serve.prompts import ChoiceJob, PromptBuilder
from fmray.serve.responses import ChoiceDelta, ChoiceState, ResponseBuilder
from fmray.serve.schemas import (
    SSE_DONE,
    ChatCompletionRequest,
    ChatDelta,
    CompletionRequest,
    ModelCard,
    new_id,
    now,
    sse,
)


class LLMServer:
    def __init__(
        self,
        name: str,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        engine: EngineSection,
        retry_after_s: float = 1.0,
    ) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self.context_len = context_length(model, tokenizer, engine.max_model_len)
        self.engine = LLMEngine(
            model,
            self.context_len,
            max_batch_size=engine.max_batch_size,
            max_waiting=engine.max_waiting,
            max_prefill_tokens=engine.max_prefill_tokens,
            stall_timeout_s=engine.stall_timeout_s,
        )
        self.prompts = PromptBuilder(
            tokenizer, self.context_len, stop_token_ids(tokenizer, model.generation_config)
        )
        self.retry_after_s = retry_after_s
        self.created = now()
        self.model_dir: Path | None = None

    @classmethod
    def load(
        cls,
        name: str,
        path: str,
        tokenizer: str | None = None,
        engine: EngineSection | None = None,
        num_gpus: float = 0.0,
        retry_after_s: float = 1.0,
    ) -> LLMServer:
        engine = engine or EngineSection()
        model, model_dir = load_model(path, engine.dtype, num_gpus)
        server = cls(
            name, model, load_serving_tokenizer(model_dir, tokenizer), engine, retry_after_s
        )
        server.model_dir = model_dir
        return server

    def start(self) -> LLMServer:
        self.engine.start()
        return self

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        self.engine.shutdown(drain_timeout_s)

    def card(self) -> ModelCard:
        return ModelCard(id=self.name, created=self.created, max_model_len=self.context_len)

    # ---- /v1/completions ----

    async def completion(self, request: CompletionRequest) -> dict:
        jobs = self.prompts.completion_jobs(request)
        out = ResponseBuilder(self.tokenizer, request.model, new_id("cmpl"), now())
        choices = await self._collect(jobs)
        return out.completion(choices, out.usage(_prompt_tokens(jobs), choices)).model_dump()

    async def completion_stream(self, request: CompletionRequest) -> AsyncIterator[str]:
        jobs = self.prompts.completion_jobs(request)
        out = ResponseBuilder(self.tokenizer, request.model, new_id("cmpl"), now())
        choices = {job.index: ChoiceState(job.index) for job in jobs}
        async with aclosing(self._deltas(jobs)) as deltas:
            async for delta in deltas:
                offset = len(choices[delta.index].text)
                choices[delta.index].add(delta)
                if delta.text or delta.finish_reason or delta.logprob is not None:
                    yield sse(out.completion_chunk(delta, offset))
        if request.include_usage():
            usage = out.usage(_prompt_tokens(jobs), list(choices.values()))
            yield sse(out.completion_usage_chunk(usage))
        yield SSE_DONE

    # ---- /v1/chat/completions ----

    async def chat(self, request: ChatCompletionRequest) -> dict:
        jobs = self.prompts.chat_jobs(request)
        out = ResponseBuilder(self.tokenizer, request.model, new_id("chatcmpl"), now())
        choices = await self._collect(jobs)
        return out.chat(choices, out.usage(_prompt_tokens(jobs), choices)).model_dump()

    async def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[str]:
        jobs = self.prompts.chat_jobs(request)
        out = ResponseBuilder(self.tokenizer, request.model, new_id("chatcmpl"), now())
        choices = {job.index: ChoiceState(job.index) for job in jobs}
        async with aclosing(self._deltas(jobs)) as deltas:
            for job in jobs:  # OpenAI opens every choice with the role
                yield sse(out.chat_chunk(job.index, ChatDelta(role="assistant", content="")))
            async for delta in deltas:
                choices[delta.index].add(delta)
                if delta.text or delta.finish_reason or delta.logprob is not None:
                    content = ChatDelta(content=delta.text) if delta.text else ChatDelta()
                    yield sse(out.chat_chunk(delta.index, content, delta))
        if request.include_usage():
            usage = out.usage(_prompt_tokens(jobs), list(choices.values()))
            yield sse(out.chat_usage_chunk(usage))
        yield SSE_DONE

    # ---- shared ----

    async def _collect(self, jobs: list[ChoiceJob]) -> list[ChoiceState]:
        choices = {job.index: ChoiceState(job.index) for job in jobs}
        async with aclosing(self._deltas(jobs, incremental=False)) as deltas:
            async for delta in deltas:
                choices[delta.index].add(delta)
        return [choices[i] for i in sorted(choices)]

    async def _deltas(
        self, jobs: list[ChoiceJob], incremental: bool = True
    ) -> AsyncIterator[ChoiceDelta]:
        """Deltas of all choices as they come. Submits everything before the first yield, so
        overload errors surface before a stream starts; closing early aborts what is left.
        `incremental=False`: text may arrive only with the last delta (whole responses)."""
        seqs = self._submit(jobs, incremental)
        if len(jobs) == 1:
            async with aclosing(self._choice(jobs[0], seqs[0], incremental)) as deltas:
                async for delta in deltas:
                    yield delta
            return
        queue: asyncio.Queue[ChoiceDelta | BaseException] = asyncio.Queue()
        pumps = [
            self._pump(self._choice(job, seq, incremental), queue)
            for job, seq in zip(jobs, seqs, strict=True)
        ]
        tasks = [asyncio.create_task(pump) for pump in pumps]
        remaining = len(jobs)
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                remaining -= item.finish_reason is not None
        finally:
            for task in tasks:
                task.cancel()

    async def _pump(self, choice: AsyncIterator[ChoiceDelta], queue: asyncio.Queue) -> None:
        try:
            async with aclosing(choice) as deltas:  # type: ignore[type-var]
                async for delta in deltas:
                    queue.put_nowait(delta)
        except Exception as err:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait(err)

    def _submit(self, jobs: list[ChoiceJob], incremental: bool) -> list[Sequence]:
        seqs: list[Sequence] = []
        try:
            for job in jobs:
                # stop strings are matched as tokens arrive, so generation ends at the match
                stream = incremental or bool(job.stop)
                seqs.append(self.engine.submit(job.prompt_ids, job.params, stream))
        except (EngineOverloaded, EngineStopped) as err:
            for seq in seqs:
                self.engine.abort(seq)
            status = 429 if isinstance(err, EngineOverloaded) else 503
            message = f"{self.name} is overloaded: {err}"
            raise overloaded(message, status, self.retry_after_s) from None
        return seqs

    async def _choice(
        self, job: ChoiceJob, seq: Sequence, incremental: bool = True
    ) -> AsyncIterator[ChoiceDelta]:
        # logprobs' text_offset needs the text as it grows
        incremental = incremental or job.params.num_logprobs is not None
        text = TextAssembler(self.tokenizer, job.prompt_ids, job.stop, incremental)
        async with aclosing(self.engine.stream(seq)) as events:
            async for event in events:
                if event.finish_reason == "error":
                    raise internal_error(f"generation failed: {event.error}")
                if event.finish_reason == "abort":
                    raise overloaded(f"{self.name} is shutting down", 503, self.retry_after_s)
                delta = text.add(event.token_id)
                finish = "stop" if text.stopped else event.finish_reason
                if finish is not None:
                    delta += text.flush()
                top = event.top_logprobs
                yield ChoiceDelta(job.index, delta, event.token_id, event.logprob, top, finish)
                if finish is not None:
                    return  # leaving closes `events`, which aborts a sequence cut by a stop string


def _prompt_tokens(jobs: list[ChoiceJob]) -> int:
    """Prompt tokens counted once per prompt, not once per choice."""
    seen: dict[int, int] = {}
    for job in jobs:
        seen.setdefault(id(job.prompt_ids), len(job.prompt_ids))
    return sum(seen.values())


def set_torch_threads(num_cpus: float) -> None:
    """Match torch's intra-op threads to the CPUs the replica reserved."""
    torch.set_num_threads(max(1, int(num_cpus)))

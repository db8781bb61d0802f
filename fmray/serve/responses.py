"""Engine output -> OpenAI bodies: whole responses, SSE chunks, usage and both logprob formats.

    python -m pytest -q tests/unit/test_generation_engine.py

`/v1/completions` reports logprobs as parallel lists (tokens, token_logprobs, top_logprobs,
text_offset); `/v1/chat/completions` as one object per token with its bytes. Both report the
model's raw distribution (before temperature / top-p), as OpenAI does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from fmray.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
)


@dataclass
class ChoiceDelta:
    """What one engine token added to one choice."""

    index: int
    text: str
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None


@dataclass
class ChoiceState:
    """A choice accumulated over its deltas (whole responses, and usage for streams)."""

    index: int
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    deltas: list[ChoiceDelta] = field(default_factory=list)

    def add(self, delta: ChoiceDelta) -> None:
        self.text += delta.text
        self.num_tokens += 1
        self.finish_reason = delta.finish_reason or self.finish_reason
        if delta.logprob is not None:
            self.deltas.append(delta)


class ResponseBuilder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, model: str, rid: str, created: int):
        self.tokenizer = tokenizer
        self.model = model
        self.rid = rid
        self.created = created

    def usage(self, prompt_tokens: int, choices: list[ChoiceState]) -> Usage:
        completion = sum(c.num_tokens for c in choices)
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            total_tokens=prompt_tokens + completion,
        )

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # ---- /v1/completions ----

    def completion(self, choices: list[ChoiceState], usage: Usage) -> CompletionResponse:
        return CompletionResponse(
            id=self.rid,
            created=self.created,
            model=self.model,
            choices=[
                CompletionChoice(
                    index=c.index,
                    text=c.text,
                    logprobs=self.completion_logprobs(c.deltas, 0) if c.deltas else None,
                    finish_reason=c.finish_reason,  # type: ignore[arg-type]
                )
                for c in choices
            ],
            usage=usage,
        )

    def completion_chunk(self, delta: ChoiceDelta, offset: int) -> CompletionResponse:
        logprobs = None if delta.logprob is None else self.completion_logprobs([delta], offset)
        choice = CompletionChoice(
            index=delta.index,
            text=delta.text,
            logprobs=logprobs,
            finish_reason=delta.finish_reason,  # type: ignore[arg-type]
        )
        return CompletionResponse(
            id=self.rid, created=self.created, model=self.model, choices=[choice]
        )

    def completion_usage_chunk(self, usage: Usage) -> CompletionResponse:
        return CompletionResponse(
            id=self.rid, created=self.created, model=self.model, choices=[], usage=usage
        )

    def completion_logprobs(self, deltas: list[ChoiceDelta], offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs(top_logprobs=[])
        for delta in deltas:
            out.tokens.append(self.token_text(delta.token_id))
            out.token_logprobs.append(delta.logprob or 0.0)
            tops = {self.token_text(t): lp for t, lp in delta.top_logprobs or []}
            out.top_logprobs.append(tops)  # type: ignore[union-attr]
            out.text_offset.append(offset)
            offset += len(delta.text)
        return out

    # ---- /v1/chat/completions ----

    def chat(self, choices: list[ChoiceState], usage: Usage) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=self.rid,
            created=self.created,
            model=self.model,
            choices=[
                ChatChoice(
                    index=c.index,
                    message=AssistantMessage(content=c.text),
                    logprobs=self.chat_logprobs(c.deltas) if c.deltas else None,
                    finish_reason=c.finish_reason,  # type: ignore[arg-type]
                )
                for c in choices
            ],
            usage=usage,
        )

    def chat_chunk(
        self, index: int, delta: ChatDelta, source: ChoiceDelta | None = None
    ) -> ChatCompletionChunk:
        logprobs = None
        if source is not None and source.logprob is not None:
            logprobs = self.chat_logprobs([source])
        finish = source.finish_reason if source is not None else None
        choice = ChatChunkChoice(
            index=index,
            delta=delta,
            logprobs=logprobs,
            finish_reason=finish,  # type: ignore[arg-type]
        )
        return ChatCompletionChunk(
            id=self.rid, created=self.created, model=self.model, choices=[choice]
        )

    def chat_usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.rid, created=self.created, model=self.model, choices=[], usage=usage
        )

    def chat_logprobs(self, deltas: list[ChoiceDelta]) -> ChatLogprobs:
        return ChatLogprobs(
            content=[
                TokenLogprob(
                    **self._top(d.token_id, d.logprob or 0.0).model_dump(),
                    top_logprobs=[self._top(t, lp) for t, lp in d.top_logprobs or []],
                )
                for d in deltas
            ]
        )

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.token_text(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

"""OpenAI requests -> engine work: token ids, sampling parameters and stop rules per choice.

    python -m pytest -q tests/unit/test_serve_prompts.py

Every check that can reject a request (template, token ids, context window) runs here, before
anything reaches the engine, so a bad request costs a tokenizer call and nothing else.
Choice i of a request with `seed` s samples with seed s + i: choices differ from each other and
a re-run with the same seed repeats all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from fmray.data.chat_template import end_of_turn_token_ids, render_chat
from fmray.generation.sampling import SamplingParams
from fmray.serve.errors import APIError, invalid_request
from fmray.serve.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields


@dataclass(frozen=True)
class ChoiceJob:
    """One choice of a response: what to feed the engine and when to stop."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str]


class PromptBuilder:
    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, context_len: int, eos_ids: list[int]
    ) -> None:
        self.tokenizer = tokenizer
        self.context_len = context_len
        self.eos_ids = tuple(eos_ids)
        self.chat_stop_ids = tuple(sorted({*eos_ids, *end_of_turn_token_ids(tokenizer)}))
        self.vocab_size = len(tokenizer)
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos_ids[0]
        self.empty_prompt_ids = [start]

    def completion_jobs(self, request: CompletionRequest) -> list[ChoiceJob]:
        prompts = [self._prompt_ids(p) for p in request.prompts()]
        params = ("prompt", "max_tokens")
        return self._jobs(
            request, prompts, request.max_tokens, request.logprobs, self.eos_ids, params
        )

    def chat_jobs(self, request: ChatCompletionRequest) -> list[ChoiceJob]:
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            text = render_chat(self.tokenizer, messages, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - a template's own raise_exception() lands here
            message = f"messages do not fit the chat template: {err}"
            raise invalid_request(message, "messages") from None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        limit = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        return self._jobs(
            request,
            [ids or self.empty_prompt_ids],
            request.token_limit(),
            request.num_logprobs(),
            self.chat_stop_ids,
            ("messages", limit),
        )

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
            return ids or self.empty_prompt_ids
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise invalid_request(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                "prompt",
            )
        return list(prompt)

    def _jobs(
        self,
        request: SamplingFields,
        prompts: list[list[int]],
        max_tokens: int | None,
        num_logprobs: int | None,
        stop_ids: tuple[int, ...],
        params_named: tuple[str, str],
    ) -> list[ChoiceJob]:
        """`params_named`: the request fields holding the prompt and the token limit."""
        jobs = []
        for p, ids in enumerate(prompts):
            budget = self._token_budget(ids, max_tokens, *params_named)
            for j in range(request.n):
                index = p * request.n + j
                params = SamplingParams(
                    max_tokens=budget,
                    temperature=request.temperature,
                    top_p=request.top_p,
                    seed=None if request.seed is None else request.seed + index,
                    num_logprobs=num_logprobs,
                    stop_token_ids=stop_ids,
                )
                jobs.append(ChoiceJob(index, ids, params, request.stop_sequences()))
        return jobs

    def _token_budget(
        self, ids: list[int], max_tokens: int | None, prompt_param: str, limit_param: str
    ) -> int:
        """Tokens this prompt may generate; 400 when the context window cannot hold them."""
        room = self.context_len - len(ids)
        if room < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context_len} tokens. However, "
                f"your prompt has {len(ids)} tokens. Please shorten your prompt.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context_len} tokens. However, "
                f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, "
                f"{max_tokens} for the completion). Please reduce {limit_param}.",
                param=limit_param,
                code="context_length_exceeded",
            )
        return max_tokens

"""OpenAI request validation -> OpenAI error bodies, and the chat template (no Ray).

python -m pytest -q tests/unit/test_serve_schemas.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from fmray.data.chat_template import DEFAULT_CHAT_TEMPLATE, chat_template_of, render_chat
from fmray.serve.errors import APIError, from_validation_error, overloaded
from fmray.serve.schemas import ChatCompletionRequest, CompletionRequest


def error_for(schema, body: dict) -> APIError:
    with pytest.raises(ValidationError) as info:
        schema.model_validate(body)
    return from_validation_error(info.value)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "m", "prompt": "x", "temperature": 3}, "temperature", "invalid_value"),
        ({"model": "m", "prompt": "x", "top_p": 0}, "top_p", "invalid_value"),
        ({"model": "m", "prompt": "x", "n": 0}, "n", "invalid_value"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"model": "m", "prompt": "x", "logprobs": 9}, "logprobs", "invalid_value"),
        ({"model": "m", "prompt": "x", "presence_penalty": 1.0}, "presence_penalty", None),
        ({"model": "m", "prompt": "x", "echo": True}, "echo", "invalid_value"),
        ({"model": "m", "prompt": "x", "temprature": 0.5}, "temprature", "unknown_parameter"),
        ({"model": "m"}, "prompt", "missing"),
        ({"prompt": "x"}, "model", "missing"),
    ],
)
def test_invalid_completion_fields_name_the_param(body: dict, param: str, code: str | None) -> None:
    err = error_for(CompletionRequest, body)
    assert err.status == 400 and err.param == param
    assert err.body()["error"]["type"] == "invalid_request_error"
    if code is not None:
        assert err.code == code


def test_request_level_rules() -> None:
    assert (
        "stop"
        in error_for(CompletionRequest, {"model": "m", "prompt": "x", "stop": ["a"] * 5}).message
    )
    assert (
        error_for(ChatCompletionRequest, {"model": "m", "messages": [], "max_tokens": 3}).param
        == "messages"
    )
    err = error_for(
        ChatCompletionRequest,
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
    )
    assert "logprobs" in err.message
    err = error_for(ChatCompletionRequest, {"model": "m", "messages": [{"role": "robot"}]})
    assert err.param == "messages.0.role"


def test_prompt_forms() -> None:
    def prompts(prompt):
        return CompletionRequest(model="m", prompt=prompt).prompts()

    assert prompts("hi") == ["hi"]
    assert prompts([1, 2, 3]) == [[1, 2, 3]]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]


def test_error_body_and_retry_after() -> None:
    err = overloaded("busy", 429, retry_after_s=1.2)
    assert err.body() == {
        "error": {
            "message": "busy",
            "type": "rate_limit_error",
            "param": None,
            "code": "overloaded",
        }
    }
    assert err.headers() == {"Retry-After": "2"}
    assert APIError(400, "x").headers() == {}


def test_default_chat_template_is_chatml(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert chat_template_of(tokenizer) == DEFAULT_CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert render_chat(tokenizer, messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )
    assert render_chat(tokenizer, messages[:2]).endswith("<|im_start|>assistant\n")
    out = tokenizer.apply_chat_template(
        messages,
        chat_template=DEFAULT_CHAT_TEMPLATE,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    trained = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(trained) == "Hello<|im_end|>"  # what an SFT loss should cover
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    assert render_chat(tokenizer, messages) == "Be brief."  # a model's own template wins

"""fmray's default chat format (ChatML), shared by fine-tuning and serving.

    python -c "import fmray.data.chat_template as t; print(t.DEFAULT_CHAT_TEMPLATE)"

A tokenizer that carries its own `chat_template` keeps it; one without (fmray's BPE tokenizers)
gets this template, which uses the `<|im_start|>` / `<|im_end|>` tokens that
`fmray.data.tokenizer` reserves. Assistant turns sit inside `{% generation %}` blocks, so
`tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the tokens
a fine-tuning loss should cover (the reply and its `<|im_end|>`).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_template_of(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's own chat template, else fmray's ChatML default."""
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template else DEFAULT_CHAT_TEMPLATE


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text of a conversation (special tokens included as text)."""
    return tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template_of(tokenizer),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def end_of_turn_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an assistant turn: `<|im_end|>` when the vocabulary has it."""
    token_id = tokenizer.convert_tokens_to_ids(TURN_END)
    unk = getattr(tokenizer, "unk_token_id", None)
    return [token_id] if isinstance(token_id, int) and token_id != unk else []


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config: Any = None) -> list[int]:
    """Tokens that end a reply, for training exports, evaluation and serving alike: EOS, the end
    of an assistant turn, and the model's own generation config's eos ids."""
    ids: set[Any] = {tokenizer.eos_token_id, *end_of_turn_token_ids(tokenizer)}
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)

"""Byte-level BPE tokenizer trained on a corpus, saved as an HF tokenizer directory.

    fmray tokenizer data.num_documents=5000 data.vocab_size=1024 output=my_tokenizer
    python -m fmray tokenizer data.source=corpus.jsonl data.vocab_size=32000

`fmray pretrain` runs this itself (into <run dir>/tokenizer) unless data.tokenizer is set.

The directory loads with `transformers.AutoTokenizer.from_pretrained(dir)`; chat markers are
reserved as special tokens so fine-tuning's chat template needs no vocabulary resize.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from fmray.config import DataSection, RunSection, Section

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, "<|im_start|>", "<|im_end|>"]


class TokenizerConfig(Section):
    run: RunSection = RunSection(name="tokenizer")
    data: DataSection = DataSection()
    output: str | None = None
    """Tokenizer directory to write (default: <run.output_dir>/<run.name>/tokenizer)."""


def train_tokenizer(
    texts: list[str], vocab_size: int, out_dir: str | Path
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and save it (deterministic for identical input)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out_dir))
    return wrapped


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Any HF tokenizer directory; a pad token is set to EOS when the tokenizer has none."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {path} has no eos_token; fmray packs documents with it")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def run(config: TokenizerConfig) -> Path:
    from fmray.data.sources import load_texts

    out_dir = Path(config.output or Path(config.run.output_dir) / config.run.name / "tokenizer")
    texts = load_texts(
        config.data.source, config.data.text_field, config.data.num_documents, config.run.seed
    )
    print(f"[fmray] training a {config.data.vocab_size}-token BPE on {len(texts)} documents")
    tokenizer = train_tokenizer(texts, config.data.vocab_size, out_dir)
    print(f"[fmray] tokenizer ({len(tokenizer)} tokens) written to {out_dir.resolve()}")
    return out_dir

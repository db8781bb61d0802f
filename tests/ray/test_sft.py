"""SFT on the local Ray cluster: held-out accuracy over the base and the export of the tuned
model. The fit itself is the session fixture `sft_run` (conftest.py), which the reward-model
and DPO tests start from. LoRA training, its checkpoints and exports are tested in
test_remote_storage.py (a LoRA run whose storage is S3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmray.data.chat_template import DEFAULT_CHAT_TEMPLATE
from fmray.data.tokenizer import load_tokenizer
from tests.ray.chat_models import heldout_accuracy

pytestmark = pytest.mark.ray

# Observed on a 2-core CPU: base 0.00, fine-tuned 0.34-0.43 held-out exact match (67 questions).
MIN_GAIN = 0.2


def test_sft_raises_heldout_exact_match_over_the_base(sft_run, pretrained_base: Path) -> None:
    base_accuracy = heldout_accuracy(pretrained_base)
    result = sft_run
    tuned_accuracy = result.metrics["val_exact_match"]
    print(f"held-out exact match: base {base_accuracy:.3f}, fine-tuned {tuned_accuracy:.3f}")
    assert tuned_accuracy >= base_accuracy + MIN_GAIN
    # Only reply tokens train, so the final loss is that of short answers, well below the base's.
    assert result.metrics["val_loss"] < 1.0

    # The HF export is the trained model: same accuracy outside Ray, chat template included,
    # generation stops at the end of the assistant's turn.
    hf_dir = Path(result.checkpoint.path) / "hf"
    assert heldout_accuracy(hf_dir) == pytest.approx(tuned_accuracy)
    assert (hf_dir / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    tokenizer = load_tokenizer(hf_dir)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]
    meta = json.loads((Path(result.checkpoint.path) / "fmray.json").read_text())
    assert meta["base_model"] == str(pretrained_base.resolve())

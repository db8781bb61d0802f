"""Reward-model engines in one process (world size 1, gloo), without Ray: full and LoRA heads
under ZeRO-3 resume exactly, their exports (live and rebuilt from the DeepSpeed files) are
stock `AutoModelForSequenceClassification` directories scoring as the engine did; and DPO's LoRA
reference (the policy with adapters off) is the base model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fmray.checkpoint import export_checkpoint, load_checkpoint, save_checkpoint
from fmray.checkpoint.exporters import exporter_for
from fmray.config import TrainSection, ZeroSection
from fmray.distributed.deepspeed_setup import build_ds_config
from fmray.models.heads import build_reward_model
from fmray.models.lora import LoraSection, apply_lora
from fmray.train.losses import bradley_terry_loss
from fmray.train.worker import build_train_engine, zero3_construction

TRAIN = TrainSection(micro_batch_size=2, lr=1e-2, warmup_steps=0, max_steps=10)
LORA = LoraSection(r=4, dropout=0.0)


pytestmark = pytest.mark.usefixtures("single_process_group")


def pad_id(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["pad_token_id"]


def reward_engine(model_dir: Path, lora: LoraSection | None) -> Any:
    ds_config = build_ds_config(TRAIN, ZeroSection(stage=3), 1, use_gpu=False)
    torch.manual_seed(0)
    with zero3_construction(ds_config):
        model = build_reward_model(str(model_dir), pad_id(model_dir))
    if lora is not None:
        model = apply_lora(model, lora, task_type="SEQ_CLS")
    return build_train_engine(model, ds_config, TRAIN)


def pairs(seed: int, pad: int) -> torch.Tensor:
    """Two pairs as 4 right-padded rows: chosen rows, then rejected rows."""
    ids = torch.randint(0, 400, (4, 12), generator=torch.Generator().manual_seed(seed))
    ids[1, 9:] = pad
    ids[3, 7:] = pad
    return ids


def train_step(engine: Any, seed: int, pad: int) -> float:
    chosen, rejected = engine(input_ids=pairs(seed, pad)).logits.squeeze(-1).chunk(2)
    loss = bradley_terry_loss(chosen, rejected).mean()
    engine.backward(loss)
    engine.step()
    return loss.item()


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_reward_model_resumes_and_exports_for_stock_transformers(
    lora: LoraSection | None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    from fmray.data.tokenizer import load_tokenizer

    kind = "reward_lora" if lora else "reward"
    pad = pad_id(tiny_model_dir)
    engine = reward_engine(tiny_model_dir, lora)
    for step in range(2):
        train_step(engine, step, pad)
    ckpt = tmp_path / "ckpt"
    meta = {"run": "unit", "base_model": str(tiny_model_dir), "export_module": "model"}
    exporter_for(kind).write_live(engine, ckpt, load_tokenizer(tiny_model_dir), meta, True)
    save_checkpoint(ckpt, 2, {"model": engine}, kind, "train: {}\n", meta)
    with torch.no_grad():
        engine_scores = engine(input_ids=pairs(9, pad)).logits.squeeze(-1)
    uninterrupted = train_step(engine, 2, pad)

    resumed = reward_engine(tiny_model_dir, lora)
    assert load_checkpoint(ckpt, {"model": resumed}, kind) == 2
    assert train_step(resumed, 2, pad) == uninterrupted

    # hf/ (written live) and `fmray export` (rebuilt from the checkpoint's files) are plain
    # sequence-classification models: one label, the pad token set, scores equal the engine's.
    exported = export_checkpoint(str(ckpt), tmp_path / "exported")
    for model_dir in (ckpt / "hf", exported):
        config = json.loads((model_dir / "config.json").read_text())
        assert config["architectures"] == ["LlamaForSequenceClassification"]
        assert config["pad_token_id"] == pad and len(config["id2label"]) == 1
        model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        with torch.no_grad():
            scores = model(input_ids=pairs(9, pad)).logits.squeeze(-1)
        torch.testing.assert_close(scores, engine_scores, atol=1e-5, rtol=0)
        assert (model_dir / "tokenizer.json").is_file()
    if lora:  # the adapter alone, on the base in stock peft, scores the same
        from peft import PeftModel

        adapter_dir = export_checkpoint(str(ckpt), tmp_path / "adapter", adapter_only=True)
        adapter = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
        base = build_reward_model(str(tiny_model_dir), pad)
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
        with torch.no_grad():
            scores = model(input_ids=pairs(9, pad)).logits.squeeze(-1)
        torch.testing.assert_close(scores, engine_scores, atol=1e-5, rtol=0)


def test_lora_reference_is_the_base_with_adapters_off(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    policy = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LORA)
    for name, param in policy.named_parameters():
        if "lora_B" in name:  # a trained adapter: B is no longer zero
            torch.nn.init.normal_(param, std=0.1)
    input_ids = torch.randint(0, 400, (2, 10))
    with torch.no_grad():
        expected = base(input_ids=input_ids).logits
        with policy.disable_adapter():
            reference = policy(input_ids=input_ids).logits
        adapted = policy(input_ids=input_ids).logits
    torch.testing.assert_close(reference, expected)
    assert not torch.allclose(adapted, expected, atol=1e-4)

"""The shared checkpoint format and engines, in one process (world size 1, gloo), without Ray:
full and LoRA modules through the same save/load, resume equal to not stopping, the per-kind
exports, and the frozen (inference-only) engine."""

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
from fmray.models.lora import LoraSection, apply_lora
from fmray.train.worker import build_frozen_engine, build_train_engine, zero3_construction

TRAIN = TrainSection(micro_batch_size=2, lr=1e-2, warmup_steps=0, max_steps=10)


pytestmark = pytest.mark.usefixtures("single_process_group")


def engine_for(model_dir: Path, stage: int, lora: LoraSection | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    ds_config = build_ds_config(TRAIN, ZeroSection(stage=stage), 1, use_gpu=False)
    torch.manual_seed(0)
    with zero3_construction(ds_config):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    if lora is not None:
        model = apply_lora(model, lora)
    return build_train_engine(model, ds_config, TRAIN)


def train_step(engine: Any, seed: int) -> float:
    input_ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(seed))
    loss = engine(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


def checkpoint(engine: Any, out: Path, kind: str, tokenizer_dir: Path, base: Path) -> Path:
    from fmray.data.tokenizer import load_tokenizer

    meta = {"run": "unit", "base_model": str(base), "export_module": "model"}
    exporter_for(kind).write_live(engine, out, load_tokenizer(tokenizer_dir), meta, True)
    save_checkpoint(out, 2, {"model": engine}, kind, "train: {}\n", meta)
    return out


@pytest.mark.parametrize(
    ("stage", "lora"), [(1, None), (3, None), (2, LoraSection(r=4, dropout=0.0))]
)
def test_resume_continues_exactly_and_exports_load(
    stage: int, lora: LoraSection | None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    kind = "lora" if lora else "causal_lm"
    engine = engine_for(tiny_model_dir, stage, lora)
    for step in range(2):
        train_step(engine, step)
    ckpt = checkpoint(engine, tmp_path / "ckpt", kind, tiny_model_dir, tiny_model_dir)
    meta = json.loads((ckpt / "fmray.json").read_text())
    assert meta["kind"] == kind and meta["modules"] == ["model"] and meta["step"] == 2
    uninterrupted = train_step(engine, 2)

    # A fresh engine built the same way continues exactly where the first one was.
    resumed = engine_for(tiny_model_dir, stage, lora)
    assert load_checkpoint(ckpt, {"model": resumed}, kind) == 2
    assert train_step(resumed, 2) == uninterrupted

    saved_bytes = sum(p.stat().st_size for p in (ckpt / "modules").rglob("*") if p.is_file())
    base_bytes = (tiny_model_dir / "model.safetensors").stat().st_size
    if lora:  # only the adapters and their optimizer state: the frozen base is not saved
        assert saved_bytes < base_bytes / 4
        with pytest.raises(ValueError, match="is a 'lora' checkpoint; this run trains 'causal_lm'"):
            load_checkpoint(ckpt, {"model": resumed}, "causal_lm")
    else:  # weights plus two Adam moments
        assert saved_bytes > 2 * base_bytes

    # The offline export (from the DeepSpeed files, or base + adapter) equals the live one.
    exported = export_checkpoint(str(ckpt), tmp_path / "exported")
    input_ids = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        live = AutoModelForCausalLM.from_pretrained(ckpt / "hf")(input_ids).logits
        offline = AutoModelForCausalLM.from_pretrained(exported)(input_ids).logits
    torch.testing.assert_close(offline, live, atol=1e-5, rtol=0)
    assert (exported / "tokenizer.json").is_file()


def test_frozen_engine_has_no_optimizer_and_matches_the_model(
    tiny_model_dir: Path,
) -> None:
    from transformers import AutoModelForCausalLM

    ds_config = build_ds_config(TRAIN, ZeroSection(stage=3), 1, use_gpu=False)
    with zero3_construction(ds_config):
        partitioned = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert all(hasattr(p, "ds_id") for p in partitioned.parameters())  # built under zero.Init
    frozen = build_frozen_engine(partitioned, ds_config)
    assert frozen.basic_optimizer is None and frozen.lr_scheduler is None  # no optimizer
    assert not any(p.requires_grad for p in frozen.module.parameters())
    # Outside the block models are built whole again (the ZeRO-3 config is not left set).
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert not any(hasattr(p, "ds_id") for p in plain.parameters())
    input_ids = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(frozen(input_ids).logits, plain(input_ids).logits)

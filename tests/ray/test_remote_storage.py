"""Runs whose run.output_dir is an S3 URI, against a local S3-compatible server (moto).

Pretraining writes its tokenizer, packed data, config, metrics and checkpoints to the bucket; a
LoRA fine-tune starts from that remote run folder; the exports of its remote checkpoint (merged
and adapter-only) load in plain transformers and peft. The workers get URIs only, never a path
of the driver's disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fmray import storage
from fmray.config import load_config
from fmray.train import pretrain, sft
from tests.conftest import REPO_ROOT, S3_BUCKET

pytestmark = pytest.mark.ray

ROOT = f"s3://{S3_BUCKET}/runs"


def location_fields(plan: Any) -> dict[str, str]:
    keys = ("run_dir", "tokenizer_dir", "train_data", "eval_data", "model_path", "resume_from")
    return {k: getattr(plan, k) for k in keys if getattr(plan, k) is not None}


def test_pretrain_and_lora_sft_live_in_s3(
    ray_cluster: Any, s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a relative path written by mistake would land here
    config = load_config(
        pretrain.PretrainConfig,
        REPO_ROOT / "jobs" / "pretrain" / "tiny.yaml",
        [
            f"run.output_dir={ROOT}/",
            "run.name=base",
            "data.num_documents=400",
            "data.seq_len=64",
            "train.max_steps=4",
            "train.micro_batch_size=4",
            "checkpoint.every_steps=2",
            "logging.tensorboard=true",
        ],
    )
    pretrain.check_inputs(config)
    plan = pretrain.prepare_run(config)
    assert all(v.startswith(f"{ROOT}/base") for v in location_fields(plan).values()), plan
    result = pretrain.build_trainer(config, plan).fit()
    assert result.error is None

    run_dir = f"{ROOT}/base"
    names = storage.list_names(run_dir)
    assert {"config.yaml", "metrics.jsonl", "tokenizer", "data", "tensorboard"} <= set(names)
    assert {"checkpoint_00000002", "checkpoint_00000004"} <= set(names)
    records = [json.loads(x) for x in storage.read_text(f"{run_dir}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [4]
    meta = json.loads(storage.read_text(f"{run_dir}/checkpoint_00000004/fmray.json"))
    assert meta["kind"] == "causal_lm" and meta["step"] == 4
    assert "model.safetensors" in storage.list_names(f"{run_dir}/checkpoint_00000004/hf")

    # LoRA fine-tuning from the remote run folder (its newest export), into the same bucket.
    tuned = load_config(
        sft.SFTConfig,
        REPO_ROOT / "jobs" / "sft" / "tiny_lora.yaml",
        [
            f"run.output_dir={ROOT}",
            "run.name=tuned",
            f"model.path={run_dir}",
            "lora.r=4",
            "lora.alpha=8.0",
            "lora.target_modules=[q_proj, v_proj]",
            "train.max_steps=4",
            "train.lr=1e-2",
            "train.warmup_steps=0",
            "checkpoint.every_steps=2",
            "checkpoint.keep_last=3",
            "eval.num_examples=4",
            "eval.max_new_tokens=4",
            "logging.tensorboard=false",
        ],
    )
    sft.check_inputs(tuned)
    sft_plan = sft.prepare_run(tuned)
    assert sft_plan.model_path == f"{run_dir}/checkpoint_00000004/hf"
    assert all(v.startswith(ROOT) for v in location_fields(sft_plan).values()), sft_plan
    sft_result = sft.build_trainer(tuned, sft_plan).fit()
    assert sft_result.error is None
    checkpoint = f"{ROOT}/tuned/checkpoint_00000004"
    meta = json.loads(storage.read_text(f"{checkpoint}/fmray.json"))
    assert meta["kind"] == "lora" and meta["base_model"] == sft_plan.model_path
    check_lora_checkpoint(checkpoint, sft_plan.model_path, tmp_path / "outputs")

    # Nothing was written on the driver's disk but what this test asked for.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]


def check_lora_checkpoint(checkpoint: str, base_location: str, out: Path) -> None:
    """The checkpoint holds the adapters (and their optimizer state), not the frozen base; its
    merged export keeps the base's frozen weights exactly; `fmray export` writes the adapter
    alone (peft loads it onto the base) or the merged model, which agree with the in-training
    merge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fmray.export import main as export_main

    ckpt = storage.local_copy(checkpoint, out)
    base_dir = storage.local_copy(base_location, out / "base")
    saved_bytes = sum(p.stat().st_size for p in (ckpt / "modules").rglob("*") if p.is_file())
    assert 0 < saved_bytes < (base_dir / "model.safetensors").stat().st_size / 4
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(ckpt / "hf").eval()
    for name, tensor in merged.state_dict().items():
        adapted = ".q_proj." in name or ".v_proj." in name
        assert torch.equal(tensor, base[name]) != adapted, name

    export_main([checkpoint, str(out / "merged")])
    export_main([checkpoint, str(out / "adapter"), "--adapter-only"])
    adapter_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), str(out / "adapter")
    ).eval()
    input_ids = torch.randint(0, 500, (2, 24))
    with torch.no_grad():
        expected = adapter_model(input_ids=input_ids).logits
        for model in (merged, AutoModelForCausalLM.from_pretrained(out / "merged")):
            torch.testing.assert_close(model(input_ids).logits, expected, atol=1e-5, rtol=0)

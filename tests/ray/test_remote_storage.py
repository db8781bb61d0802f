"""Runs whose run.output_dir is an S3 URI, against a local S3-compatible server (moto).

Pretraining writes its tokenizer, packed data, config, metrics and checkpoints to the bucket; a
LoRA fine-tune starts from that remote run folder; the export of its remote checkpoint loads in
plain transformers. The workers get URIs only, never a path of the driver's disk.
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
            "train.max_steps=2",
            "train.warmup_steps=0",
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
    checkpoint = f"{ROOT}/tuned/checkpoint_00000002"
    meta = json.loads(storage.read_text(f"{checkpoint}/fmray.json"))
    assert meta["kind"] == "lora" and meta["base_model"] == sft_plan.model_path

    # `fmray export` of the remote checkpoint: the merged model loads in plain transformers.
    from transformers import AutoModelForCausalLM

    from fmray.export import main as export_main

    export_main([checkpoint, str(tmp_path / "merged")])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size

    # Nothing was written on the driver's disk beside the export.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]

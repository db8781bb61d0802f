"""LoRA: only adapters train, the merged weights reproduce the adapter model, exports load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fmray.checkpoint import META_FILE, export_checkpoint
from fmray.models.lora import LoraSection, apply_lora, lora_scaling, merged_state_dict, save_adapter

LORA = LoraSection(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])


def trained_lora_model(model_dir: Path, steps: int = 3) -> torch.nn.Module:
    """The tiny model with adapters after a few AdamW steps on random tokens."""
    torch.manual_seed(0)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(model_dir), LORA)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        input_ids = torch.randint(0, 500, (2, 24))
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_only_adapter_parameters_change(tiny_model_dir: Path) -> None:
    before = {
        k: v.clone()
        for k, v in AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().items()
    }
    model = trained_lora_model(tiny_model_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 3 * 4  # A and B, three module kinds, four layers
    after = merged_state_dict(model.state_dict(), scaling=0.0)  # the frozen weights alone
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    lora_b = [v for k, v in model.state_dict().items() if ".lora_B." in k]
    assert all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it moved


def test_merged_weights_give_the_adapter_models_logits(tiny_model_dir: Path) -> None:
    model = trained_lora_model(tiny_model_dir)
    merged = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    merged.load_state_dict(merged_state_dict(model.state_dict(), lora_scaling(LORA)))
    input_ids = torch.randint(0, 500, (2, 32))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids).logits
        torch.testing.assert_close(merged(input_ids=input_ids).logits, expected, atol=1e-5, rtol=0)
    assert (plain - expected).abs().max() > 1e-3  # the adapters do change the output


def test_adapter_checkpoint_exports_adapter_and_merged_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    model = trained_lora_model(tiny_model_dir)
    ckpt = tmp_path / "checkpoint_00000003"
    save_adapter(model, model.state_dict(), ckpt / "adapter", str(tiny_model_dir))
    (ckpt / "hf").mkdir()
    for path in tiny_model_dir.iterdir():
        if "token" in path.name:
            shutil.copy2(path, ckpt / "hf" / path.name)
    meta = {"kind": "lora", "modules": ["model"], "step": 3, "tag": "step_3", "world_size": 1}
    (ckpt / META_FILE).write_text(json.dumps({**meta, "base_model": str(tiny_model_dir)}))

    input_ids = torch.randint(0, 500, (1, 20))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    merged_dir = export_checkpoint(str(ckpt), tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, expected, atol=1e-5, rtol=0)
    assert (merged_dir / "tokenizer.json").is_file()

    adapter_dir = export_checkpoint(str(ckpt), tmp_path / "adapter_only", adapter_only=True)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=input_ids).logits, expected, atol=1e-5, rtol=0
        )


def test_unknown_target_module_fails_with_one_line(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError) as err:
        apply_lora(model, LoraSection(target_modules=["qkv_proj"]))
    assert "lora.target_modules=['qkv_proj']" in str(err.value)

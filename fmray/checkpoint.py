"""Checkpoints: DeepSpeed state of all ranks + RNG + config + HF export, committed atomically.

A checkpoint directory (one per reported step, merged from all ranks by Ray Train) holds:

    deepspeed/<tag>/...   model, optimizer, scheduler states (every rank's ZeRO shard)
    rng/rank<r>.pt        torch / numpy / python RNG states of each rank
    fmray.yaml            the resolved config that produced it
    fmray.json            step, tag, world size, lineage (run, trial)
    hf/                   config + tokenizer, and safetensors weights when checkpoint.export_hf

Ray Train registers a checkpoint only after every rank's files are persisted, and resume goes
through Ray Train's record of registered checkpoints, so a half-written one is never loaded.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

CONFIG_FILE = "fmray.yaml"
META_FILE = "fmray.json"


def save_checkpoint(
    engine: Any,
    ckpt_dir: Path,
    step: int,
    config_yaml: str,
    meta: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    export_hf: bool,
) -> None:
    """Write this rank's share of a checkpoint into its local `ckpt_dir` (collective call)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = f"step_{step}"
    engine.save_checkpoint(str(ckpt_dir / "deepspeed"), tag=tag, client_state={"step": step})
    (ckpt_dir / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(capture_rng(), ckpt_dir / "rng" / f"rank{rank}.pt")
    state_dict = gather_state_dict(engine) if export_hf else None
    if rank == 0:
        hf_dir = ckpt_dir / "hf"
        engine.module.config.save_pretrained(str(hf_dir))
        tokenizer.save_pretrained(str(hf_dir))
        if state_dict is not None:
            engine.module.save_pretrained(str(hf_dir), state_dict=state_dict)
        (ckpt_dir / CONFIG_FILE).write_text(config_yaml)
        world = dist.get_world_size() if dist.is_initialized() else 1
        (ckpt_dir / META_FILE).write_text(
            json.dumps({"step": step, "tag": tag, "world_size": world, **meta}, indent=2)
        )


def gather_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """Full state dict on rank 0 (None elsewhere); ZeRO-3 gathers one parameter at a time."""
    import deepspeed

    rank = dist.get_rank() if dist.is_initialized() else 0
    module = engine.module
    if engine.zero_optimization_stage() != 3:
        return (
            {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            if rank == 0
            else None
        )
    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[name] = param.detach().cpu().clone()
    for name, buffer in module.named_buffers():
        if rank == 0 and name in module.state_dict():
            state[name] = buffer.detach().cpu().clone()
    return state if rank == 0 else None


def load_checkpoint(engine: Any, ckpt_dir: Path) -> int:
    """Restore engine (model, optimizer, scheduler) and this rank's RNG; returns the step."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    meta = read_meta(ckpt_dir)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if meta["world_size"] != world:
        raise ValueError(
            f"checkpoint {ckpt_dir} was written by {meta['world_size']} workers; "
            f"scaling.num_workers={world} cannot resume it"
        )
    load_path, client_state = engine.load_checkpoint(str(ckpt_dir / "deepspeed"), tag=meta["tag"])
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt_dir}/deepspeed/{meta['tag']}")
    restore_rng(torch.load(ckpt_dir / "rng" / f"rank{rank}.pt", weights_only=False))
    return int(client_state["step"])


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise ValueError(f"{ckpt_dir} is not an fmray checkpoint (no {META_FILE})")
    return json.loads(path.read_text())


def capture_rng() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def export_hf_checkpoint(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    """HF directory (safetensors + config + tokenizer) from any fmray checkpoint.

    Weights come from the DeepSpeed files (all ZeRO stages, consolidated to fp32), so this works
    whether or not the checkpoint carries its own HF export.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    meta = read_meta(ckpt_dir)
    tag_dir = ckpt_dir / "deepspeed" / meta["tag"]
    if any(tag_dir.glob("*zero_pp_rank_*")):
        state_dict = get_fp32_state_dict_from_zero_checkpoint(
            str(ckpt_dir / "deepspeed"), tag=meta["tag"]
        )
    else:  # ZeRO stage 0 keeps the whole module in the model-states file
        model_states = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
        state_dict = model_states["module"]
    config = AutoConfig.from_pretrained(str(ckpt_dir / "hf"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state_dict, assign=True, strict=False)
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model.save_pretrained(str(tmp_dir), state_dict=state_dict)
    for path in (ckpt_dir / "hf").iterdir():
        if "token" in path.name or path.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy2(path, tmp_dir / path.name)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)  # the finished directory appears at once, never half-written
    return out_dir


# ----------------------------------------------------------------------------- LoRA adapters
# A LoRA checkpoint holds the DeepSpeed state of the trainable (adapter) parameters only, plus
# adapter/ in peft's format and, with checkpoint.export_hf, hf/ with the merged full model. The
# frozen base comes back from the model directory recorded as `base_model` in fmray.json.

ADAPTER_DIR = "adapter"


def save_adapter_checkpoint(
    engine: Any,
    ckpt_dir: Path,
    step: int,
    config_yaml: str,
    meta: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    export_hf: bool,
    lora_scaling: float,
) -> None:
    """Write this rank's share of a LoRA checkpoint into `ckpt_dir` (collective call)."""
    from fmray.models.lora import merged_state_dict, save_adapter

    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = f"step_{step}"
    engine.save_checkpoint(
        str(ckpt_dir / "deepspeed"),
        tag=tag,
        client_state={"step": step},
        exclude_frozen_parameters=True,
    )
    (ckpt_dir / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(capture_rng(), ckpt_dir / "rng" / f"rank{rank}.pt")
    state = gather_state_dict(engine) if export_hf else gather_trainable_state_dict(engine)
    if rank == 0:
        assert state is not None
        save_adapter(engine.module, state, ckpt_dir / ADAPTER_DIR, meta.get("base_model"))
        base = engine.module.get_base_model()
        hf_dir = ckpt_dir / "hf"
        base.config.save_pretrained(str(hf_dir))
        base.generation_config.save_pretrained(str(hf_dir))
        tokenizer.save_pretrained(str(hf_dir))
        if export_hf:
            save_hf_weights(base, merged_state_dict(state, lora_scaling), hf_dir)
        (ckpt_dir / CONFIG_FILE).write_text(config_yaml)
        world = dist.get_world_size() if dist.is_initialized() else 1
        record = {"step": step, "tag": tag, "world_size": world, "adapter": True, **meta}
        (ckpt_dir / META_FILE).write_text(json.dumps(record, indent=2))


def gather_trainable_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """The parameters that train (LoRA: the adapters) on rank 0, gathered under ZeRO-3."""
    import deepspeed

    rank = dist.get_rank() if dist.is_initialized() else 0
    state: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        enabled = engine.zero_optimization_stage() == 3
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=enabled):
            if rank == 0:
                state[name] = param.detach().cpu().clone()
    return state if rank == 0 else None


def save_hf_weights(model: Any, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
    """safetensors shards of `state_dict` (HF names) beside the config already in `out_dir`."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state_dict, max_shard_size="5GB")
    for filename, names in split.filename_to_tensors.items():
        shard = {name: state_dict[name].contiguous() for name in names}
        save_file(shard, str(out_dir / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def load_adapter_checkpoint(engine: Any, ckpt_dir: Path) -> int:
    """Restore a LoRA engine (adapters, optimizer, scheduler) and this rank's RNG; returns step.

    The frozen base weights are not in the checkpoint: the engine was built from the base model.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    meta = read_meta(ckpt_dir)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if meta["world_size"] != world:
        raise ValueError(
            f"checkpoint {ckpt_dir} was written by {meta['world_size']} workers; "
            f"scaling.num_workers={world} cannot resume it"
        )
    load_path, client_state = engine.load_checkpoint(
        str(ckpt_dir / "deepspeed"), tag=meta["tag"], load_module_strict=False
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt_dir}/deepspeed/{meta['tag']}")
    restore_rng(torch.load(ckpt_dir / "rng" / f"rank{rank}.pt", weights_only=False))
    return int(client_state["step"])


def is_adapter_checkpoint(ckpt_dir: str | Path) -> bool:
    return (Path(ckpt_dir) / ADAPTER_DIR / "adapter_config.json").is_file()


def export_adapter_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, merged: bool) -> Path:
    """From a LoRA checkpoint: the peft adapter alone, or the merged full HF model.

    The merged model is the base (`base_model` in fmray.json) with the adapter folded in by
    peft's `merge_and_unload`; both outputs carry the tokenizer and its chat template.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if not is_adapter_checkpoint(ckpt_dir):
        raise ValueError(f"{ckpt_dir} is not a LoRA checkpoint (no {ADAPTER_DIR}/)")
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    if merged:
        base = AutoModelForCausalLM.from_pretrained(read_meta(ckpt_dir)["base_model"])
        model = PeftModel.from_pretrained(base, str(ckpt_dir / ADAPTER_DIR)).merge_and_unload()
        model.save_pretrained(str(tmp_dir))
    else:
        shutil.copytree(ckpt_dir / ADAPTER_DIR, tmp_dir)
    for path in (ckpt_dir / "hf").iterdir():
        keep = ("token" in path.name, path.name == "chat_template.jinja")
        if any(keep) or (merged and path.name == "generation_config.json"):
            shutil.copy2(path, tmp_dir / path.name)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)
    return out_dir

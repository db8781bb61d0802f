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
    state_dict = get_fp32_state_dict_from_zero_checkpoint(
        str(ckpt_dir / "deepspeed"), tag=meta["tag"]
    )
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

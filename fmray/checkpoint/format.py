"""The checkpoint format shared by every recipe and model kind.

A checkpoint directory (one per reported step, merged from all ranks by Ray Train) holds:

    modules/<name>/<tag>/  DeepSpeed state of each named module (model, policy, critic, unet,
                           ema, ...): its ZeRO shards of every rank, optimizer and scheduler
    rng/rank<r>.pt         torch / numpy / python RNG states of each rank
    fmray.yaml             the resolved config that produced it
    fmray.json             kind, modules, step, tag, world size, lineage (run, trial, base model)
    hf/, adapter/, ...     the kind's export (see fmray.checkpoint.exporters)

A module whose engine has frozen parameters (LoRA's base) saves only the trainable ones; the
frozen ones come back from the base model the engine was built from. Full and adapter training
therefore share one save and one load. Ray Train registers a checkpoint only after every rank's
files are persisted, and resume goes through Ray Train's record of registered checkpoints (or a
folder with fmray.json, written last), so a half-written checkpoint is never loaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fmray import storage

CONFIG_FILE = "fmray.yaml"
META_FILE = "fmray.json"
MODULES_DIR = "modules"
# Checkpoints written before named modules kept their only module's state here.
LEGACY_DEEPSPEED_DIR = "deepspeed"


def rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def has_frozen_parameters(engine: Any) -> bool:
    return any(not p.requires_grad for p in engine.module.parameters())


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    engines: dict[str, Any],
    kind: str,
    config_yaml: str,
    meta: dict[str, Any],
    state: dict[str, Any] | None = None,
) -> None:
    """Write this rank's share of a checkpoint into its local `ckpt_dir` (collective call).
    `state`: the loop's own small state (numbers) beside the step, e.g. an adaptive KL
    coefficient; `load_checkpoint` hands it back."""
    rank, world = rank_and_world()
    tag = f"step_{step}"
    for name, engine in engines.items():
        engine.save_checkpoint(
            str(ckpt_dir / MODULES_DIR / name),
            tag=tag,
            client_state={"step": step, "state": state or {}},
            exclude_frozen_parameters=has_frozen_parameters(engine),
        )
    (ckpt_dir / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(capture_rng(), ckpt_dir / "rng" / f"rank{rank}.pt")
    if rank == 0:
        (ckpt_dir / CONFIG_FILE).write_text(config_yaml)
        record = {
            "kind": kind,
            "modules": list(engines),
            "step": step,
            "tag": tag,
            "world_size": world,
            **meta,
        }
        (ckpt_dir / META_FILE).write_text(json.dumps(record, indent=2))


def load_checkpoint(
    ckpt_dir: Path,
    engines: dict[str, Any],
    kind: str | None = None,
    state_out: dict[str, Any] | None = None,
) -> int:
    """Restore every named engine (model, optimizer, scheduler) and this rank's RNG; returns
    the step (and fills `state_out` with the loop state saved beside it). Each engine must be
    built as it was for the save (same model, same trainables); `kind`, when given, must be the
    checkpoint's."""
    rank, world = rank_and_world()
    meta = read_meta(ckpt_dir)
    if kind is not None and kind_of(meta) != kind:
        raise ValueError(
            f"{ckpt_dir} is a {kind_of(meta)!r} checkpoint; this run trains {kind!r} "
            "(lora.* decides between 'lora' and 'causal_lm')"
        )
    if meta["world_size"] != world:
        raise ValueError(
            f"checkpoint {ckpt_dir} was written by {meta['world_size']} workers; "
            f"scaling.num_workers={world} cannot resume it"
        )
    missing = sorted(set(engines) - set(module_names(meta)))
    if missing:
        raise ValueError(f"checkpoint {ckpt_dir} holds no module {missing} (kind {kind_of(meta)})")
    step = 0
    for name, engine in engines.items():
        load_path, client_state = engine.load_checkpoint(
            str(deepspeed_dir(ckpt_dir, meta, name)),
            tag=meta["tag"],
            load_module_strict=not has_frozen_parameters(engine),
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load module {name!r} of {ckpt_dir}")
        step = int(client_state["step"])
        if state_out is not None:
            state_out.update(client_state.get("state", {}))
    restore_rng(torch.load(ckpt_dir / "rng" / f"rank{rank}.pt", weights_only=False))
    return step


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """fmray.json of a local or remote checkpoint folder."""
    path = storage.join(str(ckpt_dir), META_FILE)
    if not storage.is_file(path):
        raise ValueError(f"{ckpt_dir} is not an fmray checkpoint (no {META_FILE})")
    return json.loads(storage.read_text(path))


def kind_of(meta: dict[str, Any]) -> str:
    """The checkpoint's kind; checkpoints from before kinds were recorded are inferred."""
    if "kind" in meta:
        return str(meta["kind"])
    return "lora" if meta.get("adapter") else "causal_lm"


def module_names(meta: dict[str, Any]) -> list[str]:
    return list(meta.get("modules", ["model"]))


def deepspeed_dir(ckpt_dir: Path, meta: dict[str, Any], module: str) -> Path:
    if "modules" not in meta:
        return ckpt_dir / LEGACY_DEEPSPEED_DIR
    return ckpt_dir / MODULES_DIR / module


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


def gather_state_dict(engine: Any, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
    """The module's state dict on rank 0 (None elsewhere), ZeRO-3 gathered one tensor at a time.

    `trainable_only` keeps the parameters that train (LoRA: the adapters).
    """
    import deepspeed

    rank, _ = rank_and_world()
    module = engine.module
    partitioned = engine.zero_optimization_stage() == 3
    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=partitioned):
            if rank == 0:
                state[name] = param.detach().cpu().clone()
    if not trainable_only and rank == 0:
        persistent = module.state_dict()
        for name, buffer in module.named_buffers():
            if name in persistent:
                state[name] = buffer.detach().cpu().clone()
    return state if rank == 0 else None


def consolidated_state_dict(ckpt_dir: Path, module: str = "model") -> dict[str, torch.Tensor]:
    """A module's fp32 weights from its DeepSpeed files (any ZeRO stage), without a process
    group: the offline counterpart of `gather_state_dict`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    meta = read_meta(ckpt_dir)
    root = deepspeed_dir(ckpt_dir, meta, module)
    tag_dir = root / meta["tag"]
    if any(tag_dir.glob("*zero_pp_rank_*")):
        return get_fp32_state_dict_from_zero_checkpoint(
            str(root), tag=meta["tag"], exclude_frozen_parameters=True
        )
    # ZeRO stage 0 keeps the whole module in the model-states file.
    model_states = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
    return model_states["module"]


def save_hf_weights(state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
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

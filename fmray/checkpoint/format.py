"""The checkpoint format shared by every recipe and model kind.

A checkpoint directory (one per reported step, merged from all ranks by Ray Train) holds:

    modules/<name>/<tag>/  DeepSpeed state of each named module (model, policy, critic, unet,
                           ema, ...): its ZeRO shards of every rank, optimizer and scheduler
    rng/rank<r>.pt         torch / numpy / python RNG states of each rank (tensors and numbers,
                           read with torch.load(weights_only=True))
    manifest/rank<r>.json  size and CRC-32 of every file rank r wrote
    fmray.yaml             the resolved config that produced it
    fmray.json             kind, modules, step, tag, world size, lineage (run, trial, base model)
    hf/, adapter/, ...     the kind's export (see fmray.checkpoint.exporters)

A module whose engine has frozen parameters (LoRA's base) saves only the trainable ones; the
frozen ones come back from the base model the engine was built from. Full and adapter training
therefore share one save and one load. Ray Train registers a checkpoint only after every rank's
files are persisted, and resume goes through Ray Train's record of registered checkpoints (or a
folder with fmray.json, written last), so a half-written checkpoint is never loaded. Before
loading, every rank checks the files it will read against the manifests (`verify_checkpoint`):
a truncated, corrupted or missing file is named, never half-loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import random
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fmray import storage

CONFIG_FILE = "fmray.yaml"
META_FILE = "fmray.json"
MODULES_DIR = "modules"
MANIFEST_DIR = "manifest"
# What a resuming rank reads (the exports are not needed to resume).
RESUME_PARTS = (MODULES_DIR, "rng", CONFIG_FILE)
# Below this much free space a failed write is reported as a full disk.
DISK_FULL_BYTES = 1 << 20
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
    try:
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
        write_manifest(ckpt_dir, rank)
    except (OSError, RuntimeError) as error:
        raise CheckpointWriteError(ckpt_dir, step, error) from error
    if rank == 0:
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
    verify: bool = True,
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
    saved_world = int(meta["world_size"])
    missing = sorted(set(engines) - set(module_names(meta)))
    if missing:
        raise ValueError(f"checkpoint {ckpt_dir} holds no module {missing} (kind {kind_of(meta)})")
    problem = verify_checkpoint(ckpt_dir, rank, meta, world) if verify else None
    if problem:
        raise CheckpointDamagedError(f"checkpoint damaged: {problem}")
    if saved_world != world and rank == 0:
        print(f"[fmray] resharding {ckpt_dir.name} from {saved_world} to {world} workers")
    step = 0
    for name, engine in engines.items():
        source = deepspeed_dir(ckpt_dir, meta, name)
        with resharded(source, meta["tag"], engine, saved_world != world) as (root, universal):
            engine._config.load_universal_checkpoint = universal
            try:
                load_path, client_state = engine.load_checkpoint(
                    str(root),
                    tag=meta["tag"],
                    load_module_strict=not has_frozen_parameters(engine),
                )
            finally:
                engine._config.load_universal_checkpoint = False
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load module {name!r} of {ckpt_dir}")
        step = int(client_state["step"])
        if state_out is not None:
            state_out.update(client_state.get("state", {}))
    # A rank that did not exist when the checkpoint was written takes rank 0's generators.
    rng_file = ckpt_dir / "rng" / f"rank{rank if rank < saved_world else 0}.pt"
    restore_rng(torch.load(rng_file, weights_only=True))
    return step


@contextmanager
def resharded(source: Path, tag: str, engine: Any, reshard: bool) -> Iterator[tuple[Path, bool]]:
    """The DeepSpeed folder to load a module from, and whether it is in DeepSpeed's universal
    format: `source` itself when the worker count is unchanged or nothing is partitioned (ZeRO-0
    keeps the optimizer beside the module, readable at any world size), else a universal copy
    converted from the ZeRO shards of every rank (into this process's scratch folder, removed
    after loading)."""
    if not reshard or engine.zero_optimization_stage() == 0:
        yield source, False
        return
    from deepspeed.checkpoint.ds_to_universal import main as to_universal

    scratch = Path(tempfile.mkdtemp(prefix="fmray-universal-"))
    try:
        args = argparse.Namespace(
            input_folder=str(source / tag),
            output_folder=str(scratch / tag),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # in memory: the checkpoint's files stay as written
        )
        with contextlib.redirect_stdout(io.StringIO()):  # its progress is not the user's
            to_universal(args)
        (scratch / "latest_universal").write_text(tag)
        yield scratch, True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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
    """The RNG states as tensors and numbers only, so that they load with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    internal = tuple(int(x) for x in python_state["internal"].tolist())
    random.setstate((python_state["version"], internal, python_state["gauss_next"]))


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions): the run stops, and the
    checkpoints before it stay as they were."""

    def __init__(self, ckpt_dir: Path, step: int, error: BaseException) -> None:
        # torch.save reports a full disk as a RuntimeError about stream positions: the free
        # space tells.
        free = shutil.disk_usage(ckpt_dir if ckpt_dir.exists() else ckpt_dir.parent).free
        full = getattr(error, "errno", None) == errno.ENOSPC or free < DISK_FULL_BYTES
        detail = f"no space left on device, {free} bytes free: {error}" if full else str(error)
        super().__init__(
            f"checkpoint of step {step} could not be written to {ckpt_dir} ({detail}); "
            "the previous checkpoints are untouched"
        )


class CheckpointDamagedError(RuntimeError):
    """A checkpoint whose files do not match its manifests (truncated, corrupted, missing)."""


def file_crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(ckpt_dir: Path, rank: int) -> None:
    """manifest/rank<r>.json: size and CRC-32 of every file in this rank's share."""
    files = {}
    for path in sorted(ckpt_dir.rglob("*")):
        relative = path.relative_to(ckpt_dir)
        if path.is_file() and relative.parts[0] != MANIFEST_DIR and path.name != META_FILE:
            files[relative.as_posix()] = [path.stat().st_size, file_crc32(path)]
    (ckpt_dir / MANIFEST_DIR).mkdir(exist_ok=True)
    (ckpt_dir / MANIFEST_DIR / f"rank{rank}.json").write_text(json.dumps(files, indent=0))


def verify_checkpoint(
    ckpt_dir: Path, rank: int, meta: dict[str, Any] | None = None, world: int | None = None
) -> str | None:
    """What is wrong with the files rank `rank` of `world` would read to resume, or None: its
    own share and rank 0's, or every rank's when the worker count changed (resharding reads
    them all). Every rank's manifest must be there: a checkpoint copied only in part is
    incomplete. Checkpoints written before manifests existed are not checked."""
    meta = meta or read_meta(ckpt_dir)
    manifest_dir = ckpt_dir / MANIFEST_DIR
    if not manifest_dir.is_dir():
        return None
    saved_world = int(meta["world_size"])
    missing = [r for r in range(saved_world) if not (manifest_dir / f"rank{r}.json").is_file()]
    if missing:
        return f"{ckpt_dir.name}: incomplete, no manifest of rank(s) {missing}"
    same_world = world is None or world == saved_world
    owners = sorted({0, rank}) if same_world else range(saved_world)
    for owner in owners:
        try:
            files = json.loads((manifest_dir / f"rank{owner}.json").read_text())
        except (OSError, ValueError) as error:
            return f"{ckpt_dir.name}/{MANIFEST_DIR}/rank{owner}.json: unreadable ({error})"
        for name, (size, crc) in files.items():
            if name.split("/")[0] not in RESUME_PARTS:
                continue
            path = ckpt_dir / name
            where = f"{ckpt_dir.name}/{name}"
            if not path.is_file():
                return f"{where}: missing"
            actual = path.stat().st_size
            if actual != size:
                return f"{where}: {actual} bytes, {size} written (truncated or overwritten)"
            if file_crc32(path) != crc:
                return f"{where}: contents differ from what was written (CRC-32 mismatch)"
    return None


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

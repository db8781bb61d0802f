"""Kind `diffusion`: a text-to-image checkpoint exported as a diffusers pipeline directory
(`DiffusionPipeline.from_pretrained` loads it without fmray) with a fast sampler (DDIM or
DPM-Solver) configured, beside a PNG grid of samples for fixed prompts.

    fmray export runs/diffusion-tiny/checkpoint_00000400 pipeline/

A checkpoint of kind diffusion holds, besides the shared format:

    pipeline/        the diffusers pipeline: EMA weights of the UNet (and of the text encoder when
                     it trains) when EMA is on, else the trained weights, LoRA adapters merged;
                     the frozen components
    ema.safetensors  the EMA weights of what trains (resume continues the average from them)
    samples.png      a grid of one sample per fixed prompt, seeded
    samples.npy      the same samples as floats in [0, 1] (N x H x W x 3), with samples.json
                     (prompts, seed, steps, guidance): what an export must reproduce

The "tokenizer" an `Export` of this kind carries is a `LiveExport`: everything a pipeline needs
besides the trained engine (frozen components, sampler, EMA, sample settings).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fmray import storage
from fmray.checkpoint.exporters import partial_dir, publish_export
from fmray.checkpoint.format import (
    CONFIG_FILE,
    consolidated_state_dict,
    gather_state_dict,
    module_names,
    rank_and_world,
    read_meta,
)

PIPELINE_DIR = "pipeline"
EMA_FILE = "ema.safetensors"
SAMPLES = "samples"
# Components that train: the Denoiser's attribute names are the pipeline's folder names.
TRAINED = ("unet", "text_encoder")


@dataclass
class LiveExport:
    """What a live export needs beside the engine."""

    parts: Any
    """fmray.models.diffusion.Parts: tokenizer, frozen text encoder / VAE, noise schedule."""
    ema: Any | None
    """fmray.train.diffusion.EMA, or None when EMA is off."""
    sampler: str
    prompts: list[str]
    seed: int
    steps: int
    guidance_scale: float


class DiffusionExporter:
    kind = "diffusion"

    def write_live(
        self, engine: Any, ckpt_dir: Path, tokenizer: Any, meta: dict[str, Any], weights: bool
    ) -> None:
        from safetensors.torch import save_file

        from fmray.models.diffusion import generate, pipeline_of

        live: LiveExport = tokenizer
        state = gather_state_dict(engine) if live.ema is None else live.ema.state_dict()
        rank, _ = rank_and_world()
        if rank != 0:
            return
        assert state is not None
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if live.ema is not None:  # training state (resume), written whatever export_hf says
            save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt_dir / EMA_FILE))
        pipeline = pipeline_of(live.parts, engine.module, state, live.sampler)
        save_pipeline(pipeline, ckpt_dir / PIPELINE_DIR, weights)
        if live.prompts:
            seeds = [live.seed + i for i in range(len(live.prompts))]
            images = generate(pipeline, live.prompts, seeds, live.steps, live.guidance_scale)
            write_samples(ckpt_dir, images, live)

    def export(self, ckpt_dir: Path, out_dir: Path, adapter_only: bool) -> Path:
        """The pipeline rebuilt from the checkpoint's files: trained weights from the EMA file
        (EMA on) or the DeepSpeed files (any ZeRO stage); frozen components from the
        checkpoint's pipeline/ when it holds weights, else from the run's base model."""
        from safetensors.torch import load_file

        if adapter_only:
            raise ValueError(f"--adapter-only: {ckpt_dir} is a diffusion checkpoint")
        meta = read_meta(ckpt_dir)
        if (ckpt_dir / EMA_FILE).is_file():
            state = load_file(str(ckpt_dir / EMA_FILE))
        else:
            state = consolidated_state_dict(
                ckpt_dir, meta.get("export_module") or module_names(meta)[0]
            )
        tmp_dir = partial_dir(out_dir)
        shutil.copytree(ckpt_dir / PIPELINE_DIR, tmp_dir)
        index = json.loads((tmp_dir / "model_index.json").read_text())
        trained = {name for name in TRAINED if any(k.startswith(f"{name}.") for k in state)}
        for name, entry in index.items():
            if not isinstance(entry, list) or entry[0] is None or name in trained:
                continue
            library = entry[0]
            if not has_weights(tmp_dir / name) and library in ("diffusers", "transformers"):
                base = storage.local_copy(storage.join(str(meta["base_model"]), name))
                shutil.rmtree(tmp_dir / name)
                shutil.copytree(base, tmp_dir / name)
        lora = (yaml.safe_load((ckpt_dir / CONFIG_FILE).read_text()) or {}).get("lora")
        for name in trained:
            prefix = f"{name}."
            sub_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if name == "unet" and lora:
                base = storage.local_copy(storage.join(str(meta["base_model"]), "unet"))
                save_lora_unet(tmp_dir / name, base, lora, sub_state)
            else:
                save_component(tmp_dir / name, index[name], sub_state)
        return publish_export(tmp_dir, out_dir)


def has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def save_pipeline(pipeline: Any, out_dir: Path, weights: bool) -> None:
    """The whole pipeline, or (weights=False) its configs, tokenizer and scheduler only."""
    pipeline.save_pretrained(str(out_dir))
    if not weights:
        for path in out_dir.rglob("*"):
            if path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json"):
                path.unlink()


def save_component(folder: Path, library_class: list[str], state: dict[str, torch.Tensor]) -> None:
    """Rebuild one trained component from its saved config and `state`, and save it there."""
    import importlib

    library, class_name = library_class
    cls = getattr(importlib.import_module(library), class_name)
    if library == "diffusers":
        model = cls.from_config(cls.load_config(str(folder)))
    else:
        config_cls = cls.config_class
        model = cls(config_cls.from_pretrained(str(folder)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("position_ids" not in key for key in missing):
        raise ValueError(f"{folder.name}: weights do not match (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")  # fmt: skip
    for path in folder.iterdir():
        if path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json"):
            path.unlink()
    model.save_pretrained(str(folder))


def save_lora_unet(
    folder: Path, base_dir: Path, lora: dict[str, Any], state: dict[str, torch.Tensor]
) -> None:
    """The base UNet with the checkpoint's LoRA adapters merged into its weights, saved there."""
    from diffusers import UNet2DConditionModel

    from fmray.models.diffusion import add_unet_lora, merge_lora

    unet = UNet2DConditionModel.from_pretrained(str(base_dir))
    add_unet_lora(unet, lora["r"], lora["alpha"], lora["target_modules"])
    _, unexpected = unet.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(
            f"unet: LoRA weights do not match the config (unexpected {unexpected[:3]})"
        )
    merge_lora(unet)
    for path in folder.iterdir():
        if path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json"):
            path.unlink()
    unet.save_pretrained(str(folder))


def write_samples(ckpt_dir: Path, images: np.ndarray, live: LiveExport) -> None:
    from PIL import Image

    np.save(ckpt_dir / f"{SAMPLES}.npy", images.astype(np.float32))
    settings = {
        "prompts": live.prompts,
        "seed": live.seed,
        "steps": live.steps,
        "guidance_scale": live.guidance_scale,
        "sampler": live.sampler,
    }
    (ckpt_dir / f"{SAMPLES}.json").write_text(json.dumps(settings, indent=2))
    Image.fromarray(sample_grid(images)).save(ckpt_dir / f"{SAMPLES}.png")


def sample_grid(images: np.ndarray, columns: int = 6, min_side: int = 96) -> np.ndarray:
    """N images (floats in [0, 1]) tiled into rows of `columns`, upscaled (nearest) so small
    images stay visible; a 2-pixel grey border around each."""
    count, height, width, _ = images.shape
    scale = max(1, -(-min_side // max(height, width)))
    tiles = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    tile_h, tile_w = height * scale + 2, width * scale + 2
    columns = min(columns, count)
    rows = -(-count // columns)
    grid = np.full((rows * tile_h, columns * tile_w, 3), 96, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * tile_h + 1 : r * tile_h + tile_h - 1, c * tile_w + 1 : c * tile_w + tile_w - 1] = (
            tile
        )
    return grid

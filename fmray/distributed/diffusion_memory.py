"""The memory Workload of `fmray diffusion`: UNet (trained or LoRA), text encoder (trained or
frozen), VAE (latent models), the EMA copy, and the UNet's activations.

    fmray plan --config jobs/diffusion/sd15.yaml --gpu-memory 80GiB

Components are built on torch's meta device from the preset, the local diffusers folder, or
(for a Stable Diffusion 1.x path not on this machine) diffusers' SD-1.x layout. Activations are
traced, not guessed: one forward of the meta UNet at the run's micro-batch and resolution under
`saved_tensors_hooks` adds up every tensor autograd keeps for backward.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from fmray.config import ConfigError
from fmray.distributed.workload import ModelPart, Workload, _meta_stats, lora_param_count

# Stable Diffusion 1.x as diffusers lays it out (UNet2DConditionModel's defaults are SD-1.x's
# but for the 768-wide CLIP ViT-L/14 text encoder it reads).
SD1_UNET = dict(cross_attention_dim=768, sample_size=64)
SD1_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
)
SD1_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
    sample_size=512,
)
SD1_NAMES = ("stable-diffusion-v1", "stable-diffusion-1", "sd15", "sd-1", "sd1")


def component_configs(path: str | None, preset: str | None) -> tuple[dict, dict, dict | None, int]:
    """(unet, text encoder, vae or None, default resolution) configs of a diffusion model."""
    from fmray.models.diffusion import PRESETS

    if path is not None and (Path(path) / "model_index.json").is_file():
        return _folder_configs(Path(path))
    if path is not None:
        name = str(path).lower().replace("_", "-")
        if preset is None and not any(key in name for key in SD1_NAMES):
            raise ConfigError(
                f"config error: model.path={path!r} is not a diffusers folder on this machine; "
                f"plan it as a preset with --model-preset (allowed: {', '.join(PRESETS)}) or "
                "name a Stable Diffusion 1.x folder"
            )
        if preset is None:
            return dict(SD1_UNET), dict(SD1_TEXT), dict(SD1_VAE), 512
    spec = PRESETS[preset or "tiny"]
    text = {"vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, **spec["text_encoder"]}
    return dict(spec["unet"]), text, spec.get("vae"), spec["resolution"]


def _folder_configs(root: Path) -> tuple[dict, dict, dict | None, int]:
    import json

    def read(name: str) -> dict | None:
        file = root / name / "config.json"
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None

    unet, text, vae = read("unet"), read("text_encoder"), read("vae")
    if unet is None or text is None:
        raise ConfigError(f"config error: model.path={str(root)!r} has no unet/ or text_encoder/")
    scale = 2 ** (len(vae["block_out_channels"]) - 1) if vae else 1
    return unet, text, vae, int(unet["sample_size"]) * scale


def _without_private(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def diffusion_workload(config: Any, model_preset: str | None) -> Workload:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, text_cfg, vae_cfg, resolution = component_configs(
        config.model.path, model_preset or (config.model.preset if not config.model.path else None)
    )
    resolution = config.data.resolution or resolution
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_without_private(unet_cfg))
        text = CLIPTextModel(CLIPTextConfig(**_without_private(text_cfg)))
        vae = AutoencoderKL.from_config(_without_private(vae_cfg)) if vae_cfg else None
    ema = config.diffusion.ema_decay > 0
    total, persistent, largest = _meta_stats(unet)
    trainable = total
    if config.lora is not None:
        trainable = lora_param_count(unet, list(config.lora.target_modules), config.lora.r)
        total += trainable
    parts = [ModelPart("unet", total, trainable, True, ema, False, persistent, largest)]
    text_total, text_persistent, text_largest = _meta_stats(text)
    if config.model.train_text_encoder:
        trained_text = ModelPart(
            "text encoder", text_total, text_total, True, ema, False, text_persistent, text_largest
        )
        parts.append(trained_text)
    else:
        parts.append(ModelPart("text encoder", text_total, 0, engine=False, fp32=True))
    if vae is not None:
        parts.append(ModelPart("vae", _meta_stats(vae)[0], 0, engine=False, fp32=True))
    scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1) if vae_cfg else 1
    latent = resolution // scale
    channels = int(unet_cfg.get("in_channels", 4))
    text_len = int(text_cfg.get("max_position_embeddings", 77))

    @functools.cache
    def activations(micro: int, checkpointing: bool, bf16: bool) -> int:
        return traced_unet_bytes(
            unet, micro, channels, latent, text_len, text_cfg, checkpointing, bf16
        )

    note = f"UNet traced at {latent}x{latent}x{channels} inputs, {text_len} text tokens"
    return Workload("diffusion", parts, activations, note)


def traced_unet_bytes(
    unet: Any,
    micro: int,
    channels: int,
    side: int,
    text_len: int,
    text_cfg: dict,
    checkpointing: bool,
    bf16: bool,
) -> int:
    """Bytes autograd saves in one forward of the meta UNet (each tensor counted once)."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    dtype = torch.bfloat16 if bf16 else torch.float32
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its note on casting with .to() is about loading
    unet = unet.to(dtype)
    diffusers_logging.set_verbosity(level)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    unet.train()
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    width = int(unet.config.cross_attention_dim or text_cfg["hidden_size"])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        noisy = torch.empty(micro, channels, side, side, device="meta", dtype=dtype)
        steps = torch.zeros(micro, device="meta", dtype=torch.long)
        context = torch.empty(micro, text_len, width, device="meta", dtype=dtype)
        out = unet(noisy, steps, encoder_hidden_states=context).sample
    # The prediction, its loss and their gradients in backward are a few copies of the output.
    return sum(saved.values()) + 3 * out.numel() * 4

"""The denoising loop of a served image model: many prompts in one loop, each image with its own
seeded generator and its own guidance scale, as diffusers' pipelines compute one image.

    fmray serve --config jobs/serve/image_tiny.yaml      # one ImagePipeline per replica
    python bench/serve_diffusion.py                      # its images/s, batched vs one at a time

`ImagePipeline.load(path)` reads a diffusers directory in either layout fmray trains (IF-style
pixel space: tokenizer, text encoder, UNet, scheduler; Stable-Diffusion-style latent space: + VAE),
or the newest `pipeline/` of an fmray diffusion run. `generate(specs, width, height, steps)` is
what the engine thread calls per batch. The stock pipelines take one guidance scale per call and
so cannot mix requests; this loop takes one per image, and gives the stock pipeline's images
(tests/unit/test_serve_images.py compares them).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmray.models.diffusion import LATENT, PIXEL, TEXT_LEN, encode_text, prepare_caption, space_of

PIPELINE_DIR = "pipeline"


@dataclass(frozen=True)
class ImageSpec:
    """One image to generate."""

    prompt: str
    negative_prompt: str
    seed: int
    guidance_scale: float


def find_pipeline_dir(path: str | Path) -> str:
    """The diffusers pipeline folder `path` names: the folder itself (model_index.json), a
    checkpoint's pipeline/, or the newest checkpoint's pipeline/ with weights in a run folder."""
    from fmray import storage
    from fmray.checkpoint import list_checkpoints

    location = storage.resolve(str(path))
    if storage.is_file(storage.join(location, "model_index.json")):
        return location
    candidates = [storage.join(location, PIPELINE_DIR)]
    candidates += [storage.join(c, PIPELINE_DIR) for c in reversed(list_checkpoints(location))]
    for candidate in candidates:
        if _has_unet_weights(candidate):
            return candidate
    raise FileNotFoundError(
        f"{path} is neither a diffusers pipeline folder (model_index.json) nor an fmray "
        "diffusion checkpoint or run folder with a pipeline (checkpoint_*/pipeline with weights)"
    )


def _has_unet_weights(pipeline_dir: str) -> bool:
    from fmray import storage

    unet = storage.join(pipeline_dir, "unet")
    try:
        return any(name.endswith(".safetensors") for name in storage.list_names(unet))
    except (FileNotFoundError, NotADirectoryError):
        return False


class ImagePipeline:
    """The components of a text-to-image pipeline, on one device, in eval mode."""

    def __init__(self, space: str, components: dict[str, Any], device: torch.device) -> None:
        self.space = space
        self.tokenizer = components["tokenizer"]
        self.text_encoder = components["text_encoder"].to(device).eval()
        self.unet = components["unet"].to(device).eval()
        self.vae = components.get("vae") if space == LATENT else None
        if self.vae is not None:
            self.vae = self.vae.to(device).eval()
        self.scheduler_config = components["scheduler"].config
        self.scheduler_class = type(components["scheduler"])
        self.device = device
        self.dtype = self.unet.dtype

    @classmethod
    def load(cls, path: str | Path, dtype: str = "auto", num_gpus: float = 0.0) -> ImagePipeline:
        from diffusers import DiffusionPipeline

        from fmray import storage
        from fmray.serve.loading import pick_device

        model_dir = storage.local_copy(find_pipeline_dir(path))
        device = pick_device(num_gpus)
        torch_dtype = _pick_dtype(dtype, device)
        pipeline = DiffusionPipeline.from_pretrained(
            str(model_dir), dtype=torch_dtype, use_safetensors=True
        )
        loaded = cls(space_of(model_dir), pipeline.components, device)
        loaded.model_dir = Path(model_dir)
        return loaded

    # ---- sizes ----

    def latent_factor(self) -> int:
        """Image pixels per UNet sample pixel (the VAE's downsampling; 1 in pixel space)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def native_size(self) -> tuple[int, int]:
        """(width, height) the UNet was built for."""
        sample = self.unet.config.sample_size
        height, width = (sample, sample) if isinstance(sample, int) else tuple(sample)
        factor = self.latent_factor()
        return int(width) * factor, int(height) * factor

    def size_multiple(self) -> int:
        """Sides must divide by this: the UNet halves its input once per down block but the last."""
        return self.latent_factor() * 2 ** (len(self.unet.config.down_block_types) - 1)

    # ---- the loop ----

    @torch.no_grad()
    def generate(self, specs: list[ImageSpec], width: int, height: int, steps: int) -> np.ndarray:
        """Images (N x H x W x 3 floats in [0, 1]) for `specs`, denoised together."""
        guided = [spec.guidance_scale > 1.0 for spec in specs]
        any_guided = any(guided) and getattr(self.unet.config, "time_cond_proj_dim", None) is None
        prompts = self.encode([spec.prompt for spec in specs])
        if any_guided:  # one batch: [negatives, prompts], as the stock pipelines lay it out
            negatives = self.encode([spec.negative_prompt for spec in specs])
            prompts = torch.cat([negatives, prompts])
        generators = [torch.Generator("cpu").manual_seed(spec.seed) for spec in specs]
        scheduler = self.scheduler_class.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        step_kwargs = _step_kwargs(scheduler, generators)
        sample = self.initial_noise(generators, width, height) * scheduler.init_noise_sigma
        scale = torch.tensor([spec.guidance_scale for spec in specs], dtype=sample.dtype)
        scale = scale.to(self.device).view(-1, 1, 1, 1)
        mask = torch.tensor(guided, device=self.device).view(-1, 1, 1, 1)
        channels = sample.shape[1]
        for t in scheduler.timesteps:
            model_input = torch.cat([sample] * 2) if any_guided else sample
            model_input = scheduler.scale_model_input(model_input, t)
            output = self.unet(model_input, t, encoder_hidden_states=prompts, return_dict=False)[0]
            if any_guided:
                uncond, text = output.chunk(2)
                uncond, eps = uncond[:, :channels], text[:, :channels]
                eps = torch.where(mask, uncond + scale * (eps - uncond), eps)
                output = torch.cat([eps, text[:, channels:]], dim=1)
            if getattr(scheduler.config, "variance_type", None) not in ("learned", "learned_range"):
                output = output[:, :channels]
            sample = scheduler.step(output, t, sample, **step_kwargs, return_dict=False)[0]
        return self.decode(sample)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Prompt embeddings as the space's pipeline computes them."""
        length = TEXT_LEN if self.space == PIXEL else int(self.tokenizer.model_max_length)
        tokens = self.tokenizer(
            [prepare_caption(self.space, text) for text in texts],
            padding="max_length",
            max_length=length,
            truncation=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        return encode_text(self.space, self.text_encoder, ids, mask).to(self.dtype)

    def initial_noise(self, generators: list[torch.Generator], width: int, height: int) -> Any:
        """One draw per image from its own CPU generator (diffusers' randn_tensor with a list):
        an image's noise does not depend on the batch around it, nor on the device."""
        factor = self.latent_factor()
        shape = (1, self.unet.config.in_channels, height // factor, width // factor)
        draws = [torch.randn(shape, generator=g, dtype=self.dtype) for g in generators]
        return torch.cat(draws).to(self.device)

    def decode(self, sample: torch.Tensor) -> np.ndarray:
        if self.vae is not None:
            sample = self.vae.decode(sample / self.vae.config.scaling_factor, return_dict=False)[0]
        images = (sample / 2 + 0.5).clamp(0, 1)
        return images.cpu().permute(0, 2, 3, 1).float().numpy()


def _step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    """The per-image generators for samplers that add noise at each step (DDPM, ancestral)."""
    accepted = inspect.signature(scheduler.step).parameters
    return {"generator": generators} if "generator" in accepted else {}


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]

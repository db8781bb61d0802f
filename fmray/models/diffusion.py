"""Text-to-image models: tiny presets, loading diffusers directories, the trained denoiser and
the pipelines that sample from it.

    python -c "from fmray.models.diffusion import build_preset; build_preset('tiny', 'tiny-t2i')"

Two model spaces, told apart by the directory's `model_index.json`:
- pixel (`IFPipeline` layout: tokenizer, text_encoder, unet, scheduler): the UNet denoises RGB
  images directly; the built-in `tiny` preset (32x32, a small CLIP text encoder);
- latent (`StableDiffusionPipeline` layout: + vae): the UNet denoises VAE latents; any local
  Stable Diffusion 1.x/2.x directory, or the `tiny-latent` preset (random, for tests and CPU).
Both load back with stock `diffusers.DiffusionPipeline.from_pretrained`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PIXEL, LATENT = "pixel", "latent"
PIPELINE_CLASSES = {PIXEL: "IFPipeline", LATENT: "StableDiffusionPipeline"}
# The IF pipeline always encodes prompts at this length; Stable Diffusion uses the tokenizer's.
TEXT_LEN = 77
SAMPLERS = ("ddim", "dpm")
# The UNet's attention projections: where LoRA adapters go by default (as diffusers' scripts do).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=TEXT_LEN,
)
# Plain data (no diffusers import), so configs validate cheaply.
PRESETS: dict[str, dict[str, Any]] = {
    # ~1M-parameter pixel-space UNet at 32x32 (cross-attention at 8x8): a 16-image step takes
    # ~0.4 s on one CPU core. The pooled prompt also enters every ResNet block through the time
    # embedding, as a scale and a shift (IF's "text" addition embedding, ADM's scale-shift norm):
    # with cross-attention alone the colours came out mixed and speckled after 400 steps.
    "tiny": dict(
        space=PIXEL,
        resolution=32,
        unet=dict(
            sample_size=32,
            in_channels=3,
            out_channels=6,  # IF layout: epsilon (or v) and a variance the samplers ignore
            block_out_channels=(16, 32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=8,
            norm_num_groups=8,
            addition_embed_type="text",
            addition_embed_type_num_heads=4,
            resnet_time_scale_shift="scale_shift",
        ),
        text_encoder=_TEXT,
    ),
    # Random Stable-Diffusion-style components (VAE /2, 4 latent channels) for the latent path.
    "tiny-latent": dict(
        space=LATENT,
        resolution=32,
        vae=dict(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=32,
        ),
        unet=dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=8,
            norm_num_groups=8,
        ),
        text_encoder=_TEXT,
    ),
}


# ----------------------------------------------------------------------------- presets


def caption_tokenizer(words: list[str]) -> Any:
    """A CLIP tokenizer (byte-level BPE, CLIP's pre-tokenizer) whose merges spell `words` as
    single tokens; any other text falls back to byte characters, so every caption encodes."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = list(bytes_to_unicode().values())
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(words)):
        # Merge as BPE will (lowest rank first), then add merges until the word is one token.
        pieces = bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = bpe(pieces, ranks)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_LEN)


def bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """`pieces` after applying merges in rank order (what a BPE tokenizer does to a word)."""
    while True:
        pairs = [
            (ranks.get(pair, len(ranks)), i)
            for i, pair in enumerate(zip(pieces, pieces[1:], strict=False))
        ]
        rank, i = min(pairs, default=(len(ranks), -1))
        if rank == len(ranks):
            return pieces
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2 :]]


def build_preset(name: str, out_dir: str | Path, words: list[str] | None = None) -> Path:
    """Build a preset from the current torch seed and save it as a diffusers pipeline directory."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fmray.data.images import caption_words

    spec = PRESETS[name]
    tokenizer = caption_tokenizer(words if words is not None else caption_words())
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1,
        **spec["text_encoder"],
    )  # fmt: skip
    components: dict[str, Any] = dict(
        tokenizer=tokenizer,
        text_encoder=CLIPTextModel(text_config),
        unet=UNet2DConditionModel(**spec["unet"]),
        # v-prediction: a small pixel model trained briefly gives clean backgrounds with it,
        # where epsilon-prediction left noise all over its few-step samples (measured here).
        scheduler=DDPMScheduler(
            num_train_timesteps=1000,
            beta_schedule="squaredcos_cap_v2",
            prediction_type="v_prediction",
        ),
    )
    if spec["space"] == LATENT:
        components["vae"] = AutoencoderKL(**spec["vae"])
        components["scheduler"] = DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
            beta_end=0.012, clip_sample=False,
        )  # fmt: skip
    pipeline = make_pipeline(spec["space"], components)
    pipeline.save_pretrained(str(out_dir))
    return Path(out_dir)


# ----------------------------------------------------------------------------- loading


def space_of(model_dir: str | Path) -> str:
    """pixel or latent, from model_index.json; ValueError for other pipelines."""
    index_path = Path(model_dir) / "model_index.json"
    if not index_path.is_file():
        raise ValueError(f"{model_dir} is not a diffusers pipeline directory (no model_index.json)")
    class_name = json.loads(index_path.read_text())["_class_name"]
    for space, name in PIPELINE_CLASSES.items():
        if class_name == name:
            return space
    raise ValueError(
        f"{model_dir} holds a {class_name}; fmray trains {', '.join(PIPELINE_CLASSES.values())}"
    )


@dataclass
class Parts:
    """A pipeline's components as loaded for training."""

    space: str
    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any | None
    noise_scheduler: Any
    """DDPMScheduler of training (the noise schedule and the prediction type)."""


def load_parts(model_dir: str | Path, prediction_type: str | None) -> Parts:
    """Components of a local diffusers directory, fp32, for training."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    model_dir = Path(model_dir)
    space = space_of(model_dir)
    scheduler = DDPMScheduler.from_pretrained(str(model_dir), subfolder="scheduler")
    if prediction_type is not None:
        scheduler.register_to_config(prediction_type=prediction_type)
    vae = None
    if space == LATENT:
        vae = AutoencoderKL.from_pretrained(str(model_dir), subfolder="vae")
        vae.requires_grad_(False).eval()
    return Parts(
        space=space,
        tokenizer=AutoTokenizer.from_pretrained(str(model_dir / "tokenizer")),
        text_encoder=CLIPTextModel.from_pretrained(str(model_dir), subfolder="text_encoder"),
        unet=UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet"),
        vae=vae,
        noise_scheduler=scheduler,
    )


def text_length(parts: Parts) -> int:
    return TEXT_LEN if parts.space == PIXEL else int(parts.tokenizer.model_max_length)


def prepare_caption(space: str, caption: str) -> str:
    """The text the pipeline encodes for `caption` (the IF pipeline lower-cases and strips)."""
    return caption.lower().strip() if space == PIXEL else caption


def encode_text(
    space: str, text_encoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Prompt embeddings exactly as the space's pipeline computes them (IF passes the padding
    mask; Stable Diffusion passes it only when the encoder's config asks for it)."""
    use_mask = space == PIXEL or getattr(text_encoder.config, "use_attention_mask", False)
    return text_encoder(input_ids, attention_mask=attention_mask if use_mask else None)[0]


class Denoiser(torch.nn.Module):
    """What trains: the UNet, plus the text encoder when it trains jointly (else frozen, outside
    the DeepSpeed engine, and its embeddings come in as `encoder_hidden_states`)."""

    def __init__(self, space: str, unet: Any, text_encoder: Any | None) -> None:
        super().__init__()
        self.space = space
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.text_encoder is not None:
            encoder_hidden_states = encode_text(
                self.space, self.text_encoder, input_ids, attention_mask
            )
        assert encoder_hidden_states is not None
        dtype = self.unet.dtype  # bf16 engines: cast the fp32 inputs
        out = self.unet(
            noisy.to(dtype), timesteps, encoder_hidden_states=encoder_hidden_states.to(dtype)
        ).sample
        # IF-layout UNets also output a variance (out_channels = 2 x in): fmray's samplers use
        # fixed variances, so only the first half is the prediction, and only it trains.
        return out[:, : noisy.shape[1]].float()


def add_unet_lora(unet: Any, r: int, alpha: float, target_modules: list[str]) -> None:
    """Freeze the UNet and add LoRA adapters (peft) to `target_modules`: only they train."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(
        r=r, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules)
    )
    try:
        unet.add_adapter(config)
    except ValueError as err:  # peft names the modules it could not find
        raise ValueError(f"lora.target_modules={target_modules}: {err}") from None


def merge_lora(unet: Any) -> Any:
    """Fold LoRA adapters into the weights and drop them: a plain UNet2DConditionModel."""
    if getattr(unet, "peft_config", None):
        unet.fuse_lora()
        unet.unload_lora()
    return unet


# ----------------------------------------------------------------------------- pipelines


def sampler_scheduler(noise_scheduler: Any, sampler: str) -> Any:
    """The fast sampler a pipeline is saved with, on the training noise schedule."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if sampler == "ddim":
        return DDIMScheduler.from_config(noise_scheduler.config)
    return DPMSolverMultistepScheduler.from_config(noise_scheduler.config)


def build_servable_preset(name: str, out_dir: str | Path, sampler: str = "dpm") -> Path:
    """A preset (seed 0) saved with the fast sampler fmray's checkpoints carry: a random-weight
    pipeline for serving tests and benchmarks (a loop's cost does not depend on the weights)."""
    import torch
    from diffusers import DiffusionPipeline

    torch.manual_seed(0)
    build_preset(name, out_dir)
    pipeline = DiffusionPipeline.from_pretrained(str(out_dir))
    pipeline.scheduler = sampler_scheduler(pipeline.scheduler, sampler)
    pipeline.save_pretrained(str(out_dir))
    return Path(out_dir)


def make_pipeline(space: str, components: dict[str, Any]) -> Any:
    """The stock diffusers pipeline of `space` over in-memory components."""
    from diffusers import IFPipeline, StableDiffusionPipeline

    if space == PIXEL:
        return IFPipeline(
            safety_checker=None,
            feature_extractor=None,
            watermarker=None,
            requires_safety_checker=False,
            **components,
        )
    return StableDiffusionPipeline(
        safety_checker=None, feature_extractor=None, requires_safety_checker=False, **components
    )


def pipeline_of(
    parts: Parts, denoiser: Denoiser, weights: dict[str, torch.Tensor] | None, sampler: str
) -> Any:
    """A pipeline over fp32 copies of the trained modules, with `weights` (EMA) when given,
    the frozen components of `parts` and the fast sampler."""
    trained = copy.deepcopy(denoiser).float().eval()
    if weights is not None:
        trained.load_state_dict(weights, strict=False)
    merge_lora(trained.unet)
    components = dict(
        tokenizer=parts.tokenizer,
        text_encoder=trained.text_encoder or parts.text_encoder,
        unet=trained.unet,
        scheduler=sampler_scheduler(parts.noise_scheduler, sampler),
    )
    if parts.space == LATENT:
        components["vae"] = parts.vae
    pipeline = make_pipeline(parts.space, components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(
    pipeline: Any, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float
) -> Any:
    """Images (numpy, N x H x W x 3 in [0, 1]) for `prompts`, one generator per image seeded
    from `seeds`: the same seed gives the same image whatever batch it is in."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    kwargs: dict[str, Any] = {"clean_caption": False} if "IF" in type(pipeline).__name__ else {}
    with torch.no_grad():
        return pipeline(
            prompts,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="np",
            **kwargs,
        ).images

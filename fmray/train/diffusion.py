"""Text-to-image diffusion training: Ray Train workers run a DeepSpeed engine over a UNet (and,
per config, its text encoder) that learns to reverse noise added to captioned images.

    fmray diffusion --config jobs/diffusion/tiny.yaml            # CPU, 2 workers, built-in shapes
    fmray diffusion --config jobs/diffusion/tiny.yaml model.preset=tiny-latent zero.stage=2
    fmray diffusion --config jobs/diffusion/sd15.yaml            # GPU cluster, Stable Diffusion
    python -m fmray diffusion --config jobs/diffusion/tiny.yaml train.max_steps=50

`model.preset=tiny` is a pixel-space 32x32 UNet with a small CLIP text encoder (built from the
seed, saved into the run folder and loaded back like any model); `model.path` is a local diffusers
Stable Diffusion directory (VAE and text encoder frozen, UNet trained). Training is DDPM with
epsilon or v-prediction, caption dropout for classifier-free guidance, EMA of the trained weights,
optional min-SNR weighting, LoRA on the UNet (`lora.r=8`), bf16 and gradient checkpointing,
under ZeRO 0-2.

Everything lands in <run.output_dir>/<run.name>/: config.yaml, metrics.jsonl, tensorboard/,
base_model/ (presets), data/ (image shards) and one folder per checkpoint holding pipeline/ (a
diffusers pipeline with a DDIM or DPM-Solver sampler) and samples.png. On the built-in set every
evaluation also reports prompt adherence (colour, shape, position accuracy of generated images).
Running the same command again resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from fmray import storage
from fmray.config import (
    CheckpointSection,
    ConfigError,
    LoggingSection,
    RunSection,
    ScalingSection,
    Section,
    TrainSection,
    ZeroSection,
    dump_config,
)
from fmray.data.images import ImageDataSection
from fmray.models.diffusion import PRESETS
from fmray.train.plan import TrainPlan

KIND = "diffusion"
MODULE = "denoiser"


class DiffusionModelSection(Section):
    preset: str | None = "tiny"
    """Preset (fmray.models.diffusion.PRESETS): tiny (pixel space), tiny-latent (random, latent)."""
    path: str | None = None
    """Local diffusers directory (Stable Diffusion 1.x/2.x, an fmray export); overrides preset."""
    train_text_encoder: bool = False
    """Train the text encoder jointly with the UNet (else it stays frozen)."""
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """What the UNet predicts; null: the model's scheduler config decides."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""

    @model_validator(mode="after")
    def _one_source(self) -> DiffusionModelSection:
        if self.path is None and self.preset not in PRESETS:
            raise ValueError(
                f"model.preset={self.preset!r} is unknown (allowed: {', '.join(PRESETS)}), "
                "or set model.path"
            )
        return self


class UnetLoraSection(Section):
    r: int = Field(8, ge=1)
    """Rank of the adapter matrices."""
    alpha: float = Field(8.0, gt=0.0)
    """Scale numerator: the adapter's update is multiplied by alpha / r."""
    target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]
    """UNet modules that get adapters (default: the attention projections)."""


class DiffusionSection(Section):
    caption_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of captions replaced by the empty prompt (classifier-free guidance)."""
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    """EMA of the trained weights (warmed up as min(decay, (1+s)/(10+s))); 0 disables EMA."""
    snr_gamma: float | None = Field(None, gt=0.0)
    """Min-SNR loss weighting with this gamma (5.0 in the paper); null: plain MSE."""
    noisiest_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of training timesteps drawn from the noisiest `noisiest_span` of the schedule
    (the rest uniform): there the image is all noise and only the prompt can say where the
    object goes, which is what the first sampling step commits to. 0: all uniform."""
    noisiest_span: float = Field(0.01, gt=0.0, le=1.0)
    """Share of the schedule counted as noisiest (0.01: t >= 990 of 1000 timesteps)."""


class SampleSection(Section):
    sampler: Literal["ddim", "dpm"] = "dpm"
    """Sampler of the exported pipeline and of evaluation: DDIM or DPM-Solver++."""
    steps: int = Field(20, ge=1)
    """Denoising steps per image."""
    guidance_scale: float = Field(4.0, ge=1.0)
    """Classifier-free guidance scale (1: none)."""
    num_adherence_prompts: int = Field(54, ge=0)
    """Built-in prompts scored for adherence at each evaluation (all 54 by default; 0: skip)."""
    batch_size: int = Field(32, ge=1)
    """Images generated together per worker."""
    prompts: list[str] | None = None
    """Prompts of each checkpoint's samples.png; null: 12 built-in prompts or held-out captions."""
    seed: int = 0
    """Seed of sample i is seed + i (an export reproduces it)."""


class DiffusionConfig(Section):
    run: RunSection = RunSection(name="diffusion")
    model: DiffusionModelSection = DiffusionModelSection()
    lora: UnetLoraSection | None = None
    """LoRA adapters on the UNet (setting any lora.* key enables them; the UNet is frozen and
    only they train; exports merge them); null: the whole UNet trains."""
    data: ImageDataSection = ImageDataSection()
    diffusion: DiffusionSection = DiffusionSection()
    sample: SampleSection = SampleSection()
    train: TrainSection = TrainSection(
        lr=1e-3, max_steps=600, micro_batch_size=16, warmup_steps=20, eval_every=200
    )
    zero: ZeroSection = ZeroSection()
    checkpoint: CheckpointSection = CheckpointSection()
    scaling: ScalingSection = ScalingSection()
    logging: LoggingSection = LoggingSection()

    @model_validator(mode="after")
    def _zero_stages(self) -> DiffusionConfig:
        if self.zero.stage == 3:
            raise ValueError(
                "zero.stage=3 is not supported by diffusion (allowed: 0, 1, 2; the UNet is "
                "sampled whole on every rank at each evaluation)"
            )
        return self


class DiffusionPlan(TrainPlan):
    """The run plan plus the model's space and the prompts evaluation and samples use."""

    space: str
    """pixel or latent."""
    resolution: int
    """Image side in pixels."""
    adherence_prompts: list[str]
    """Built-in prompts scored at each evaluation (empty for other data)."""
    adherence_attributes: list[dict[str, str]]
    """Their colour, shape and position."""
    sample_prompts: list[str]
    """Prompts of each checkpoint's samples.png."""


# ----------------------------------------------------------------------------- per worker


class EMA:
    """Exponential moving average of the trained parameters (fp32, on every rank: ZeRO 0-2
    keep whole parameters everywhere, so every rank's average is the same)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {
            name: p.detach().float().clone()
            for name, p in module.named_parameters()
            if p.requires_grad
        }

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, param in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: value.detach().cpu() for name, value in self.shadow.items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            self.shadow[name].copy_(value)


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build engine, resume, then step / log / eval / checkpoint."""
    import ray.train
    import torch.distributed as dist

    from fmray.checkpoint.diffusion import LiveExport
    from fmray.data.images import COLUMNS
    from fmray.data.pipeline import iter_micro_batches, iter_train_batches, rank_block_indices
    from fmray.distributed.deepspeed_setup import build_ds_config
    from fmray.models.diffusion import Denoiser, add_unet_lora, load_parts, text_length
    from fmray.train.checkpointing import Export, checkpoint_and_report, lineage, resume
    from fmray.train.launch import local_dir_of, record_placement_group
    from fmray.train.metrics import MetricsLogger, print_line
    from fmray.train.worker import build_train_engine, grad_norm_of, setup_worker

    config: DiffusionConfig = loop_config["config"]
    plan: DiffusionPlan = loop_config["plan"]
    train, diff = config.train, config.diffusion

    # --- setup: same seed everywhere (identical weights), then one noise stream per rank
    worker = setup_worker(config.run.seed, config.scaling.use_gpu)
    rank, world, device = worker.rank, worker.world, worker.device
    ds_config = build_ds_config(train, config.zero, world, config.scaling.use_gpu)
    assert plan.model_path is not None
    parts = load_parts(local_dir_of(plan.model_path), config.model.prediction_type)
    if config.lora is not None:
        lora = config.lora
        add_unet_lora(parts.unet, lora.r, lora.alpha, lora.target_modules)
    train_text = config.model.train_text_encoder
    denoiser = Denoiser(parts.space, parts.unet, parts.text_encoder if train_text else None)
    if config.model.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
        if train_text:
            parts.text_encoder.gradient_checkpointing_enable()
    if not train_text:
        parts.text_encoder.requires_grad_(False).eval()
    parts.text_encoder.to(device)
    if parts.vae is not None:
        parts.vae.to(device)
    engine = build_train_engine(denoiser, ds_config, train)
    engines = {MODULE: engine}
    ema = EMA(engine.module, diff.ema_decay) if diff.ema_decay > 0 else None
    torch.manual_seed(config.run.seed * 1000 + 1 + rank)  # restored from checkpoints on resume

    # --- resume: engine, optimizer, scheduler, RNG, EMA; data position from the step
    start_step = resume(engines, train, plan, KIND)
    if start_step and ema is not None:
        load_ema(ema, plan)
    if worker.is_chief:
        if start_step:
            print_line(f"resumed from step {start_step}")
        record_placement_group(plan.run_dir)
    # fmray's own progress line below counts images, not tokens.
    quiet = config.logging.model_copy(update={"progress": False})
    logger = MetricsLogger(plan.run_dir, start_step, quiet) if worker.is_chief else None

    micro, accum = train.micro_batch_size, train.grad_accum_steps
    global_batch = micro * accum * world
    batches = iter_train_batches(
        ray.train.get_dataset_shard(f"train_rank{rank}"),
        rank,
        world,
        micro,
        start_step,
        global_batch,
        plan.num_train_rows,
        plan.seq_len,
        COLUMNS,
    )
    eval_rows = list(
        iter_micro_batches(
            ray.train.get_dataset_shard(f"eval_rank{rank}"),
            micro,
            0,
            rank_block_indices(rank, world, micro, 0, plan.num_eval_batches * micro * world),
            COLUMNS,
        )
    )
    empty = parts.tokenizer(
        [""], padding="max_length", max_length=text_length(parts), return_tensors="pt"
    )
    live = LiveExport(
        parts=parts,
        ema=ema,
        sampler=config.sample.sampler,
        prompts=plan.sample_prompts,
        seed=config.sample.seed,
        steps=config.sample.steps,
        guidance_scale=config.sample.guidance_scale,
    )
    export = Export(KIND, MODULE, live, config.checkpoint.export_hf)
    config_yaml = dump_config(config)
    stop_step = min(plan.stop_step or train.max_steps, train.max_steps)
    run_start = time.perf_counter()

    for step in range(start_step, stop_step):
        # --- forward / backward over the accumulation window, one optimizer step, EMA
        step_start = time.perf_counter()
        engine.train()
        loss_sum = torch.zeros((), device=device)
        grad_norm = None
        for _ in range(accum):
            batch = {k: torch.from_numpy(v) for k, v in next(batches).items()}
            batch = drop_captions(batch, empty, diff.caption_dropout)
            loss = diffusion_loss(engine, parts, batch, plan.resolution, diff, train_text, device)
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary() and config.zero.stage == 0:
                grad_norm = grad_norm_of(engine.module)  # before clipping
            engine.step()
            loss_sum += loss.detach().float()
        done = step + 1
        if ema is not None:
            ema.update(engine.module, done)

        # --- log: mean loss over ranks and micro-batches
        metrics: dict[str, Any] = {}
        if done % train.log_every == 0 or done == stop_step:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            step_time = time.perf_counter() - step_start
            if grad_norm is None:
                grad_norm = engine.get_global_grad_norm()
            metrics = {
                "step": done,
                "loss": loss_sum.item() / (accum * world),
                "lr": engine.get_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "images_per_s": global_batch / step_time,
                "step_time_s": step_time,
                "elapsed_s": time.perf_counter() - run_start,
            }

        # --- evaluate: loss on held-out images at fixed noise; adherence of generated images
        evaluate = bool(train.eval_every and done % train.eval_every == 0) or done == stop_step
        if evaluate:
            metrics["step"] = done
            metrics["val_loss"] = val_loss(engine, parts, eval_rows, plan, config, device)
            if plan.adherence_prompts:
                metrics.update(adherence_eval(engine, parts, ema, plan, config, rank, world))
        if worker.is_chief and config.logging.progress and "loss" in metrics:
            print_line(progress_text(metrics, train.max_steps))
        if logger and metrics:
            logger.log(metrics, train.max_steps)

        # --- checkpoint: DeepSpeed state, EMA, the pipeline and samples.png
        every = config.checkpoint.every_steps
        if (every and done % every == 0) or done == stop_step:
            metrics.setdefault("step", done)
            meta = lineage(config.run.name, plan, start_step)
            checkpoint_and_report(metrics, done, engines, export, config_yaml, meta)
        elif evaluate:
            ray.train.report(metrics)
    if logger:
        logger.close()


def drop_captions(
    batch: dict[str, torch.Tensor], empty: Any, probability: float
) -> dict[str, torch.Tensor]:
    """Replace a random `probability` of captions by the empty prompt, as the pipeline encodes
    it for the unconditional half of classifier-free guidance."""
    if probability == 0:
        return batch
    drop = torch.rand(len(batch["input_ids"])) < probability
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    ids[drop] = empty["input_ids"][0].to(ids.dtype)
    mask[drop] = empty["attention_mask"][0].to(mask.dtype)
    return {**batch, "input_ids": ids, "attention_mask": mask}


def to_model_space(
    parts: Any, pixels: torch.Tensor, resolution: int, device: Any, generator: Any = None
) -> torch.Tensor:
    """uint8 rows -> images in [-1, 1], then VAE latents (scaled) for latent models. Noise is
    drawn on the CPU (checkpointed RNG, or `generator`), so resumes are exact on GPU too."""
    images = pixels.view(-1, resolution, resolution, 3).permute(0, 3, 1, 2).float()
    images = (images / 127.5 - 1.0).to(device)
    if parts.vae is None:
        return images
    with torch.no_grad():
        dist = parts.vae.encode(images).latent_dist
        draw = torch.randn(dist.mean.shape, generator=generator).to(device)
        return (dist.mean + dist.std * draw) * parts.vae.config.scaling_factor


def diffusion_loss(
    engine: Any,
    parts: Any,
    batch: dict[str, torch.Tensor],
    resolution: int,
    diff: DiffusionSection | None,
    train_text: bool,
    device: Any,
    generator: Any = None,
) -> torch.Tensor:
    """DDPM loss: noise the clean sample at random timesteps, predict epsilon (or v), MSE,
    with min-SNR weights when diffusion.snr_gamma is set (`diff` None: plain MSE)."""
    from fmray.models.diffusion import encode_text

    scheduler = parts.noise_scheduler
    latents = to_model_space(parts, batch["pixels"], resolution, device, generator)
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    hidden = None
    if not train_text:
        with torch.no_grad():
            hidden = encode_text(parts.space, parts.text_encoder, input_ids, attention_mask)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    num_timesteps = scheduler.config.num_train_timesteps
    timesteps = draw_timesteps(num_timesteps, latents.shape[0], diff, generator).to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    target = (
        noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    )
    prediction = engine(noisy, timesteps, input_ids, attention_mask, hidden)
    per_sample = ((prediction - target.float()) ** 2).mean(dim=(1, 2, 3))
    if diff is not None and diff.snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps, diff.snr_gamma)
    return per_sample.mean()


def draw_timesteps(
    num_timesteps: int, size: int, diff: DiffusionSection | None, generator: Any = None
) -> torch.Tensor:
    """Uniform training timesteps; with diffusion.noisiest_fraction, that share of them drawn
    from the noisiest diffusion.noisiest_span of the schedule instead (`diff` None: uniform)."""
    timesteps = torch.randint(0, num_timesteps, (size,), generator=generator)
    if diff is None or diff.noisiest_fraction == 0:
        return timesteps
    low = num_timesteps - max(1, round(num_timesteps * diff.noisiest_span))
    noisiest = torch.randint(low, num_timesteps, (size,), generator=generator)
    pick = torch.rand(size, generator=generator) < diff.noisiest_fraction
    return torch.where(pick, noisiest, timesteps)


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023, eq. 8): min(SNR, gamma) / SNR for epsilon
    targets, min(SNR, gamma) / (SNR + 1) for v targets, with SNR = alpha_bar / (1 - alpha_bar)."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped / snr


@torch.no_grad()
def val_loss(
    engine: Any,
    parts: Any,
    eval_rows: list[dict[str, np.ndarray]],
    plan: DiffusionPlan,
    config: DiffusionConfig,
    device: Any,
) -> float:
    """Mean loss over the same held-out images, noise and timesteps every time, all ranks."""
    import torch.distributed as dist

    engine.eval()
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(config.run.seed * 1000 + 7919 + rank)
    totals = torch.zeros(2, dtype=torch.float64)
    for rows in eval_rows:
        batch = {k: torch.from_numpy(v) for k, v in rows.items()}
        loss = diffusion_loss(
            engine,
            parts,
            batch,
            plan.resolution,
            None,
            config.model.train_text_encoder,
            device,
            generator,
        )
        totals += torch.tensor([loss.item() * len(batch["pixels"]), len(batch["pixels"])])
    totals = totals.to(device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    engine.train()
    return (totals[0] / totals[1].clamp(min=1)).item()


def adherence_eval(
    engine: Any,
    parts: Any,
    ema: EMA | None,
    plan: DiffusionPlan,
    config: DiffusionConfig,
    rank: int,
    world: int,
) -> dict[str, float]:
    """Colour, shape and position accuracy of images generated (EMA weights when on) for the
    fixed built-in prompts, each rank generating its share."""
    import torch.distributed as dist

    from fmray.eval.adherence import adherence_counts
    from fmray.models.diffusion import generate, pipeline_of

    sample = config.sample
    indices, num_counted = rank_share_indices(len(plan.adherence_prompts), rank, world)
    pipeline = pipeline_of(parts, engine.module, ema.state_dict() if ema else None, sample.sampler)
    images = []
    for start in range(0, len(indices), sample.batch_size):
        chunk = indices[start : start + sample.batch_size]
        prompts = [plan.adherence_prompts[i] for i in chunk]
        seeds = [sample.seed + i for i in chunk]
        images.extend(generate(pipeline, prompts, seeds, sample.steps, sample.guidance_scale))
    own = indices[:num_counted]
    counts = adherence_counts(images[:num_counted], [plan.adherence_attributes[i] for i in own])
    device = next(engine.module.parameters()).device
    totals = torch.tensor([*counts, num_counted], dtype=torch.float64, device=device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    num = totals[3].clamp(min=1)
    return {
        "colour_acc": (totals[0] / num).item(),
        "shape_acc": (totals[1] / num).item(),
        "position_acc": (totals[2] / num).item(),
    }


def rank_share_indices(count: int, rank: int, world: int) -> tuple[list[int], int]:
    """This rank's strided indices, padded (with the first ones) to the common size, so every
    rank runs the same number of forward passes; also how many are its own."""
    from fmray.train.worker import rank_share

    return rank_share(list(range(count)), rank, world)


def load_ema(ema: EMA, plan: DiffusionPlan) -> None:
    """The EMA weights of the checkpoint `resume` restored from (Ray Train's, else the plan's)."""
    import ray.train
    from safetensors.torch import load_file

    from fmray.checkpoint.diffusion import EMA_FILE

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            path = storage.join(str(ckpt_dir), EMA_FILE)
            if storage.is_file(path):
                ema.load(load_file(path))
        return
    if plan.resume_from is not None:
        path = storage.join(plan.resume_from, EMA_FILE)
        if storage.is_file(path):
            local = storage.local_copy(plan.resume_from)
            ema.load(load_file(str(local / EMA_FILE)))


def progress_text(metrics: dict[str, Any], max_steps: int) -> str:
    eta = (max_steps - metrics["step"]) * metrics["step_time_s"]
    val = f" | val {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
    colour = f" | colour {metrics['colour_acc']:.2f}" if "colour_acc" in metrics else ""
    return (
        f"step {metrics['step']}/{max_steps} | loss {metrics['loss']:.4f}{val}{colour} | "
        f"lr {metrics['lr']:.2e} | grad {metrics['grad_norm']:.3f} | "
        f"{metrics['images_per_s']:.1f} img/s | {metrics['step_time_s']:.3f} s/step | "
        f"ETA {eta:.0f} s"
    )


# ----------------------------------------------------------------------------- driver


def model_source(config: DiffusionConfig) -> str | None:
    """The resolved model.path (None for a preset)."""
    return storage.resolve(config.model.path) if config.model.path else None


def check_inputs(config: DiffusionConfig) -> None:
    """Fail before Ray starts: the model directory, the image folder, checkpoint.resume."""
    from fmray.data.images import captions_file
    from fmray.models.diffusion import space_of
    from fmray.train.launch import check_resume

    path = model_source(config)
    if path is not None:
        if storage.is_remote(path):
            raise ConfigError(f"config error: model.path={config.model.path!r} must be local")
        try:
            space_of(path)
        except ValueError as err:
            raise ConfigError(f"config error: model.path={config.model.path!r}: {err}") from None
    if config.data.source != "shapes":
        folder = storage.resolve(config.data.source)
        if not storage.exists(folder):
            raise ConfigError(f"config error: data.source={config.data.source!r}: no such folder")
        try:
            captions_file(folder, config.data.captions)
        except ValueError as err:
            raise ConfigError(f"config error: data.source={config.data.source!r}: {err}") from None
    check_resume(config)


def stage_base_model(config: DiffusionConfig, run_dir: str) -> str:
    """The diffusers directory workers load: model.path itself (uploaded once into
    <run dir>/base_model for a remote run), or the preset built from run.seed there."""
    from fmray.models.diffusion import build_preset

    target = storage.join(run_dir, "base_model")
    path = model_source(config)
    if path is not None and not storage.is_remote(run_dir):
        return path
    if storage.is_file(storage.join(target, "model_index.json")):
        return target  # built (or uploaded) by an earlier run of this folder
    staging = storage.staging_dir(target)
    if path is not None:
        print(f"[fmray] uploading the base model {path} -> {target}")
        storage.upload_dir(path, target)
        return target
    torch.manual_seed(config.run.seed)
    build_preset(str(config.model.preset), staging)
    storage.publish_dir(staging, target)
    return target


def prepare_run(config: DiffusionConfig) -> DiffusionPlan:
    """Driver-side work before the workers start: the base model and the image shards, both in
    the run's storage."""
    from fmray.data.images import COLOURS, all_prompts, build_image_data
    from fmray.models.diffusion import PIXEL, TEXT_LEN, space_of
    from fmray.train.launch import (
        check_batch_geometry,
        check_resume,
        local_dir_of,
        run_dir_of,
        write_run_config,
    )

    run_dir = run_dir_of(config)
    model_path = stage_base_model(config, run_dir)
    model_local = local_dir_of(model_path)
    space = space_of(model_local)
    resolution = config.data.resolution or model_resolution(model_local, space)
    tokenizer_dir = str(model_local / "tokenizer")
    text_len = TEXT_LEN if space == PIXEL else tokenizer_max_length(tokenizer_dir)
    cache_root = (
        storage.resolve(config.data.cache_dir)
        if config.data.cache_dir
        else storage.join(run_dir, "data")
    )
    try:
        images = build_image_data(
            config.data, config.run.seed, resolution, tokenizer_dir, text_len, space, cache_root
        )
    except ValueError as err:
        raise ConfigError(f"config error: {err}") from None
    source = f"data.source={config.data.source!r}"
    num_eval_batches = check_batch_geometry(
        config, images.num_train_rows, images.num_eval_rows, source
    )
    write_run_config(config, run_dir)
    print(
        f"[fmray] data: {images.num_train_rows} train / {images.num_eval_rows} held-out images "
        f"at {resolution}x{resolution} ({images.root})"
    )
    builtin = config.data.source == "shapes"
    prompts = all_prompts()[: config.sample.num_adherence_prompts] if builtin else []
    sample_prompts = config.sample.prompts
    if sample_prompts is None:
        default = [caption for caption, _ in all_prompts()[: 2 * len(COLOURS)]]
        sample_prompts = default if builtin else images.eval_captions[: 2 * len(COLOURS)]
    return DiffusionPlan(
        run_dir=run_dir,
        tokenizer_dir=storage.join(model_path, "tokenizer"),
        train_data=storage.join(images.root, "train"),
        eval_data=storage.join(images.root, "eval"),
        seq_len=resolution * resolution * 3,
        num_train_rows=images.num_train_rows,
        num_eval_batches=num_eval_batches,
        model_path=model_path,
        resume_from=check_resume(config),
        space=space,
        resolution=resolution,
        adherence_prompts=[caption for caption, _ in prompts],
        adherence_attributes=[attrs for _, attrs in prompts],
        sample_prompts=sample_prompts,
    )


def model_resolution(model_dir: Any, space: str) -> int:
    """Image side the model was built for: the UNet's sample size (times the VAE's scale)."""
    import json

    unet = json.loads((model_dir / "unet" / "config.json").read_text())
    if space == "pixel":
        return int(unet["sample_size"])
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def tokenizer_max_length(tokenizer_dir: str) -> int:
    from transformers import AutoTokenizer

    return int(AutoTokenizer.from_pretrained(tokenizer_dir).model_max_length)


def build_trainer(
    config: DiffusionConfig, plan: DiffusionPlan, callbacks: list[Any] | None = None
) -> Any:
    from fmray.train.launch import build_trainer as build

    return build(config, plan, train_loop, callbacks)


def run(config: DiffusionConfig, address: str | None = None) -> Any:
    from fmray.distributed.planner import check_memory
    from fmray.distributed.runtime import init_ray
    from fmray.train.launch import checkpoint_location, fit, print_summary

    check_inputs(config)
    check_memory(config)  # the planner: a run that will not fit stops before Ray starts
    required_cpus = config.scaling.num_workers * config.scaling.cpus_per_worker
    init_ray(address, required_cpus, config.logging.verbose)
    plan = prepare_run(config)
    result = fit(config, lambda cfg: build_trainer(cfg, plan))
    outputs = [("base model", plan.model_path or "")]
    if result.checkpoint is not None:
        location = checkpoint_location(result.checkpoint)
        weights = "EMA" if config.diffusion.ema_decay > 0 else "trained"
        weights += ", LoRA merged" if config.lora is not None else ""
        outputs += [
            (
                "pipeline",
                f"{storage.join(location, 'pipeline')} (diffusers, {weights} weights, "
                f"{config.sample.sampler} sampler)",
            ),
            ("samples", storage.join(location, "samples.png")),
        ]
    keys = ("step", "loss", "val_loss", "colour_acc", "shape_acc", "position_acc")
    print_summary(plan.run_dir, result, outputs, keys)
    return result

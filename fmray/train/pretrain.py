"""Pretraining: Ray Train workers running a DeepSpeed ZeRO engine over packed token blocks.

    fmray pretrain --config jobs/pretrain/tiny.yaml                        # CPU, 2 workers
    fmray pretrain --config jobs/pretrain/tiny.yaml train.max_steps=50 zero.stage=3
    python -m fmray.train.pretrain --config jobs/pretrain/llama_1b.yaml scaling.use_gpu=true

Everything the run writes lands in <run.output_dir>/<run.name>/: config.yaml, metrics.jsonl,
tensorboard/, tokenizer/, data/ (packed blocks) and one folder per checkpoint with its HF export.
Running the same command again resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmray.config import (
    CheckpointSection,
    ConfigError,
    DataSection,
    LoggingSection,
    ModelSection,
    RunSection,
    ScalingSection,
    Section,
    TrainSection,
    ZeroSection,
    dump_config,
    write_config,
)


class PretrainConfig(Section):
    run: RunSection = RunSection(name="pretrain")
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    zero: ZeroSection = ZeroSection()
    checkpoint: CheckpointSection = CheckpointSection()
    scaling: ScalingSection = ScalingSection()
    logging: LoggingSection = LoggingSection()


# ----------------------------------------------------------------------------- per worker


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build engine, resume, then step / log / eval / checkpoint."""
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from fmray.checkpoint import load_checkpoint, save_checkpoint
    from fmray.data.pipeline import iter_micro_batches, rank_block_indices
    from fmray.data.tokenizer import load_tokenizer
    from fmray.distributed.deepspeed_setup import build_ds_config, build_scheduler
    from fmray.distributed.runtime import seed_everything
    from fmray.models.registry import build_causal_lm

    config = PretrainConfig.model_validate(loop_config["config"])
    plan = loop_config["plan"]
    train, scaling = config.train, config.scaling
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if scaling.use_gpu else torch.device("cpu")

    # --- setup: same seed on every rank, so a fresh model is identical everywhere
    deepspeed.init_distributed(dist_backend="nccl" if scaling.use_gpu else "gloo")
    seed_everything(config.run.seed)
    tokenizer = load_tokenizer(plan["tokenizer_dir"])
    ds_config = build_ds_config(train, config.zero, world, scaling.use_gpu)
    # Kept alive for the model build: makes transformers construct under zero.Init (stage 3).
    hf_ds_config = HfDeepSpeedConfig(ds_config) if config.zero.stage == 3 else None
    model = build_causal_lm(
        config.model.preset,
        config.model.path,
        vocab_size=len(tokenizer),
        special_tokens={
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
    )
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda optimizer: build_scheduler(optimizer, train),
    )
    del hf_ds_config

    # --- resume: model, optimizer, scheduler, RNG; the data position follows from the step
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            start_step = load_checkpoint(engine, Path(ckpt_dir))
        if rank == 0:
            sys.stdout.write(f"[fmray] resumed from step {start_step}\n")
    logger = MetricsLogger(plan["run_dir"], start_step, config.logging) if rank == 0 else None

    micro, accum = train.micro_batch_size, train.grad_accum_steps
    global_batch = micro * accum * world
    batches = train_batches(
        ray.train.get_dataset_shard(f"train_rank{rank}"),
        rank,
        world,
        micro,
        start_step,
        global_batch,
        plan["num_train_blocks"],
    )
    # The held-out blocks are few and read every evaluation: fetch them once.
    val_batches = [
        batch["input_ids"]
        for batch in iter_micro_batches(
            ray.train.get_dataset_shard(f"val_rank{rank}"),
            micro,
            0,
            rank_block_indices(rank, world, micro, 0, plan["num_val_batches"] * micro * world),
        )
    ]
    tokens_per_step = global_batch * plan["seq_len"]
    config_yaml = dump_config(config)
    run_start = time.perf_counter()

    for step in range(start_step, train.max_steps):
        # --- forward / backward over the accumulation window, one optimizer step
        step_start = time.perf_counter()
        engine.train()
        loss_sum = torch.zeros((), device=device)
        grad_norm = None
        for _ in range(accum):
            input_ids = torch.from_numpy(next(batches)).to(device)
            # No KV cache in training: building one costs a concatenation per layer per step.
            loss = engine(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary() and config.zero.stage == 0:
                # ZeRO stages report their norm; stage 0 does not, so take it before clipping.
                grad_norm = grad_norm_of(engine.module)
            engine.step()
            loss_sum += loss.detach().float()
        done = step + 1

        # --- log: mean loss over ranks and micro-batches
        metrics: dict[str, Any] = {}
        if done % train.log_every == 0 or done == train.max_steps:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            step_time = time.perf_counter() - step_start
            if grad_norm is None:
                grad_norm = engine.get_global_grad_norm()
            metrics = {
                "step": done,
                "loss": loss_sum.item() / (accum * world),
                "lr": engine.get_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "tokens_per_s": tokens_per_step / step_time,
                "step_time_s": step_time,
                "elapsed_s": time.perf_counter() - run_start,
            }

        # --- validate
        evaluate = bool(train.eval_every and done % train.eval_every == 0)
        if evaluate or done == train.max_steps:
            metrics.setdefault("step", done)
            metrics["val_loss"] = validation_loss(engine, val_batches, device)
        if logger and metrics:
            logger.log(metrics, train.max_steps)

        # --- checkpoint (all ranks write their shard; Ray Train merges and registers it)
        # Ray Train hears of metrics only at validation and checkpoint steps: its controller
        # polls every ~2 s and a report waits for the previous one, so per-step reports throttle.
        every = config.checkpoint.every_steps
        if (every and done % every == 0) or done == train.max_steps:
            metrics.setdefault("step", done)
            local_dir = Path(tempfile.mkdtemp(prefix=f"fmray-ckpt-{rank}-"))
            meta = {"run": config.run.name, "trial_id": plan.get("trial_id")}
            save_checkpoint(
                engine, local_dir, done, config_yaml, meta, tokenizer, config.checkpoint.export_hf
            )
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(str(local_dir)),
                checkpoint_dir_name=f"checkpoint_{done:08d}",
            )
            shutil.rmtree(local_dir, ignore_errors=True)
        elif evaluate:
            ray.train.report(metrics)
    if logger:
        logger.close()


def train_batches(
    shard: Any,
    rank: int,
    world: int,
    micro: int,
    start_step: int,
    global_batch: int,
    num_blocks: int,
) -> Iterator[np.ndarray]:
    """This rank's micro-batches from optimizer step `start_step` on, epoch after epoch."""
    from fmray.data.pipeline import iter_micro_batches, rank_block_indices

    steps_per_epoch = num_blocks // global_batch
    limit = steps_per_epoch * global_batch
    epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
    while True:
        start = step_in_epoch * global_batch
        expected = rank_block_indices(rank, world, micro, start, limit)
        for batch in iter_micro_batches(shard, micro, start, expected):
            yield batch["input_ids"]
        epoch, step_in_epoch = epoch + 1, 0


def grad_norm_of(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


@torch.no_grad()
def validation_loss(engine: Any, val_batches: list[np.ndarray], device: Any) -> float:
    """Mean loss over the same held-out blocks every time, averaged over ranks."""
    import torch.distributed as dist

    engine.eval()
    total = torch.zeros((), device=device)
    for input_ids in val_batches:
        batch = torch.from_numpy(input_ids).to(device)
        total += engine(input_ids=batch, labels=batch, use_cache=False).loss.float()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    engine.train()
    return total.item() / (len(val_batches) * dist.get_world_size())


class MetricsLogger:
    """Rank 0: metrics.jsonl, TensorBoard and a progress line."""

    def __init__(self, run_dir: str, start_step: int, logging: LoggingSection) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A resumed run replays the steps after its checkpoint: drop their old records.
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line and json.loads(line).get("step", 0) <= start_step
            ]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        self.progress = logging.progress
        self.writer = None
        if logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1
            )

    def log(self, metrics: dict[str, Any], max_steps: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        step = metrics["step"]
        if self.writer:
            for key, value in metrics.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, step)
        if self.progress and "loss" in metrics:
            eta = (max_steps - step) * metrics["step_time_s"]
            val = f" | val {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
            # Written directly: Ray Train's patched print() echoes each line twice.
            sys.stdout.write(
                f"[fmray] step {step}/{max_steps} | loss {metrics['loss']:.4f}{val} | "
                f"lr {metrics['lr']:.2e} | grad {metrics['grad_norm']:.3f} | "
                f"{metrics['tokens_per_s']:,.0f} tok/s | {metrics['step_time_s']:.3f} s/step | "
                f"ETA {eta:.0f} s\n"
            )
            sys.stdout.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()


# ----------------------------------------------------------------------------- driver


def prepare_run(config: PretrainConfig) -> dict[str, Any]:
    """Driver-side work before the workers start: tokenizer, packed data, resolved config."""
    from fmray.data.pipeline import build_packed_data
    from fmray.data.sources import load_texts
    from fmray.data.tokenizer import train_tokenizer
    from fmray.distributed.runtime import absolute_storage

    run_dir = Path(absolute_storage(config.run.output_dir)) / config.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    data = config.data
    tokenizer_dir = data.tokenizer
    if tokenizer_dir is None:
        tokenizer_dir = str(run_dir / "tokenizer")
        if not (run_dir / "tokenizer" / "tokenizer.json").is_file():
            texts = load_texts(data.source, data.text_field, data.num_documents, config.run.seed)
            train_tokenizer(texts, data.vocab_size, tokenizer_dir)
            print(f"[fmray] trained a {data.vocab_size}-token BPE tokenizer -> {tokenizer_dir}")
    cache_root = Path(data.cache_dir) if data.cache_dir else run_dir / "data"
    packed = build_packed_data(data, config.run.seed, tokenizer_dir, cache_root)
    train, workers = config.train, config.scaling.num_workers
    global_batch = train.micro_batch_size * train.grad_accum_steps * workers
    if packed.num_train_blocks < global_batch:
        raise ConfigError(
            f"config error: global batch of {global_batch} blocks (train.micro_batch_size x "
            f"train.grad_accum_steps x scaling.num_workers) exceeds the {packed.num_train_blocks} "
            f"training blocks of data.source={data.source!r}"
        )
    num_val_batches = min(
        train.eval_batches, packed.num_val_blocks // (train.micro_batch_size * workers)
    )
    if num_val_batches == 0:
        raise ConfigError(
            f"config error: {packed.num_val_blocks} validation blocks are fewer than "
            f"train.micro_batch_size x scaling.num_workers; raise data.val_fraction"
        )
    write_config(config, run_dir / "config.yaml")
    print(
        f"[fmray] data: {packed.num_train_blocks} train / {packed.num_val_blocks} val blocks of "
        f"{packed.seq_len} tokens ({packed.root})"
    )
    return {
        "run_dir": str(run_dir),
        "tokenizer_dir": str(tokenizer_dir),
        "packed_root": str(packed.root),
        "seq_len": packed.seq_len,
        "num_train_blocks": packed.num_train_blocks,
        "num_val_batches": num_val_batches,
    }


def build_trainer(config: PretrainConfig, plan: dict[str, Any], loop: Any = train_loop) -> Any:
    """The TorchTrainer for a recipe whose loop reads packed blocks (pretrain and its kin)."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from fmray.data.pipeline import rank_datasets
    from fmray.distributed.runtime import absolute_storage

    train, workers = config.train, config.scaling.num_workers
    packed_root = Path(plan["packed_root"])
    global_batch = train.micro_batch_size * train.grad_accum_steps * workers
    train_limit = (plan["num_train_blocks"] // global_batch) * global_batch
    val_limit = plan["num_val_batches"] * train.micro_batch_size * workers
    datasets = {
        **rank_datasets(
            packed_root / "train", workers, train.micro_batch_size, train_limit, "train"
        ),
        **rank_datasets(packed_root / "val", workers, train.micro_batch_size, val_limit, "val"),
    }
    resume = config.checkpoint.resume
    resume_from = None
    if resume not in ("auto", "never"):
        resume_from = ray.train.Checkpoint.from_directory(str(Path(resume).resolve()))
    return TorchTrainer(
        loop,
        train_loop_config={"config": config.model_dump(mode="json"), "plan": plan},
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker={"CPU": config.scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=config.run.name,
            storage_path=absolute_storage(config.run.output_dir),
            checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep_last),
            failure_config=FailureConfig(max_failures=config.scaling.max_failures),
        ),
        datasets=datasets,
        dataset_config=DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
        resume_from_checkpoint=resume_from,
    )


def check_resume_mode(config: PretrainConfig) -> None:
    """checkpoint.resume=never refuses a run folder that already holds checkpoints."""
    from fmray.distributed.runtime import absolute_storage

    run_dir = Path(absolute_storage(config.run.output_dir)) / config.run.name
    resume = config.checkpoint.resume
    if resume == "never" and any(run_dir.glob("checkpoint_*")):
        raise ConfigError(
            f"config error: checkpoint.resume=never but {run_dir} already holds checkpoints "
            "(choose another run.name, or checkpoint.resume=auto)"
        )
    if resume not in ("auto", "never") and not (Path(resume) / "fmray.json").is_file():
        raise ConfigError(
            f"config error: checkpoint.resume={resume!r} is not an fmray checkpoint directory "
            "(allowed: auto, never, or a checkpoint folder)"
        )


def run(config: PretrainConfig, address: str | None = None) -> Any:
    from fmray.distributed.runtime import init_ray

    check_resume_mode(config)
    init_ray(address, config.scaling.num_workers * config.scaling.cpus_per_worker)
    plan = prepare_run(config)
    result = build_trainer(config, plan).fit()
    print_summary(plan, result)
    return result


def print_summary(plan: dict[str, Any], result: Any) -> None:
    run_dir = plan["run_dir"]
    print("[fmray] done.")
    print(f"  run folder    {run_dir}")
    print(f"  config        {run_dir}/config.yaml")
    print(f"  metrics       {run_dir}/metrics.jsonl (TensorBoard: {run_dir}/tensorboard)")
    if result.checkpoint is not None:
        print(f"  checkpoint    {result.checkpoint.path}")
        print(f"  HF export     {result.checkpoint.path}/hf")
    if result.metrics:
        shown = {
            k: round(v, 4) for k, v in result.metrics.items() if k in ("step", "loss", "val_loss")
        }
        print(f"  final         {shown}")


if __name__ == "__main__":
    import sys

    from fmray.cli import main

    main(["pretrain", *sys.argv[1:]])

"""Instruction fine-tuning, full or LoRA: Ray Train workers run a DeepSpeed engine over
chat-formatted rows whose loss covers only the assistant's replies.

    fmray pretrain --config jobs/pretrain/tiny.yaml      # a base model to start from (CPU)
    fmray sft --config jobs/sft/tiny.yaml                # CPU, 2 workers, full fine-tuning
    fmray sft --config jobs/sft/tiny.yaml lora.r=8       # CPU, LoRA: only the adapters train
    fmray sft --config jobs/sft/llama_1b.yaml            # GPU cluster, ZeRO-2, bf16
    python -m fmray.train.sft --config jobs/sft/tiny.yaml zero.stage=3 data.packing=true

`model.path` is any HF causal-LM directory (an fmray export, a user's model) or an fmray run folder
(its newest HF export is used). Everything the run writes lands in <run.output_dir>/<run.name>/:
config.yaml, metrics.jsonl, tensorboard/, tokenizer/ (with the chat template), data/ (tokenized
rows) and one folder per checkpoint: hf/ (the full model - merged for LoRA - with the tokenizer
and chat template, ready for transformers and `fmray serve`) and, for LoRA, adapter/ (peft).
Held-out exact match (greedy generation) and eval loss are reported at every evaluation.
Running the same command again resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator

from fmray.config import (
    CheckpointSection,
    ConfigError,
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
from fmray.data.sft_data import SFTDataSection
from fmray.models.lora import LoraSection
from fmray.train.pretrain import MetricsLogger

# Rank shards up to this size (int64 rows) are kept in memory after their first read.
IN_MEMORY_SHARD_BYTES = 256 * 2**20


class EvalSection(Section):
    num_examples: int = Field(128, ge=0)
    """Held-out conversations answered by greedy generation at each evaluation (0: skip)."""
    max_new_tokens: int = Field(24, ge=1)
    """Tokens generated per answer."""
    batch_size: int = Field(32, ge=1)
    """Prompts decoded together per worker."""


class SFTConfig(Section):
    run: RunSection = RunSection(name="sft")
    model: ModelSection = ModelSection()
    data: SFTDataSection = SFTDataSection()
    lora: LoraSection | None = None
    """LoRA adapters (setting any lora.* key enables them); null: full fine-tuning."""
    eval: EvalSection = EvalSection()
    train: TrainSection = TrainSection(lr=1e-4, max_steps=200, eval_every=50)
    zero: ZeroSection = ZeroSection()
    checkpoint: CheckpointSection = CheckpointSection()
    scaling: ScalingSection = ScalingSection()
    logging: LoggingSection = LoggingSection()

    @model_validator(mode="after")
    def _needs_model_path(self) -> SFTConfig:
        if self.model.path is None:
            raise ValueError(
                "model.path must be set for sft: an HF causal-LM directory or an fmray run "
                "folder such as runs/pretrain-tiny"
            )
        return self


# ----------------------------------------------------------------------------- per worker


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build engine, resume, then step / log / eval / checkpoint."""
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from fmray.checkpoint import save_adapter_checkpoint, save_checkpoint
    from fmray.data.pipeline import iter_micro_batches, rank_block_indices
    from fmray.data.sft_data import ROW_COLUMNS
    from fmray.data.tokenizer import load_tokenizer
    from fmray.distributed.deepspeed_setup import build_ds_config, build_scheduler
    from fmray.distributed.runtime import seed_everything
    from fmray.models.lora import apply_lora, lora_scaling
    from fmray.models.registry import build_causal_lm

    config = SFTConfig.model_validate(loop_config["config"])
    plan = loop_config["plan"]
    train, scaling = config.train, config.scaling
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if scaling.use_gpu else torch.device("cpu")

    # --- setup: same seed on every rank, so LoRA's fresh adapters are identical everywhere
    deepspeed.init_distributed(dist_backend="nccl" if scaling.use_gpu else "gloo")
    seed_everything(config.run.seed)
    tokenizer = load_tokenizer(plan["tokenizer_dir"])
    ds_config = build_ds_config(train, config.zero, world, scaling.use_gpu)
    # Kept alive for the model build: makes transformers load under zero.Init (stage 3).
    hf_ds_config = HfDeepSpeedConfig(ds_config) if config.zero.stage == 3 else None
    model = build_causal_lm(None, plan["model_path"], vocab_size=len(tokenizer))
    # Exports stop generating at the end of the assistant's turn, in transformers and in serving.
    model.generation_config.eos_token_id = plan["stop_token_ids"]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if config.model.gradient_checkpointing:
        # Non-reentrant: frozen LoRA inputs carry no grad, which reentrant checkpointing needs.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora is not None:
        model = apply_lora(model, config.lora)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda optimizer: build_scheduler(optimizer, train),
    )
    del hf_ds_config

    # --- resume: model (or adapters), optimizer, scheduler, RNG; data position from the step
    start_step = restore(engine, config, plan)
    if rank == 0 and start_step:
        sys.stdout.write(f"[fmray] resumed from step {start_step}\n")
    logger = MetricsLogger(plan["run_dir"], start_step, config.logging) if rank == 0 else None
    if rank == 0:
        record_placement_group(Path(plan["run_dir"]))

    micro, accum = train.micro_batch_size, train.grad_accum_steps
    global_batch = micro * accum * world
    batches = train_batches(
        ray.train.get_dataset_shard(f"train_rank{rank}"),
        rank,
        world,
        micro,
        start_step,
        global_batch,
        plan["num_train_rows"],
        plan["seq_len"],
    )
    # The held-out rows are few and read every evaluation: fetch them once.
    eval_rows = list(
        iter_micro_batches(
            ray.train.get_dataset_shard(f"eval_rank{rank}"),
            micro,
            0,
            rank_block_indices(rank, world, micro, 0, plan["num_eval_batches"] * micro * world),
            ROW_COLUMNS,
        )
    )
    eval_share, num_counted = rank_share(plan["eval_conversations"], rank, world)
    tokens_per_step = global_batch * plan["seq_len"]
    config_yaml = dump_config(config)
    # A Tune PBT segment stops early (and checkpoints) without changing the LR schedule.
    stop_step = min(plan.get("stop_step") or train.max_steps, train.max_steps)
    run_start = time.perf_counter()

    for step in range(start_step, stop_step):
        # --- forward / backward over the accumulation window, one optimizer step
        step_start = time.perf_counter()
        engine.train()
        loss_sum = torch.zeros((), device=device)
        grad_norm = None
        for _ in range(accum):
            batch = {k: torch.from_numpy(v).to(device) for k, v in next(batches).items()}
            # No KV cache: transformers only turns restarting position_ids into per-conversation
            # attention (packing) when no cache is passed.
            loss = engine(**batch, use_cache=False).loss
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary() and config.zero.stage == 0:
                # ZeRO stages report their norm; stage 0 does not, so take it before clipping.
                grad_norm = grad_norm_of(engine.module)
            engine.step()
            loss_sum += loss.detach().float()
        done = step + 1

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
                "tokens_per_s": tokens_per_step / step_time,
                "step_time_s": step_time,
                "elapsed_s": time.perf_counter() - run_start,
            }

        # --- evaluate: eval loss on held-out rows, exact match of greedy answers
        evaluate = bool(train.eval_every and done % train.eval_every == 0) or done == stop_step
        if evaluate:
            metrics["step"] = done
            metrics["val_loss"] = eval_loss(engine, eval_rows, device)
            if plan["eval_conversations"]:
                metrics["val_exact_match"] = exact_match(
                    engine, tokenizer, eval_share, num_counted, config.eval, plan, device
                )
                if rank == 0 and config.logging.progress:
                    # Written directly: Ray Train's patched print() echoes each line twice.
                    sys.stdout.write(
                        f"[fmray] eval step {done} | val_loss {metrics['val_loss']:.4f} | "
                        f"exact match {metrics['val_exact_match']:.3f} "
                        f"({len(plan['eval_conversations'])} held-out)\n"
                    )
                    sys.stdout.flush()
        if logger and metrics:
            logger.log(metrics, train.max_steps)

        # --- checkpoint (all ranks write their shard; Ray Train merges and registers it)
        # Ray Train hears of metrics only at evaluation and checkpoint steps: a report waits for
        # the controller's ~2 s poll of the previous one, so per-step reports would throttle.
        every = config.checkpoint.every_steps
        if (every and done % every == 0) or done == stop_step:
            metrics.setdefault("step", done)
            local_dir = Path(tempfile.mkdtemp(prefix=f"fmray-ckpt-{rank}-"))
            meta = {
                "run": config.run.name,
                "trial_id": plan.get("trial_id"),
                "experiment": plan.get("experiment"),
                "base_model": plan["model_path"],
                "resumed_from_step": start_step,
                "resumed_from": plan.get("resume_from"),  # PBT: the cloned trial's checkpoint
            }
            export = config.checkpoint.export_hf
            if config.lora is not None:
                scale = lora_scaling(config.lora)
                save_adapter_checkpoint(
                    engine, local_dir, done, config_yaml, meta, tokenizer, export, scale
                )
            else:
                save_checkpoint(engine, local_dir, done, config_yaml, meta, tokenizer, export)
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


def record_placement_group(run_dir: Path) -> None:
    """Append the workers' placement group id to <run dir>/placement_groups.txt.

    Ray Train frees it when the run ends, or through a cleaner actor when its controller is
    killed (Tune stopping a trial); that cleaner cannot find its cluster on a machine running
    several Ray instances. With the id on record, Tune's driver frees it instead.
    """
    import ray.util

    placement_group = ray.util.get_current_placement_group()
    if placement_group is not None:
        with (run_dir / "placement_groups.txt").open("a") as f:
            f.write(placement_group.id.hex() + "\n")


def restore(engine: Any, config: SFTConfig, plan: dict[str, Any]) -> int:
    """Load the run's newest checkpoint (or checkpoint.resume's, or a Tune PBT donor's).

    Returns the step to continue from. The learning rate and weight decay are then set from
    this run's config, so a PBT-mutated value takes effect (for a plain resume it is the same).
    """
    import ray.train

    from fmray.checkpoint import load_adapter_checkpoint, load_checkpoint, read_meta
    from fmray.distributed.deepspeed_setup import lr_at

    checkpoint = ray.train.get_checkpoint()
    source = checkpoint.as_directory() if checkpoint else nullcontext(plan.get("resume_from"))
    with source as ckpt_dir:
        if ckpt_dir is None:
            return 0
        is_adapter = bool(read_meta(Path(ckpt_dir)).get("adapter"))
        if is_adapter != (config.lora is not None):
            kind = "a LoRA" if is_adapter else "a full fine-tuning"
            raise ValueError(f"{ckpt_dir} is {kind} checkpoint; set lora.* to match it")
        loader = load_adapter_checkpoint if is_adapter else load_checkpoint
        step = loader(engine, Path(ckpt_dir))
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [config.train.lr for _ in scheduler.base_lrs]
    for group in scheduler.optimizer.param_groups:
        group["lr"] = config.train.lr * lr_at(scheduler.last_epoch, config.train)
        group["weight_decay"] = config.train.weight_decay
    return step


def train_batches(
    shard: Any,
    rank: int,
    world: int,
    micro: int,
    start_step: int,
    global_batch: int,
    num_rows: int,
    seq_len: int,
) -> Iterator[dict[str, np.ndarray]]:
    """This rank's micro-batches from optimizer step `start_step` on, epoch after epoch.

    SFT sets are usually small and seen for many epochs: a shard that fits in
    IN_MEMORY_SHARD_BYTES is read once and replayed, since restarting a Ray Data read every
    few steps would cost more than the steps it feeds.
    """
    from fmray.data.pipeline import iter_micro_batches, rank_block_indices
    from fmray.data.sft_data import ROW_COLUMNS

    steps_per_epoch = num_rows // global_batch
    limit = steps_per_epoch * global_batch
    step_in_epoch = start_step % steps_per_epoch
    if (limit // world) * seq_len * 3 * 8 <= IN_MEMORY_SHARD_BYTES:
        expected = rank_block_indices(rank, world, micro, 0, limit)
        epoch = list(iter_micro_batches(shard, micro, 0, expected, ROW_COLUMNS))
        accum = global_batch // (micro * world)
        index = step_in_epoch * accum
        while True:
            yield epoch[index % len(epoch)]
            index += 1
    while True:
        start = step_in_epoch * global_batch
        expected = rank_block_indices(rank, world, micro, start, limit)
        yield from iter_micro_batches(shard, micro, start, expected, ROW_COLUMNS)
        step_in_epoch = 0


def grad_norm_of(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


@torch.no_grad()
def eval_loss(engine: Any, eval_rows: list[dict[str, np.ndarray]], device: Any) -> float:
    """Mean loss per reply token over the same held-out rows every time, over all ranks."""
    import torch.distributed as dist

    from fmray.eval.loss import masked_loss_sum

    engine.eval()
    totals = torch.zeros(2, device=device, dtype=torch.float64)
    for rows in eval_rows:
        batch = {k: torch.from_numpy(v).to(device) for k, v in rows.items()}
        logits = engine(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        loss_sum, num_tokens = masked_loss_sum(logits, batch["labels"])
        totals += torch.stack([loss_sum.double(), torch.tensor(num_tokens, device=device)])
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    engine.train()
    return (totals[0] / totals[1].clamp(min=1)).item()


def rank_share(items: list[Any], rank: int, world: int) -> tuple[list[Any], int]:
    """This rank's strided share, padded to the common size; also how many are its own.

    Equal sizes keep every rank's forward passes in step (ZeRO-3 gathers weights per forward).
    """
    share = items[rank::world]
    size = -(-len(items) // world)
    return share + items[: size - len(share)], len(share)


def exact_match(
    engine: Any,
    tokenizer: Any,
    conversations: list[Any],
    num_counted: int,
    eval_cfg: EvalSection,
    plan: dict[str, Any],
    device: Any,
) -> float:
    """Fraction of held-out conversations (over all ranks) answered exactly by greedy decoding."""
    import torch.distributed as dist

    from fmray.eval.exact_match import exact_match_counts

    correct, counted = exact_match_counts(
        engine.module,
        tokenizer,
        conversations,
        plan["chat_template"],
        eval_cfg.max_new_tokens,
        eval_cfg.batch_size,
        device,
        num_counted,
    )
    totals = torch.tensor([correct, counted], device=device, dtype=torch.float64)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return (totals[0] / totals[1].clamp(min=1)).item()


# ----------------------------------------------------------------------------- driver


def resolve_model_path(path: str) -> Path:
    """An HF model directory, or the newest HF export with weights inside an fmray run folder."""
    root = Path(path).expanduser().resolve()
    if (root / "config.json").is_file():
        return root
    exports = [
        p.parent
        for p in sorted(root.glob("checkpoint_*/hf/config.json"))
        if any(p.parent.glob("model*.safetensors"))
    ]
    if not exports:
        raise ConfigError(
            f"config error: model.path={path!r} is neither an HF model directory (config.json) "
            "nor an fmray run folder with an exported checkpoint"
        )
    return exports[-1]


def prepare_run(config: SFTConfig) -> dict[str, Any]:
    """Driver-side work before the workers start: tokenizer + template, tokenized rows."""
    from transformers import AutoConfig

    from fmray.data.chat_template import chat_template_of
    from fmray.data.sft_data import build_sft_data
    from fmray.data.tokenizer import load_tokenizer
    from fmray.distributed.runtime import absolute_storage
    from fmray.eval.exact_match import stop_token_ids

    run_dir = Path(absolute_storage(config.run.output_dir)) / config.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model_path(str(config.model.path))
    tokenizer = load_tokenizer(config.data.tokenizer or model_path)
    vocab_size = AutoConfig.from_pretrained(str(model_path)).vocab_size
    if len(tokenizer) > vocab_size:
        raise ConfigError(
            f"config error: the tokenizer has {len(tokenizer)} tokens but model.path={model_path} "
            f"embeds {vocab_size}; use the model's own tokenizer (unset data.tokenizer)"
        )
    # Saved with the tokenizer into every export, so serving formats prompts the same way.
    tokenizer.chat_template = chat_template_of(tokenizer)
    tokenizer_dir = run_dir / "tokenizer"
    tokenizer.save_pretrained(str(tokenizer_dir))
    data = config.data
    cache_root = Path(data.cache_dir) if data.cache_dir else run_dir / "data"
    sft = build_sft_data(
        data, config.run.seed, str(tokenizer_dir), tokenizer.chat_template, cache_root
    )
    num_eval_batches = check_batch_geometry(config, sft.num_train_rows, sft.num_eval_rows)
    write_config(config, run_dir / "config.yaml")
    print(
        f"[fmray] data: {sft.num_train_rows} train / {sft.num_eval_rows} eval rows of "
        f"{sft.seq_len} tokens (packing={data.packing}) ({sft.root})"
    )
    return {
        "run_dir": str(run_dir),
        "model_path": str(model_path),
        "tokenizer_dir": str(tokenizer_dir),
        "chat_template": tokenizer.chat_template,
        "stop_token_ids": sorted(stop_token_ids(tokenizer)),
        "rows_root": str(sft.root),
        "seq_len": sft.seq_len,
        "num_train_rows": sft.num_train_rows,
        "num_eval_batches": num_eval_batches,
        "eval_conversations": sft.eval_conversations[: config.eval.num_examples],
        "resume_from": resume_dir(config),
    }


def check_batch_geometry(config: SFTConfig, num_train_rows: int, num_eval_rows: int) -> int:
    """The number of eval micro-batches per worker; one-line errors if the data is too small."""
    train, workers = config.train, config.scaling.num_workers
    global_batch = train.micro_batch_size * train.grad_accum_steps * workers
    if num_train_rows < global_batch:
        raise ConfigError(
            f"config error: global batch of {global_batch} rows (train.micro_batch_size x "
            f"train.grad_accum_steps x scaling.num_workers) exceeds the {num_train_rows} "
            f"training rows of data.source={config.data.source!r}"
        )
    num_eval_batches = min(train.eval_batches, num_eval_rows // (train.micro_batch_size * workers))
    if num_eval_batches == 0:
        raise ConfigError(
            f"config error: {num_eval_rows} eval rows are fewer than train.micro_batch_size x "
            "scaling.num_workers; add eval data or lower train.micro_batch_size"
        )
    return num_eval_batches


def resume_dir(config: SFTConfig) -> str | None:
    resume = config.checkpoint.resume
    return None if resume in ("auto", "never") else str(Path(resume).resolve())


def build_trainer(
    config: SFTConfig, plan: dict[str, Any], callbacks: list[Any] | None = None
) -> Any:
    """The TorchTrainer: one worker per DeepSpeed rank, each reading its own rows."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from fmray.data.pipeline import rank_datasets
    from fmray.distributed.runtime import absolute_storage

    train, workers = config.train, config.scaling.num_workers
    micro = train.micro_batch_size
    root = Path(plan["rows_root"])
    global_batch = micro * train.grad_accum_steps * workers
    train_limit = (plan["num_train_rows"] // global_batch) * global_batch
    eval_limit = plan["num_eval_batches"] * micro * workers
    datasets = {
        **rank_datasets(root / "train", workers, micro, train_limit, "train"),
        **rank_datasets(root / "eval", workers, micro, eval_limit, "eval"),
    }
    return TorchTrainer(
        train_loop,
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
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )


def check_inputs(config: SFTConfig) -> None:
    """Fail before Ray starts: the model, the data files and checkpoint.resume must exist."""
    from fmray.distributed.runtime import absolute_storage

    resolve_model_path(str(config.model.path))
    for key, source in (
        ("data.source", config.data.source),
        ("data.eval_source", config.data.eval_source),
    ):
        if source not in (None, "builtin") and not Path(source).exists():
            raise ConfigError(f"config error: {key}={source!r}: no such file or folder")
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


def run(config: SFTConfig, address: str | None = None) -> Any:
    from fmray.distributed.runtime import init_ray

    check_inputs(config)
    init_ray(address, config.scaling.num_workers * config.scaling.cpus_per_worker)
    plan = prepare_run(config)
    result = build_trainer(config, plan).fit()
    print_summary(config, plan, result)
    return result


def print_summary(config: SFTConfig, plan: dict[str, Any], result: Any) -> None:
    run_dir = plan["run_dir"]
    print("[fmray] done.")
    print(f"  run folder    {run_dir}")
    print(f"  base model    {plan['model_path']}")
    print(f"  config        {run_dir}/config.yaml")
    print(f"  metrics       {run_dir}/metrics.jsonl (TensorBoard: {run_dir}/tensorboard)")
    if result.checkpoint is not None:
        path = result.checkpoint.path
        print(f"  checkpoint    {path}")
        kind = "merged LoRA" if config.lora is not None else "full"
        print(f"  HF export     {path}/hf ({kind} model, tokenizer, chat template)")
        if config.lora is not None:
            print(f"  adapter       {path}/adapter (peft)")
    if result.metrics:
        keys = ("step", "loss", "val_loss", "val_exact_match")
        shown = {k: round(v, 4) for k, v in result.metrics.items() if k in keys}
        print(f"  final         {shown}")


if __name__ == "__main__":
    import sys

    from fmray.cli import main

    main(["sft", *sys.argv[1:]])

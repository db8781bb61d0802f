"""Pretraining: Ray Train workers running a DeepSpeed ZeRO engine over packed token blocks.

    fmray pretrain --config jobs/pretrain/tiny.yaml                        # CPU, 2 workers
    fmray pretrain --config jobs/pretrain/tiny.yaml train.max_steps=50 zero.stage=3
    python -m fmray pretrain --config jobs/pretrain/llama_1b.yaml scaling.use_gpu=true

Everything the run writes lands in <run.output_dir>/<run.name>/ (a local folder or a URI such as
s3://bucket/runs): config.yaml, metrics.jsonl, tensorboard/, tokenizer/, data/ (packed blocks)
and one folder per checkpoint with its HF export. Running the same command again resumes from
the newest complete checkpoint.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np
import torch

from fmray import storage
from fmray.config import (
    CheckpointSection,
    DataSection,
    LoggingSection,
    ModelSection,
    RunSection,
    ScalingSection,
    Section,
    TrainSection,
    ZeroSection,
    dump_config,
)
from fmray.train.plan import TrainPlan

KIND = "causal_lm"


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
    import ray.train
    import torch.distributed as dist

    from fmray.data.pipeline import iter_micro_batches, iter_train_batches, rank_block_indices
    from fmray.data.tokenizer import load_tokenizer
    from fmray.distributed.deepspeed_setup import build_ds_config
    from fmray.models.registry import build_causal_lm
    from fmray.train.checkpointing import Export, checkpoint_and_report, lineage, resume
    from fmray.train.launch import local_dir_of, record_placement_group
    from fmray.train.metrics import MetricsLogger, print_line, step_metrics
    from fmray.train.worker import (
        build_train_engine,
        grad_norm_of,
        setup_worker,
        zero3_construction,
    )

    config: PretrainConfig = loop_config["config"]
    plan: TrainPlan = loop_config["plan"]
    train = config.train

    # --- setup: same seed on every rank, so a fresh model is identical everywhere
    worker = setup_worker(config.run.seed, config.scaling.use_gpu)
    rank, world, device = worker.rank, worker.world, worker.device
    tokenizer = load_tokenizer(local_dir_of(plan.tokenizer_dir))
    ds_config = build_ds_config(train, config.zero, world, config.scaling.use_gpu)
    with zero3_construction(ds_config):
        model = build_causal_lm(
            config.model.preset,
            str(local_dir_of(plan.model_path)) if plan.model_path else None,
            vocab_size=len(tokenizer),
            special_tokens={
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
        )
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    engine = build_train_engine(model, ds_config, train)
    engines = {"model": engine}

    # --- resume: model, optimizer, scheduler, RNG; the data position follows from the step
    start_step = resume(engines, train, plan, KIND)
    if worker.is_chief:
        if start_step:
            print_line(f"resumed from step {start_step}")
        record_placement_group(plan.run_dir)
    logger = MetricsLogger(plan.run_dir, start_step, config.logging) if worker.is_chief else None

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
        ("input_ids",),
    )
    # The held-out blocks are few and read every evaluation: fetch them once.
    val_batches = [
        batch["input_ids"]
        for batch in iter_micro_batches(
            ray.train.get_dataset_shard(f"eval_rank{rank}"),
            micro,
            0,
            rank_block_indices(rank, world, micro, 0, plan.num_eval_batches * micro * world),
        )
    ]
    export = Export(KIND, "model", tokenizer, config.checkpoint.export_hf)
    config_yaml = dump_config(config)
    stop_step = min(plan.stop_step or train.max_steps, train.max_steps)
    run_start = time.perf_counter()

    for step in range(start_step, stop_step):
        # --- forward / backward over the accumulation window, one optimizer step
        step_start = time.perf_counter()
        engine.train()
        loss_sum = torch.zeros((), device=device)
        grad_norm = None
        for _ in range(accum):
            input_ids = torch.from_numpy(next(batches)["input_ids"]).to(device)
            # No KV cache in training: building one costs a concatenation per layer per step.
            loss = engine(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary() and config.zero.stage == 0:
                grad_norm = grad_norm_of(engine.module)  # before clipping
            engine.step()
            loss_sum += loss.detach().float()
        done = step + 1

        # --- log: mean loss over ranks and micro-batches
        metrics: dict[str, Any] = {}
        if done % train.log_every == 0 or done == stop_step:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            step_time = time.perf_counter() - step_start
            metrics = step_metrics(
                done,
                loss_sum.item(),
                accum * world,
                engine,
                grad_norm,
                global_batch * plan.seq_len,
                step_time,
                time.perf_counter() - run_start,
            )

        # --- validate
        evaluate = bool(train.eval_every and done % train.eval_every == 0) or done == stop_step
        if evaluate:
            metrics["step"] = done
            metrics["val_loss"] = validation_loss(engine, val_batches, device)
        if logger and metrics:
            logger.log(metrics, train.max_steps)

        # --- checkpoint (all ranks write their shard; Ray Train merges and registers it)
        # Ray Train hears of metrics only at validation and checkpoint steps: its controller
        # polls every ~2 s and a report waits for the previous one, so per-step reports throttle.
        every = config.checkpoint.every_steps
        if (every and done % every == 0) or done == stop_step:
            metrics.setdefault("step", done)
            meta = lineage(config.run.name, plan, start_step)
            checkpoint_and_report(metrics, done, engines, export, config_yaml, meta)
        elif evaluate:
            ray.train.report(metrics)
    if logger:
        logger.close()


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


# ----------------------------------------------------------------------------- driver


def check_inputs(config: PretrainConfig) -> None:
    """Fail before Ray starts: model.path and checkpoint.resume must exist."""
    from fmray.config import ConfigError
    from fmray.train.launch import check_resume

    path = config.model.path
    if path is not None and not storage.is_file(storage.join(storage.resolve(path), "config.json")):
        raise ConfigError(f"config error: model.path={path!r} is not an HF model folder")
    check_resume(config)


def prepare_run(config: PretrainConfig) -> TrainPlan:
    """Driver-side work before the workers start: tokenizer, packed data, resolved config, all
    in the run's storage."""
    from fmray.data.pipeline import build_packed_data
    from fmray.data.sources import load_texts
    from fmray.data.tokenizer import train_tokenizer
    from fmray.train.launch import (
        check_batch_geometry,
        check_resume,
        local_dir_of,
        run_dir_of,
        save_tokenizer,
        stage_model,
        write_run_config,
    )

    run_dir = run_dir_of(config)
    data = config.data
    if data.tokenizer is not None:
        tokenizer_dir = storage.resolve(data.tokenizer)
    else:
        tokenizer_dir = storage.join(run_dir, "tokenizer")
        if not storage.is_file(storage.join(tokenizer_dir, "tokenizer.json")):
            texts = load_texts(data.source, data.text_field, data.num_documents, config.run.seed)
            with tempfile.TemporaryDirectory() as scratch:
                save_tokenizer(train_tokenizer(texts, data.vocab_size, scratch), tokenizer_dir)
            print(f"[fmray] trained a {data.vocab_size}-token BPE tokenizer -> {tokenizer_dir}")
    cache_root = (
        storage.resolve(data.cache_dir) if data.cache_dir else storage.join(run_dir, "data")
    )
    local_tokenizer = str(local_dir_of(tokenizer_dir))
    packed = build_packed_data(data, config.run.seed, local_tokenizer, cache_root)
    source = f"data.source={data.source!r}"
    num_eval_batches = check_batch_geometry(
        config, packed.num_train_blocks, packed.num_val_blocks, source
    )
    write_run_config(config, run_dir)
    print(
        f"[fmray] data: {packed.num_train_blocks} train / {packed.num_val_blocks} val blocks of "
        f"{packed.seq_len} tokens ({packed.root})"
    )
    model_path = storage.resolve(config.model.path) if config.model.path else None
    return TrainPlan(
        run_dir=run_dir,
        tokenizer_dir=tokenizer_dir,
        train_data=packed.train_dir,
        eval_data=packed.val_dir,
        seq_len=packed.seq_len,
        num_train_rows=packed.num_train_blocks,
        num_eval_batches=num_eval_batches,
        model_path=stage_model(model_path, run_dir) if model_path else None,
        resume_from=check_resume(config),
    )


def build_trainer(
    config: PretrainConfig, plan: TrainPlan, callbacks: list[Any] | None = None
) -> Any:
    from fmray.train.launch import build_trainer as build

    return build(config, plan, train_loop, callbacks)


def run(config: PretrainConfig, address: str | None = None) -> Any:
    from fmray.distributed.planner import check_memory
    from fmray.distributed.runtime import init_ray
    from fmray.train.launch import checkpoint_location, fit, print_summary

    check_inputs(config)
    check_memory(config)  # the planner: a run that will not fit stops before Ray starts
    required_cpus = config.scaling.num_workers * config.scaling.cpus_per_worker
    init_ray(address, required_cpus, config.logging.verbose)
    plan = prepare_run(config)
    result = fit(config, lambda cfg: build_trainer(cfg, plan))
    outputs = []
    if result.checkpoint is not None:
        outputs.append(("HF export", storage.join(checkpoint_location(result.checkpoint), "hf")))
    print_summary(plan.run_dir, result, outputs, ("step", "loss", "val_loss"))
    return result

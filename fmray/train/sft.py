"""Instruction fine-tuning, full or LoRA: Ray Train workers run a DeepSpeed engine over
chat-formatted rows whose loss covers only the assistant's replies.

    fmray pretrain --config jobs/pretrain/tiny.yaml      # a base model to start from (CPU)
    fmray sft --config jobs/sft/tiny.yaml                # CPU, 2 workers, full fine-tuning
    fmray sft --config jobs/sft/tiny.yaml lora.r=8       # CPU, LoRA: only the adapters train
    fmray sft --config jobs/sft/llama_1b.yaml            # GPU cluster, ZeRO-2, bf16
    python -m fmray sft --config jobs/sft/tiny.yaml zero.stage=3 data.packing=true

`model.path` is any HF causal-LM directory (an fmray export, a user's model) or an fmray run folder
(its newest HF export is used), local or in remote storage. Everything the run writes lands in
<run.output_dir>/<run.name>/ (a local folder or a URI such as s3://bucket/runs):
config.yaml, metrics.jsonl, tensorboard/, tokenizer/ (with the chat template), data/ (tokenized
rows) and one folder per checkpoint: hf/ (the full model - merged for LoRA - with the tokenizer
and chat template, ready for transformers and `fmray serve`) and, for LoRA, adapter/ (peft).
Held-out exact match (greedy generation) and eval loss are reported at every evaluation.
Running the same command again resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from pydantic import model_validator

from fmray import storage
from fmray.config import (
    CheckpointSection,
    LoggingSection,
    ModelSection,
    RunSection,
    ScalingSection,
    Section,
    TrainSection,
    ZeroSection,
    dump_config,
)
from fmray.data.sft_data import SFTDataSection
from fmray.eval.exact_match import EvalSection
from fmray.models.lora import LoraSection
from fmray.train.plan import TrainPlan


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


class SFTPlan(TrainPlan):
    """The run plan plus what evaluation and exports need from the chat format."""

    chat_template: str
    """The template rows were rendered with (saved with every export)."""
    stop_token_ids: list[int]
    """Tokens that end an assistant turn (EOS, <|im_end|>): generation stops there."""
    eval_conversations: list[list[dict[str, str]]]
    """Held-out conversations answered by greedy generation at each evaluation."""


# ----------------------------------------------------------------------------- per worker


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build engine, resume, then step / log / eval / checkpoint."""
    import ray.train
    import torch.distributed as dist

    from fmray.data.pipeline import iter_train_batches
    from fmray.data.sft_data import ROW_COLUMNS
    from fmray.data.tokenizer import load_tokenizer
    from fmray.distributed.deepspeed_setup import build_ds_config
    from fmray.eval.exact_match import distributed_exact_match
    from fmray.models.lora import apply_lora
    from fmray.models.registry import build_causal_lm
    from fmray.train.checkpointing import Export, checkpoint_and_report, lineage, resume
    from fmray.train.launch import local_dir_of, record_placement_group
    from fmray.train.metrics import MetricsLogger, print_line, step_metrics
    from fmray.train.worker import (
        build_train_engine,
        grad_norm_of,
        rank_share,
        read_eval_rows,
        setup_worker,
        zero3_construction,
    )

    config: SFTConfig = loop_config["config"]
    plan: SFTPlan = loop_config["plan"]
    train = config.train
    kind = "lora" if config.lora is not None else "causal_lm"

    # --- setup: same seed on every rank, so LoRA's fresh adapters are identical everywhere
    worker = setup_worker(config.run.seed, config.scaling.use_gpu)
    rank, world, device = worker.rank, worker.world, worker.device
    tokenizer = load_tokenizer(local_dir_of(plan.tokenizer_dir))
    ds_config = build_ds_config(train, config.zero, world, config.scaling.use_gpu)
    assert plan.model_path is not None
    with zero3_construction(ds_config):
        model = build_causal_lm(None, str(local_dir_of(plan.model_path)), len(tokenizer))
    # Exports stop generating at the end of the assistant's turn, in transformers and in serving.
    model.generation_config.eos_token_id = plan.stop_token_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if config.model.gradient_checkpointing:
        # Non-reentrant: frozen LoRA inputs carry no grad, which reentrant checkpointing needs.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora is not None:
        model = apply_lora(model, config.lora)
    engine = build_train_engine(model, ds_config, train)
    engines = {"model": engine}

    # --- resume: model (or adapters), optimizer, scheduler, RNG; data position from the step
    start_step = resume(engines, train, plan, kind)
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
        ROW_COLUMNS,
    )
    # The held-out rows are few and read every evaluation: fetch them once.
    eval_rows = read_eval_rows(rank, world, micro, plan, ROW_COLUMNS)
    eval_share, num_counted = rank_share(plan.eval_conversations, rank, world)
    export = Export(kind, "model", tokenizer, config.checkpoint.export_hf)
    config_yaml = dump_config(config)
    # A Tune PBT segment stops early (and checkpoints) without changing the LR schedule.
    stop_step = min(plan.stop_step or train.max_steps, train.max_steps)
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

        # --- evaluate: eval loss on held-out rows, exact match of greedy answers
        evaluate = bool(train.eval_every and done % train.eval_every == 0) or done == stop_step
        if evaluate:
            metrics["step"] = done
            metrics["val_loss"] = eval_loss(engine, eval_rows, device)
            if plan.eval_conversations:
                metrics["val_exact_match"] = distributed_exact_match(
                    engine.module,
                    tokenizer,
                    eval_share,
                    num_counted,
                    plan.chat_template,
                    config.eval,
                    device,
                )
                if worker.is_chief and config.logging.progress:
                    print_line(
                        f"eval step {done} | val_loss {metrics['val_loss']:.4f} | "
                        f"exact match {metrics['val_exact_match']:.3f} "
                        f"({len(plan.eval_conversations)} held-out)"
                    )
        if logger and metrics:
            logger.log(metrics, train.max_steps)

        # --- checkpoint (all ranks write their shard; Ray Train merges and registers it)
        # Ray Train hears of metrics only at evaluation and checkpoint steps: a report waits for
        # the controller's ~2 s poll of the previous one, so per-step reports would throttle.
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


# ----------------------------------------------------------------------------- driver


def check_inputs(config: SFTConfig) -> None:
    """Fail before Ray starts: the model, the data files and checkpoint.resume must exist."""
    from fmray.train.launch import check_chat_inputs

    check_chat_inputs(config)


def prepare_run(config: SFTConfig) -> SFTPlan:
    """Driver-side work before the workers start: tokenizer + template, tokenized rows, all in
    the run's storage."""
    from fmray.data.chat_template import stop_token_ids
    from fmray.data.sft_data import build_sft_data
    from fmray.train.launch import (
        check_batch_geometry,
        check_resume,
        data_cache_root,
        local_dir_of,
        prepare_chat_tokenizer,
        resolve_model_path,
        run_dir_of,
        stage_model,
        write_run_config,
    )

    run_dir = run_dir_of(config)
    model_path = resolve_model_path(str(config.model.path))
    data = config.data
    tokenizer, tokenizer_dir = prepare_chat_tokenizer(data.tokenizer, model_path, run_dir)
    cache_root = data_cache_root(data.cache_dir, run_dir)
    sft = build_sft_data(
        data, config.run.seed, str(local_dir_of(tokenizer_dir)), tokenizer.chat_template, cache_root
    )
    source = f"data.source={data.source!r}"
    num_eval_batches = check_batch_geometry(config, sft.num_train_rows, sft.num_eval_rows, source)
    write_run_config(config, run_dir)
    print(
        f"[fmray] data: {sft.num_train_rows} train / {sft.num_eval_rows} eval rows of "
        f"{sft.seq_len} tokens (packing={data.packing}) ({sft.root})"
    )
    return SFTPlan(
        run_dir=run_dir,
        tokenizer_dir=tokenizer_dir,
        train_data=storage.join(sft.root, "train"),
        eval_data=storage.join(sft.root, "eval"),
        seq_len=sft.seq_len,
        num_train_rows=sft.num_train_rows,
        num_eval_batches=num_eval_batches,
        model_path=stage_model(model_path, run_dir),
        resume_from=check_resume(config),
        chat_template=tokenizer.chat_template,
        stop_token_ids=stop_token_ids(tokenizer),
        eval_conversations=sft.eval_conversations[: config.eval.num_examples],
    )


def build_trainer(config: SFTConfig, plan: SFTPlan, callbacks: list[Any] | None = None) -> Any:
    from fmray.train.launch import build_trainer as build

    return build(config, plan, train_loop, callbacks)


def run(config: SFTConfig, address: str | None = None) -> Any:
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
        kind = "merged LoRA" if config.lora is not None else "full"
        outputs.append(
            ("HF export", f"{storage.join(location, 'hf')} ({kind} model, chat template)")
        )
        if config.lora is not None:
            outputs.append(("adapter", f"{storage.join(location, 'adapter')} (peft)"))
    keys = ("step", "loss", "val_loss", "val_exact_match")
    print_summary(plan.run_dir, result, outputs, keys)
    return result

"""Reward model, full or LoRA: Ray Train workers train a causal-LM backbone with a scalar head
on preference pairs with the Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected).

    fmray sft --config jobs/sft/tiny.yaml                        # a chat model to start from
    fmray reward --config jobs/reward/tiny.yaml                  # CPU, 2 workers, ZeRO-2
    fmray reward --config jobs/reward/tiny.yaml lora.r=8         # LoRA: adapters + head train
    fmray reward --config jobs/reward/llama_1b.yaml              # GPU cluster, ZeRO-3, bf16

`model.path` is an SFT export or run folder (its newest HF export), local or remote. The score
of a conversation is the head's output at its last token (the row's last non-pad token), which
is what transformers' `AutoModelForSequenceClassification` computes, so every checkpoint's hf/
is a reward model that stock transformers loads and scores with (`fmray export` rebuilds it from
the DeepSpeed files; a LoRA run also writes adapter/). Held-out loss, pairwise accuracy (chosen
scored above rejected) and mean margin (r_chosen - r_rejected) are reported at each evaluation.
Running the same command again resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from pydantic import model_validator

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
from fmray.data.preference_data import PreferenceDataSection
from fmray.models.lora import LoraSection
from fmray.train.preference import PreferencePlan


class RewardConfig(Section):
    run: RunSection = RunSection(name="reward")
    model: ModelSection = ModelSection()
    data: PreferenceDataSection = PreferenceDataSection()
    lora: LoraSection | None = None
    """LoRA adapters (setting any lora.* key enables them; the head always trains)."""
    train: TrainSection = TrainSection(lr=1e-4, max_steps=100, eval_every=25)
    zero: ZeroSection = ZeroSection()
    checkpoint: CheckpointSection = CheckpointSection()
    scaling: ScalingSection = ScalingSection()
    logging: LoggingSection = LoggingSection()

    @model_validator(mode="after")
    def _needs_model_path(self) -> RewardConfig:
        if self.model.path is None:
            raise ValueError(
                "model.path must be set for reward: an HF causal-LM directory (an SFT export) "
                "or an fmray run folder such as runs/sft-tiny"
            )
        return self


# ----------------------------------------------------------------------------- per worker


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build engine, resume, then step / log / eval / checkpoint."""
    import ray.train

    from fmray.data.pipeline import iter_train_batches
    from fmray.data.preference_data import PAIR_COLUMNS
    from fmray.data.tokenizer import load_tokenizer
    from fmray.distributed.deepspeed_setup import build_ds_config
    from fmray.models.heads import build_reward_model
    from fmray.models.lora import apply_lora
    from fmray.train.checkpointing import Export, checkpoint_and_report, lineage, resume
    from fmray.train.launch import local_dir_of, record_placement_group
    from fmray.train.losses import bradley_terry_loss
    from fmray.train.metrics import MetricsLogger, print_line, step_metrics
    from fmray.train.preference import pair_tensors
    from fmray.train.worker import (
        all_reduce_sums,
        build_train_engine,
        grad_norm_of,
        read_eval_rows,
        setup_worker,
        zero3_construction,
    )

    config: RewardConfig = loop_config["config"]
    plan: PreferencePlan = loop_config["plan"]
    train = config.train
    kind = "reward_lora" if config.lora is not None else "reward"

    # --- setup: same seed on every rank, so the fresh head (and adapters) match everywhere
    worker = setup_worker(config.run.seed, config.scaling.use_gpu)
    rank, world, device = worker.rank, worker.world, worker.device
    tokenizer = load_tokenizer(local_dir_of(plan.tokenizer_dir))
    ds_config = build_ds_config(train, config.zero, world, config.scaling.use_gpu)
    assert plan.model_path is not None
    with zero3_construction(ds_config):
        model = build_reward_model(str(local_dir_of(plan.model_path)), tokenizer.pad_token_id)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora is not None:
        model = apply_lora(model, config.lora, task_type="SEQ_CLS")
    engine = build_train_engine(model, ds_config, train)
    engines = {"model": engine}

    # --- resume: model (or adapters and head), optimizer, scheduler, RNG; data position
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
        PAIR_COLUMNS,
    )
    eval_pairs = read_eval_rows(rank, world, micro, plan, PAIR_COLUMNS)
    export = Export(kind, "model", tokenizer, config.checkpoint.export_hf)
    config_yaml = dump_config(config)
    stop_step = min(plan.stop_step or train.max_steps, train.max_steps)
    run_start = time.perf_counter()

    for step in range(start_step, stop_step):
        # --- forward both sides of each pair / backward / one optimizer step per window
        step_start = time.perf_counter()
        engine.train()
        sums = torch.zeros(3, dtype=torch.float64)  # loss, correct pairs, margin
        grad_norm = None
        for _ in range(accum):
            input_ids, _ = pair_tensors(next(batches), device)
            scores = engine(input_ids=input_ids).logits.squeeze(-1).float()
            chosen, rejected = scores.chunk(2)
            loss = bradley_terry_loss(chosen, rejected).mean()
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary() and config.zero.stage == 0:
                grad_norm = grad_norm_of(engine.module)
            engine.step()
            margin = (chosen - rejected).detach()
            sums += torch.stack([loss.detach(), (margin > 0).float().mean(), margin.mean()]).cpu()
        done = step + 1

        # --- log: means over ranks and micro-batches
        metrics: dict[str, Any] = {}
        if done % train.log_every == 0 or done == stop_step:
            loss_sum, correct, margin_sum = all_reduce_sums(list(sums), device)
            metrics = step_metrics(
                done,
                loss_sum,
                accum * world,
                engine,
                grad_norm,
                global_batch * 2 * plan.seq_len,
                time.perf_counter() - step_start,
                time.perf_counter() - run_start,
            )
            metrics["accuracy"] = correct / (accum * world)
            metrics["margin"] = margin_sum / (accum * world)

        # --- evaluate: held-out loss, pairwise accuracy and margin
        evaluate = bool(train.eval_every and done % train.eval_every == 0) or done == stop_step
        if evaluate:
            metrics["step"] = done
            metrics.update(evaluate_pairs(engine, eval_pairs, device))
            if worker.is_chief and config.logging.progress:
                print_line(
                    f"eval step {done} | val_loss {metrics['val_loss']:.4f} | accuracy "
                    f"{metrics['val_accuracy']:.3f} | margin {metrics['val_margin']:.3f}"
                )
        if logger and metrics:
            logger.log(metrics, train.max_steps)

        # --- checkpoint (all ranks write their shard; Ray Train merges and registers it)
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
def evaluate_pairs(
    engine: Any, eval_pairs: list[dict[str, np.ndarray]], device: Any
) -> dict[str, float]:
    """Mean Bradley-Terry loss, accuracy and margin over every held-out pair of all ranks."""
    from fmray.train.losses import bradley_terry_loss
    from fmray.train.preference import pair_tensors
    from fmray.train.worker import all_reduce_sums

    engine.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, correct, margin, pairs
    for rows in eval_pairs:
        input_ids, _ = pair_tensors(rows, device)
        chosen, rejected = engine(input_ids=input_ids).logits.squeeze(-1).float().chunk(2)
        margin = chosen - rejected
        sums += torch.stack(
            [
                bradley_terry_loss(chosen, rejected).sum(),
                (margin > 0).float().sum(),
                margin.sum(),
                torch.tensor(float(len(margin))),
            ]
        ).cpu()
    engine.train()
    loss_sum, correct, margin_sum, count = all_reduce_sums(list(sums), device)
    return {
        "val_loss": loss_sum / count,
        "val_accuracy": correct / count,
        "val_margin": margin_sum / count,
    }


# ----------------------------------------------------------------------------- driver


def check_inputs(config: RewardConfig) -> None:
    from fmray.train.launch import check_chat_inputs

    check_chat_inputs(config)


def prepare_run(config: RewardConfig) -> PreferencePlan:
    from fmray.train.preference import prepare_preference_run

    return prepare_preference_run(config)


def build_trainer(
    config: RewardConfig, plan: PreferencePlan, callbacks: list[Any] | None = None
) -> Any:
    from fmray.train.launch import build_trainer as build

    return build(config, plan, train_loop, callbacks)


def run(config: RewardConfig, address: str | None = None) -> Any:
    from fmray import storage
    from fmray.distributed.planner import check_memory
    from fmray.distributed.runtime import init_ray
    from fmray.train.launch import checkpoint_location, fit, print_summary

    check_inputs(config)
    check_memory(config)  # the planner: a run that will not fit stops before Ray starts
    plan = prepare_run(config)  # before Ray: a bad record fails here
    required_cpus = config.scaling.num_workers * config.scaling.cpus_per_worker
    init_ray(address, required_cpus, config.logging.verbose)
    result = fit(config, lambda cfg: build_trainer(cfg, plan))
    outputs = [("base model", plan.model_path or "")]
    if result.checkpoint is not None:
        location = checkpoint_location(result.checkpoint)
        outputs.append(
            ("HF export", f"{storage.join(location, 'hf')} (AutoModelForSequenceClassification)")
        )
        if config.lora is not None:
            outputs.append(("adapter", f"{storage.join(location, 'adapter')} (peft)"))
    keys = ("step", "loss", "val_loss", "val_accuracy", "val_margin")
    print_summary(plan.run_dir, result, outputs, keys)
    return result

"""Direct preference optimisation, full or LoRA: Ray Train workers train a policy engine on
preference pairs against a frozen reference, with no reward model.

    fmray sft --config jobs/sft/tiny.yaml                           # the policy to start from
    fmray dpo --config jobs/dpo/tiny.yaml                           # CPU, 2 workers, ZeRO-2
    fmray dpo --config jobs/dpo/tiny.yaml lora.r=8                  # LoRA: reference = adapters off
    fmray dpo --config jobs/dpo/tiny.yaml dpo.loss=ipo dpo.beta=0.5
    fmray dpo --config jobs/dpo/llama_1b.yaml                       # GPU cluster, ZeRO-3, bf16

The policy starts from `model.path` (an SFT export or run folder). The reference is
`dpo.reference` (default: the same model) held as an inference-only engine (ZeRO-3 keeps it
partitioned); with LoRA it is the policy itself with its adapters disabled, so no second copy is
held. `dpo.precompute_reference=true` scores every training pair with the reference once before
the first step and frees it, so each step runs the policy alone. Losses: sigmoid (`beta`), cDPO
(`label_smoothing`), IPO (see fmray.train.losses). Metrics: loss, rewards_chosen /
rewards_rejected (beta * log-ratio to the reference), margin, preference accuracy, on training
and held-out pairs, and held-out exact match of greedy answers against the chosen replies (the
built-in task's ground truth). Checkpoints and exports are SFT's: hf/ (merged for LoRA, chat
template, stop tokens) and adapter/ for LoRA.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

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
from fmray.eval.exact_match import EvalSection
from fmray.models.lora import LoraSection
from fmray.train.preference import PreferencePlan


class DPOSection(Section):
    beta: float = Field(0.1, gt=0.0)
    """Strength of the pull towards the reference (the implicit reward's scale)."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid (DPO; cDPO with label_smoothing) or ipo (on per-token mean log-probs)."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """cDPO: assumed probability that a pair's preference label is flipped (sigmoid only)."""
    reference: str | None = None
    """Reference model (HF folder or fmray run folder); unset: model.path (LoRA: adapters off)."""
    precompute_reference: bool = False
    """Score all training pairs with the reference before the first step, then free it."""


class DPOConfig(Section):
    run: RunSection = RunSection(name="dpo")
    model: ModelSection = ModelSection()
    data: PreferenceDataSection = PreferenceDataSection()
    lora: LoraSection | None = None
    """LoRA adapters (setting any lora.* key enables them); null: full fine-tuning."""
    dpo: DPOSection = DPOSection()
    eval: EvalSection = EvalSection()
    train: TrainSection = TrainSection(lr=5e-6, max_steps=100, eval_every=25)
    zero: ZeroSection = ZeroSection()
    checkpoint: CheckpointSection = CheckpointSection()
    scaling: ScalingSection = ScalingSection()
    logging: LoggingSection = LoggingSection()

    @model_validator(mode="after")
    def _check(self) -> DPOConfig:
        if self.model.path is None:
            raise ValueError(
                "model.path must be set for dpo: an HF causal-LM directory (an SFT export) or "
                "an fmray run folder such as runs/sft-tiny"
            )
        if self.dpo.loss == "ipo" and self.dpo.label_smoothing:
            raise ValueError("dpo.label_smoothing applies to dpo.loss=sigmoid only (cDPO)")
        if self.lora is not None and self.dpo.reference is not None:
            raise ValueError(
                "dpo.reference cannot be set with lora: the reference is the base model with "
                "the adapters disabled"
            )
        return self


# ----------------------------------------------------------------------------- per worker


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build policy and reference, resume, then step / eval / checkpoint."""
    import ray.train

    from fmray.data.pipeline import iter_train_batches
    from fmray.data.preference_data import PAIR_COLUMNS
    from fmray.data.tokenizer import load_tokenizer
    from fmray.distributed.deepspeed_setup import build_ds_config
    from fmray.eval.exact_match import distributed_exact_match
    from fmray.models.lora import apply_lora
    from fmray.models.registry import build_causal_lm
    from fmray.train.checkpointing import Export, checkpoint_and_report, lineage, resume
    from fmray.train.launch import local_dir_of, record_placement_group
    from fmray.train.losses import dpo_loss
    from fmray.train.metrics import MetricsLogger, print_line, step_metrics
    from fmray.train.worker import (
        all_reduce_sums,
        build_frozen_engine,
        build_train_engine,
        grad_norm_of,
        rank_share,
        read_eval_rows,
        setup_worker,
        zero3_construction,
    )

    config: DPOConfig = loop_config["config"]
    plan: PreferencePlan = loop_config["plan"]
    train, dpo = config.train, config.dpo
    kind = "lora" if config.lora is not None else "causal_lm"
    columns = (*PAIR_COLUMNS, "index")

    # --- setup: policy engine, and the reference (a frozen engine, or the LoRA base)
    worker = setup_worker(config.run.seed, config.scaling.use_gpu)
    rank, world, device = worker.rank, worker.world, worker.device
    tokenizer = load_tokenizer(local_dir_of(plan.tokenizer_dir))
    ds_config = build_ds_config(train, config.zero, world, config.scaling.use_gpu)
    assert plan.model_path is not None
    with zero3_construction(ds_config):
        model = build_causal_lm(None, str(local_dir_of(plan.model_path)), len(tokenizer))
    model.generation_config.eos_token_id = plan.stop_token_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora is not None:
        model = apply_lora(model, config.lora)
    engine = build_train_engine(model, ds_config, train)
    engines = {"model": engine}
    reference = None
    if config.lora is None:
        reference_path = plan.reference_path or plan.model_path
        with zero3_construction(ds_config):
            reference_model = build_causal_lm(
                None, str(local_dir_of(reference_path)), len(tokenizer)
            )
        reference = build_frozen_engine(reference_model, ds_config)
        del reference_model  # the engine holds it; dropping the engine frees it

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
        columns,
    )
    mean_logps = dpo.loss == "ipo"
    # The reference is frozen: its held-out scores are computed once.
    eval_pairs = read_eval_rows(rank, world, micro, plan, columns)
    eval_reference = [
        reference_logps(engine, reference, rows, device, mean_logps) for rows in eval_pairs
    ]
    precomputed: dict[int, torch.Tensor] | None = None
    if dpo.precompute_reference:
        steps_per_epoch = plan.num_train_rows // global_batch
        precomputed = precompute_reference(
            engine, reference, batches, steps_per_epoch * accum, device, mean_logps
        )
        if worker.is_chief:
            print_line(f"reference scores precomputed for {steps_per_epoch * global_batch} pairs")
        reference = None  # freed: each step now runs the policy alone
    eval_share, num_counted = rank_share(plan.eval_conversations, rank, world)
    export = Export(kind, "model", tokenizer, config.checkpoint.export_hf)
    config_yaml = dump_config(config)
    stop_step = min(plan.stop_step or train.max_steps, train.max_steps)
    run_start = time.perf_counter()

    for step in range(start_step, stop_step):
        # --- policy forward on both sides, reference log-probs, DPO loss, backward, step
        step_start = time.perf_counter()
        engine.train()
        sums = torch.zeros(5, dtype=torch.float64)  # loss, correct, margin, r_chosen, r_rejected
        grad_norm = None
        for _ in range(accum):
            rows = next(batches)
            if precomputed is not None:
                ref = stored_reference(precomputed, rows, device)
            else:
                ref = reference_logps(engine, reference, rows, device, mean_logps)
            policy = policy_logps(engine, rows, device, mean_logps)
            terms = dpo_loss(
                policy[0], policy[1], ref[0], ref[1], dpo.beta, dpo.loss, dpo.label_smoothing
            )
            loss = terms.losses.mean()
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary() and config.zero.stage == 0:
                grad_norm = grad_norm_of(engine.module)
            engine.step()
            sums += pair_sums(loss.detach(), terms).cpu()
        done = step + 1

        # --- log: means over ranks and micro-batches
        metrics: dict[str, Any] = {}
        if done % train.log_every == 0 or done == stop_step:
            totals = all_reduce_sums(list(sums), device)
            metrics = step_metrics(
                done,
                totals[0],
                accum * world,
                engine,
                grad_norm,
                global_batch * 2 * plan.seq_len,
                time.perf_counter() - step_start,
                time.perf_counter() - run_start,
            )
            names = ("accuracy", "margin", "rewards_chosen", "rewards_rejected")
            metrics.update({n: v / (accum * world) for n, v in zip(names, totals[1:], strict=True)})

        # --- evaluate: DPO loss, rewards and accuracy on held-out pairs; exact match
        evaluate = bool(train.eval_every and done % train.eval_every == 0) or done == stop_step
        if evaluate:
            metrics["step"] = done
            metrics.update(evaluate_pairs(engine, eval_pairs, eval_reference, config, device))
            line = (
                f"eval step {done} | val_loss {metrics['val_loss']:.4f} | accuracy "
                f"{metrics['val_accuracy']:.3f} | margin {metrics['val_margin']:.3f}"
            )
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
                line += f" | exact match {metrics['val_exact_match']:.3f}"
            if worker.is_chief and config.logging.progress:
                print_line(line)
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


def sequence_scores(logits: torch.Tensor, labels: torch.Tensor, mean: bool) -> torch.Tensor:
    """(2, B): summed (or per-token mean) reply log-probs, chosen row then rejected row."""
    from fmray.train.losses import sequence_logps

    logps, counts = sequence_logps(logits, labels)
    if mean:
        logps = logps / counts.clamp(min=1)
    return torch.stack(logps.chunk(2))


def policy_logps(engine: Any, rows: dict[str, np.ndarray], device: Any, mean: bool) -> torch.Tensor:
    from fmray.train.preference import pair_tensors

    input_ids, labels = pair_tensors(rows, device)
    return sequence_scores(engine(input_ids=input_ids, use_cache=False).logits, labels, mean)


@torch.no_grad()
def reference_logps(
    engine: Any, reference: Any, rows: dict[str, np.ndarray], device: Any, mean: bool
) -> torch.Tensor:
    """The reference's scores: the frozen engine, or (LoRA) the policy with adapters off."""
    from fmray.train.preference import pair_tensors

    input_ids, labels = pair_tensors(rows, device)
    if reference is not None:
        logits = reference(input_ids=input_ids, use_cache=False).logits
    else:
        with engine.module.disable_adapter():
            logits = engine.module(input_ids=input_ids, use_cache=False).logits
    return sequence_scores(logits, labels, mean)


@torch.no_grad()
def precompute_reference(
    engine: Any, reference: Any, batches: Any, num_micro_batches: int, device: Any, mean: bool
) -> dict[int, torch.Tensor]:
    """Reference scores (chosen, rejected) of every training pair this rank reads, by row index.

    Reads exactly one epoch from the training iterator, which cycles through the epoch, so it
    is back at the same position afterwards.
    """
    scores: dict[int, torch.Tensor] = {}
    for _ in range(num_micro_batches):
        rows = next(batches)
        ref = reference_logps(engine, reference, rows, device, mean).cpu()
        for column, index in enumerate(rows["index"]):
            scores[int(index)] = ref[:, column]
    return scores


def stored_reference(
    precomputed: dict[int, torch.Tensor], rows: dict[str, np.ndarray], device: Any
) -> torch.Tensor:
    """(2, B): the precomputed reference scores of a micro-batch's rows, as `reference_logps`
    gives them."""
    return torch.stack([precomputed[int(i)] for i in rows["index"]]).to(device).T


def pair_sums(loss: torch.Tensor, terms: Any) -> torch.Tensor:
    """Per-micro-batch means: loss, accuracy, margin, chosen and rejected rewards."""
    margin = terms.chosen_rewards - terms.rejected_rewards
    return torch.stack(
        [
            loss.double(),
            (margin > 0).double().mean(),
            margin.double().mean(),
            terms.chosen_rewards.double().mean(),
            terms.rejected_rewards.double().mean(),
        ]
    )


@torch.no_grad()
def evaluate_pairs(
    engine: Any,
    eval_pairs: list[dict[str, np.ndarray]],
    eval_reference: list[torch.Tensor],
    config: DPOConfig,
    device: Any,
) -> dict[str, float]:
    """DPO loss, accuracy, margin and rewards over every held-out pair of all ranks."""
    from fmray.train.losses import dpo_loss
    from fmray.train.worker import all_reduce_sums

    dpo = config.dpo
    engine.eval()
    sums = torch.zeros(6, dtype=torch.float64)
    for rows, ref in zip(eval_pairs, eval_reference, strict=True):
        policy = policy_logps(engine, rows, device, dpo.loss == "ipo")
        terms = dpo_loss(
            policy[0], policy[1], ref[0], ref[1], dpo.beta, dpo.loss, dpo.label_smoothing
        )
        margin = terms.chosen_rewards - terms.rejected_rewards
        sums += torch.stack(
            [
                terms.losses.double().sum(),
                (margin > 0).double().sum(),
                margin.double().sum(),
                terms.chosen_rewards.double().sum(),
                terms.rejected_rewards.double().sum(),
                torch.tensor(float(len(margin)), dtype=torch.float64),
            ]
        ).cpu()
    engine.train()
    *totals, count = all_reduce_sums(list(sums), device)
    names = ("val_loss", "val_accuracy", "val_margin", "val_rewards_chosen", "val_rewards_rejected")
    return {name: total / count for name, total in zip(names, totals, strict=True)}


# ----------------------------------------------------------------------------- driver


def check_inputs(config: DPOConfig) -> None:
    from fmray.train.launch import check_chat_inputs, resolve_model_path

    check_chat_inputs(config)
    if config.dpo.reference is not None:
        resolve_model_path(config.dpo.reference, "dpo.reference")


def prepare_run(config: DPOConfig) -> PreferencePlan:
    from fmray.train.preference import prepare_preference_run

    return prepare_preference_run(config, config.dpo.reference, config.eval.num_examples)


def build_trainer(
    config: DPOConfig, plan: PreferencePlan, callbacks: list[Any] | None = None
) -> Any:
    from fmray.train.launch import build_trainer as build

    return build(config, plan, train_loop, callbacks)


def run(config: DPOConfig, address: str | None = None) -> Any:
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
        kind = "merged LoRA" if config.lora is not None else "full"
        outputs.append(
            ("HF export", f"{storage.join(location, 'hf')} ({kind} model, chat template)")
        )
        if config.lora is not None:
            outputs.append(("adapter", f"{storage.join(location, 'adapter')} (peft)"))
    keys = ("step", "loss", "val_loss", "val_accuracy", "val_margin", "val_exact_match")
    print_summary(plan.run_dir, result, outputs, keys)
    return result

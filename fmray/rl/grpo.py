"""GRPO (group relative policy optimisation, Shao et al. 2024): G replies per prompt, each scored,
advantages normalised within the prompt's group, a clipped policy loss with a k3 KL penalty to
the reference, and no critic. Everything runs in the Ray Train worker group.

    fmray sft --config jobs/sft/tiny.yaml                     # the policy to start from
    fmray grpo --config jobs/grpo/tiny.yaml                   # exact-match rule reward, CPU
    fmray grpo --config jobs/grpo/tiny.yaml lora.r=8 train.lr=1.0e-3
    fmray grpo --config jobs/grpo/tiny.yaml reward.model=runs/reward-tiny reward.rule_weight=1.0
    fmray grpo --config jobs/grpo/llama_1b.yaml               # GPU cluster, ZeRO-3, bf16

Each step: (1) rollout - each worker samples G replies to its share of the step's prompts from
the policy's current weights (fmray's batched KV-cache engine; ZeRO-3 gathers the weights once
for the phase); (2) score - rewards (rule and/or reward model), the sampling policy's and the
reference's log-probs; (3) advantages - (r - mean) / std within each group; (4) update -
grpo.epochs passes of mini-batches (train.micro_batch_size samples) over the rollout:

    loss = mean over samples of mean over reply tokens of
           max(-A r, -A clip(r, 1 - eps, 1 + eps)) + beta * k3(pi, pi_ref)

Metrics: reward mean/std (and each reward part), KL, entropy, clip fraction, reply length,
timing/generation, timing/scoring, timing/training, generation tokens/s; held-out mean reward and
exact match of greedy replies at step 0 and every train.eval_every steps. Checkpoints hold the
policy, its optimizer, the step and RNG; hf/ is the policy (merged for LoRA) that `fmray serve`
serves. Running the same command again resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import torch
from pydantic import Field

from fmray.config import Section, dump_config
from fmray.rl.common import RLConfig, RLPlan, RolloutSection


class GRPOSection(Section):
    clip: float = Field(0.2, gt=0.0)
    """eps of the clipped ratio."""
    kl_coef: float = Field(0.04, ge=0.0)
    """beta: weight of the k3 KL to the reference in the loss."""
    epochs: int = Field(1, ge=1)
    """Passes over each rollout (1 with one mini-batch: purely on-policy)."""


class GRPOConfig(RLConfig):
    rollout: RolloutSection = RolloutSection(samples_per_prompt=4)
    grpo: GRPOSection = GRPOSection()


# ----------------------------------------------------------------------------- per worker


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: policy, reference and rewards; then rollout / update / checkpoint."""
    from fmray.data.tokenizer import load_tokenizer
    from fmray.distributed.deepspeed_setup import build_ds_config
    from fmray.rl.common import (
        build_policy,
        build_rewards,
        evaluate,
        optimizer_schedule,
        rank_prompts,
        rollout,
        rollout_metrics,
        sampling_params,
    )
    from fmray.rl.losses import (
        clipped_policy_loss,
        entropy_from_logits,
        group_advantages,
        k3_kl,
        masked_mean,
    )
    from fmray.rl.prompts import read_prompts
    from fmray.rl.rollout import (
        action_logits,
        action_logps,
        reference_logps,
        score_in_chunks,
        sequence_logps,
    )
    from fmray.train.checkpointing import Export, checkpoint_and_report, lineage, resume
    from fmray.train.launch import local_dir_of, record_placement_group
    from fmray.train.metrics import MetricsLogger, print_line, step_metrics
    from fmray.train.worker import all_reduce_sums, rank_share, setup_worker

    config: GRPOConfig = loop_config["config"]
    plan: RLPlan = loop_config["plan"]
    grpo, micro = config.grpo, config.train.micro_batch_size
    group = config.rollout.samples_per_prompt
    kind = "lora" if config.lora is not None else "causal_lm"

    # --- setup: policy (training engine), reference (frozen, or LoRA's base), rewards
    worker = setup_worker(config.run.seed, config.scaling.use_gpu)
    rank, world, device = worker.rank, worker.world, worker.device
    tokenizer = load_tokenizer(local_dir_of(plan.tokenizer_dir))
    schedule = optimizer_schedule(config.train, config.updates_per_step(grpo.epochs))
    ds_config = build_ds_config(schedule, config.zero, world, config.scaling.use_gpu)
    engine, reference = build_policy(config, plan, ds_config, schedule, len(tokenizer))
    rewards = build_rewards(config, plan, ds_config)
    engines = {"model": engine}

    # --- resume: policy (or adapters), optimizer, scheduler, RNG; prompts follow from the step
    start_step = resume(engines, schedule, plan, kind)
    if worker.is_chief:
        if start_step:
            print_line(f"resumed from step {start_step}")
        record_placement_group(plan.run_dir)
    logger = MetricsLogger(plan.run_dir, start_step, config.logging) if worker.is_chief else None
    train_prompts, eval_prompts = read_prompts(plan.prompts)
    eval_share, num_counted = rank_share(eval_prompts[: config.eval.num_examples], rank, world)
    export = Export(kind, "model", tokenizer, config.checkpoint.export_hf)
    config_yaml = dump_config(config)
    stop_step = min(plan.stop_step or config.train.max_steps, config.train.max_steps)

    def reference_of(samples: Any) -> torch.Tensor:
        return reference_logps(engine, reference, samples)

    def eval_record(step: int) -> dict[str, Any]:
        return evaluate(
            step,
            engine,
            tokenizer,
            rewards,
            eval_share,
            num_counted,
            config,
            plan,
            device,
            worker.is_chief,
        )

    if start_step == 0:
        start_metrics = eval_record(0)  # the starting policy, for comparison
        if logger:
            logger.log(start_metrics, config.train.max_steps)
    run_start = time.perf_counter()

    for step in range(start_step, stop_step):
        step_start = time.perf_counter()
        engine.train()

        # --- rollout: G replies to each of this rank's prompts, from the current weights
        prompts, slots = rank_prompts(train_prompts, config, step, rank, world)
        params = sampling_params(config, step, slots, plan.stop_token_ids)
        batch = rollout(engine, tokenizer, rewards, prompts, params, config, plan, device)
        samples, mask = batch.samples, batch.samples.action_mask

        # --- score: log-probs of the sampling policy and the reference; group advantages
        scoring_start = time.perf_counter()
        old_logps = score_in_chunks(partial(sequence_logps, engine), samples, micro)
        ref_logps = score_in_chunks(reference_of, samples, micro)
        advantages = group_advantages(batch.scores, group)
        kl_sum = float(((old_logps - ref_logps) * mask).sum())
        scoring_s = batch.scoring_s + time.perf_counter() - scoring_start

        # --- update: clipped policy loss + beta * k3 KL, per-sample token means
        training_start = time.perf_counter()
        sums = torch.zeros(5, dtype=torch.float64)  # loss, k3, clip fraction, entropy, count
        generator = torch.Generator().manual_seed(config.run.seed * 7919 + step)
        for _ in range(grpo.epochs):
            order = torch.randperm(len(batch.scores), generator=generator)
            for start in range(0, len(order), micro):
                index = order[start : start + micro].to(device)
                rows = samples.rows(index)
                logits = action_logits(engine, rows)
                logps = action_logps(logits, rows)
                token_advantages = advantages[index][:, None].expand_as(logps)
                policy_losses, clipped = clipped_policy_loss(
                    logps, old_logps[index], token_advantages, grpo.clip
                )
                kl = k3_kl(logps, ref_logps[index])
                per_sample = masked_mean(policy_losses + grpo.kl_coef * kl, rows.action_mask, dim=1)
                loss = per_sample.mean()
                engine.backward(loss)
                engine.step()
                with torch.no_grad():
                    entropy = entropy_from_logits(logits.detach())
                    sums += torch.tensor(
                        [
                            float(loss),
                            float(masked_mean(kl, rows.action_mask)),
                            float(masked_mean(clipped, rows.action_mask)),
                            float(masked_mean(entropy, rows.action_mask)),
                            1.0,
                        ],
                        dtype=torch.float64,
                    )
        training_s = time.perf_counter() - training_start
        done = step + 1

        # --- log: rollout and update statistics over all ranks
        metrics = rollout_metrics(batch, kl_sum, device)
        loss_sum, k3_sum, clip_sum, entropy_sum, count = all_reduce_sums(list(sums), device)
        step_time = time.perf_counter() - step_start
        metrics.update(
            step_metrics(
                done,
                loss_sum,
                int(count),
                engine,
                None,
                int(batch.samples.attention_mask.sum()) * world,
                step_time,
                time.perf_counter() - run_start,
            )
        )
        metrics.update(
            {
                "kl_k3": k3_sum / count,
                "clip_fraction": clip_sum / count,
                "entropy": entropy_sum / count,
                "timing/scoring": scoring_s,
                "timing/training": training_s,
            }
        )

        # --- evaluate: greedy replies to held-out prompts
        every = config.train.eval_every
        if (every and done % every == 0) or done == stop_step:
            metrics.update(eval_record(done))
        if logger:
            logger.log(metrics, config.train.max_steps)

        # --- checkpoint (all ranks write their shard; Ray Train merges and registers it)
        every_ckpt = config.checkpoint.every_steps
        if (every_ckpt and done % every_ckpt == 0) or done == stop_step:
            meta = lineage(config.run.name, plan, start_step)
            checkpoint_and_report(metrics, done, engines, export, config_yaml, meta)
    if logger:
        logger.close()


# ----------------------------------------------------------------------------- driver


def run(config: GRPOConfig, address: str | None = None) -> Any:
    from fmray.rl.common import run_rl

    return run_rl(config, train_loop, address=address)

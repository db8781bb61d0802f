"""PPO for language models (Ouyang et al. 2022; the recipe of OpenRLHF and DeepSpeed-Chat): the
policy samples replies, a reward scores them, a KL penalty to the reference shapes per-token
rewards, a critic estimates values, GAE gives advantages, and clipped policy and value losses
update policy and critic over several epochs. Everything runs in the Ray Train worker group.

    fmray sft --config jobs/sft/tiny.yaml                     # the policy to start from
    fmray reward --config jobs/reward/tiny.yaml               # the reward model
    fmray ppo --config jobs/ppo/tiny.yaml                     # reward model + rule, CPU
    fmray ppo --config jobs/ppo/tiny.yaml ppo.kl_target=0.5   # adaptive KL coefficient
    fmray ppo --config jobs/ppo/llama_1b.yaml                 # GPU cluster, ZeRO-3, bf16

Each step: (1) rollout - each worker samples replies to its share of the step's prompts from the
policy's current weights (fmray's batched KV-cache engine; ZeRO-3 gathers the weights once for
the phase); (2) score - rewards (reward model and/or rule), log-probs of the sampling policy and
the reference, the critic's values; (3) advantages - per-token rewards -kl_coef * (log pi -
log pi_ref) plus the score at the last token, GAE(gamma, lambda), advantages whitened over all
workers; (4) update - ppo.epochs passes of mini-batches (train.micro_batch_size samples), each
one step of the policy (PPO-clip) and one of the critic (clipped value loss, its own optimizer
at ppo.critic_lr). The KL coefficient is fixed, or adaptive towards ppo.kl_target.

The critic starts from ppo.critic (default: the reward model, as OpenRLHF does, else the policy's
backbone with a fresh head). Metrics: reward mean/std and parts, KL, KL coefficient, entropy,
clip fraction, value loss, value clip fraction, reply length, timing/generation, timing/scoring,
timing/training, generation tokens/s; held-out mean reward and exact match of greedy replies at
step 0 and every train.eval_every steps. Checkpoints hold policy and critic with their
optimizers, the step, RNG and the KL coefficient; hf/ is the policy that `fmray serve` serves.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import torch
from pydantic import Field

from fmray.config import Section, dump_config
from fmray.rl.common import RLConfig, RLPlan


class PPOSection(Section):
    clip: float = Field(0.2, gt=0.0)
    """eps of the policy's clipped ratio."""
    value_clip: float = Field(0.2, gt=0.0)
    """How far a value may move from its rollout estimate before its loss is clipped."""
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """Discount over reply tokens."""
    lam: float = Field(0.95, ge=0.0, le=1.0)
    """GAE's lambda."""
    kl_coef: float = Field(0.05, ge=0.0)
    """KL penalty per token (the starting value when adaptive)."""
    kl_target: float | None = Field(None, gt=0.0)
    """Target KL per reply: set it to adapt kl_coef towards it (Ziegler et al.)."""
    kl_horizon: int = Field(10000, ge=1)
    """Samples over which the adaptive coefficient moves by its clipped error."""
    whiten_advantages: bool = True
    """Normalise advantages to zero mean, unit variance over the step's tokens."""
    epochs: int = Field(2, ge=1)
    """Passes over each rollout."""
    critic: str | None = None
    """The critic's starting weights (reward model or causal LM folder, or a run folder); unset:
    reward.model, else model.path."""
    critic_lr: float = Field(1e-4, gt=0.0)
    """The critic optimizer's learning rate (same schedule shape as train.lr)."""


class PPOConfig(RLConfig):
    ppo: PPOSection = PPOSection()

    @property
    def critic_path(self) -> str:
        return str(self.ppo.critic or self.reward.model or self.model.path)


# ----------------------------------------------------------------------------- per worker


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: policy, critic, reference and rewards; then rollout / update."""
    from fmray.data.tokenizer import load_tokenizer
    from fmray.distributed.deepspeed_setup import build_ds_config
    from fmray.models.heads import build_reward_model
    from fmray.rl.common import (
        build_policy,
        build_rewards,
        distributed_whiten,
        evaluate,
        optimizer_schedule,
        rank_prompts,
        rollout,
        rollout_metrics,
        sampling_params,
    )
    from fmray.rl.losses import (
        KLController,
        clipped_policy_loss,
        clipped_value_loss,
        entropy_from_logits,
        gae,
        kl_penalized_rewards,
        masked_mean,
    )
    from fmray.rl.prompts import read_prompts
    from fmray.rl.rollout import (
        ValueModel,
        action_logits,
        action_logps,
        action_values,
        reference_logps,
        score_in_chunks,
        sequence_logps,
    )
    from fmray.train.checkpointing import Export, checkpoint_and_report, lineage, resume
    from fmray.train.launch import local_dir_of, record_placement_group
    from fmray.train.metrics import MetricsLogger, print_line, step_metrics
    from fmray.train.worker import (
        all_reduce_sums,
        build_train_engine,
        rank_share,
        setup_worker,
        zero3_construction,
    )

    config: PPOConfig = loop_config["config"]
    plan: RLPlan = loop_config["plan"]
    ppo, micro = config.ppo, config.train.micro_batch_size
    kind = "lora" if config.lora is not None else "causal_lm"

    # --- setup: policy and critic (training engines), reference (frozen), rewards
    worker = setup_worker(config.run.seed, config.scaling.use_gpu)
    rank, world, device = worker.rank, worker.world, worker.device
    tokenizer = load_tokenizer(local_dir_of(plan.tokenizer_dir))
    schedule = optimizer_schedule(config.train, config.updates_per_step(ppo.epochs))
    critic_schedule = schedule.model_copy(update={"lr": ppo.critic_lr})
    ds_config = build_ds_config(schedule, config.zero, world, config.scaling.use_gpu)
    critic_ds_config = build_ds_config(critic_schedule, config.zero, world, config.scaling.use_gpu)
    engine, reference = build_policy(config, plan, ds_config, schedule, len(tokenizer))
    assert plan.critic_path is not None
    with zero3_construction(critic_ds_config):
        critic_model = ValueModel(
            build_reward_model(str(local_dir_of(plan.critic_path)), int(tokenizer.pad_token_id))
        )
    if config.model.gradient_checkpointing:
        critic_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    critic = build_train_engine(critic_model, critic_ds_config, critic_schedule)
    rewards = build_rewards(config, plan, ds_config)
    engines = {"model": engine, "critic": critic}

    # --- resume: policy (or adapters), critic, optimizers, RNG, the KL coefficient
    state: dict[str, Any] = {}
    start_step = resume(engines, schedule, plan, kind, {"critic": critic_schedule}, state)
    kl_control = KLController(state.get("kl_coef", ppo.kl_coef), ppo.kl_target, ppo.kl_horizon)
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
    samples_per_step = config.rollout.prompts_per_step * config.rollout.samples_per_prompt

    def critic_values(samples: Any) -> torch.Tensor:
        return action_values(critic, samples)

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
        critic.train()

        # --- rollout: replies to this rank's prompts, from the current weights
        prompts, slots = rank_prompts(train_prompts, config, step, rank, world)
        params = sampling_params(config, step, slots, plan.stop_token_ids)
        batch = rollout(engine, tokenizer, rewards, prompts, params, config, plan, device)
        samples, mask = batch.samples, batch.samples.action_mask

        # --- score: sampling policy and reference log-probs, the critic's values
        scoring_start = time.perf_counter()
        old_logps = score_in_chunks(partial(sequence_logps, engine), samples, micro)
        ref_logps = score_in_chunks(reference_of, samples, micro)
        old_values = score_in_chunks(critic_values, samples, micro)
        scoring_s = batch.scoring_s + time.perf_counter() - scoring_start

        # --- advantages: KL-penalised per-token rewards, GAE, whitening over all ranks
        token_rewards = kl_penalized_rewards(
            batch.scores, old_logps, ref_logps, mask, kl_control.value
        )
        advantages, returns = gae(token_rewards, old_values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            advantages = distributed_whiten(advantages, mask, device)
        kl_sum = float(((old_logps - ref_logps) * mask).sum())

        # --- update: per mini-batch one policy step (PPO-clip) and one critic step
        training_start = time.perf_counter()
        sums = torch.zeros(6, dtype=torch.float64)  # loss, clip, entropy, vloss, vclip, count
        generator = torch.Generator().manual_seed(config.run.seed * 7919 + step)
        for _ in range(ppo.epochs):
            order = torch.randperm(len(batch.scores), generator=generator)
            for start in range(0, len(order), micro):
                index = order[start : start + micro].to(device)
                rows = samples.rows(index)
                rows_mask = rows.action_mask
                logits = action_logits(engine, rows)
                logps = action_logps(logits, rows)
                losses, clipped = clipped_policy_loss(
                    logps, old_logps[index], advantages[index], ppo.clip
                )
                loss = masked_mean(losses, rows_mask)
                engine.backward(loss)
                engine.step()
                values = action_values(critic, rows)
                value_losses = clipped_value_loss(
                    values, old_values[index], returns[index], ppo.value_clip
                )
                value_loss = masked_mean(value_losses, rows_mask)
                critic.backward(value_loss)
                critic.step()
                with torch.no_grad():
                    moved = (values - old_values[index]).abs() > ppo.value_clip
                    sums += torch.tensor(
                        [
                            float(loss),
                            float(masked_mean(clipped, rows_mask)),
                            float(masked_mean(entropy_from_logits(logits.detach()), rows_mask)),
                            float(value_loss),
                            float(masked_mean(moved.float(), rows_mask)),
                            1.0,
                        ],
                        dtype=torch.float64,
                    )
        training_s = time.perf_counter() - training_start
        done = step + 1

        # --- log: rollout and update statistics over all ranks; adapt the KL coefficient
        metrics = rollout_metrics(batch, kl_sum, device)
        loss_sum, clip_sum, entropy_sum, value_sum, vclip_sum, count = all_reduce_sums(
            list(sums), device
        )
        step_time = time.perf_counter() - step_start
        metrics.update(
            step_metrics(
                done,
                loss_sum,
                int(count),
                engine,
                None,
                int(samples.attention_mask.sum()) * world,
                step_time,
                time.perf_counter() - run_start,
            )
        )
        metrics.update(
            {
                "clip_fraction": clip_sum / count,
                "entropy": entropy_sum / count,
                "value_loss": value_sum / count,
                "value_clip_fraction": vclip_sum / count,
                "kl_coef": kl_control.value,
                "timing/scoring": scoring_s,
                "timing/training": training_s,
            }
        )
        kl_control.update(metrics["kl"], samples_per_step)

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
            state = {"kl_coef": kl_control.value}
            checkpoint_and_report(metrics, done, engines, export, config_yaml, meta, state)
    if logger:
        logger.close()


# ----------------------------------------------------------------------------- driver


def run(config: PPOConfig, address: str | None = None) -> Any:
    from fmray.rl.common import run_rl

    return run_rl(config, train_loop, critic=config.critic_path, address=address)

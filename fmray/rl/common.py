"""What PPO and GRPO share around their loops: the config sections, the plan, the driver, and the
worker's models, rollouts, rewards and evaluation.

    plan = prepare_rl_run(config)                         # driver: tokenizer, prompts, plan
    policy, reference = build_policy(config, plan, ...)   # worker: engines
    batch = rollout(...)                                  # worker: generate + rewards

Each recipe's file keeps its own step loop (rollout, score, advantages, update, log, evaluate,
checkpoint) explicit and phase-commented, as the other recipes do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

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
)
from fmray.eval.exact_match import EvalSection
from fmray.models.lora import LoraSection
from fmray.rl.prompts import Prompt, PromptDataSection
from fmray.rl.rewards import RewardSection
from fmray.train.plan import RunPlan

PROMPTS_FILE = "rl_prompts.json"


class RolloutSection(Section):
    prompts_per_step: int = Field(16, ge=1)
    """Prompts per RL step over all workers (each worker takes an equal share)."""
    samples_per_prompt: int = Field(1, ge=1)
    """Replies sampled per prompt (GRPO's group size G)."""
    max_new_tokens: int = Field(32, ge=1)
    """Longest reply; a reply cut here gets its reward like any other."""
    temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature of the rollouts."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling of the rollouts."""
    max_batch_size: int = Field(64, ge=1)
    """Sequences decoded together per worker (continuous batching)."""


class RLConfig(Section):
    """The sections PPO and GRPO share; each adds its algorithm's section."""

    run: RunSection = RunSection(name="rl")
    model: ModelSection = ModelSection()
    data: PromptDataSection = PromptDataSection()
    lora: LoraSection | None = None
    """LoRA adapters on the policy (setting any lora.* key enables them); the reference is then
    the base model with the adapters disabled."""
    rollout: RolloutSection = RolloutSection()
    reward: RewardSection = RewardSection(rule="fmray.rl.rewards:exact_match")
    eval: EvalSection = EvalSection()
    train: TrainSection = TrainSection(lr=1e-5, max_steps=50, warmup_steps=0, min_lr_ratio=1.0)
    """train.max_steps counts RL steps (rollout + update); micro_batch_size x grad_accum_steps
    samples per worker make one optimizer step."""
    zero: ZeroSection = ZeroSection()
    checkpoint: CheckpointSection = CheckpointSection()
    scaling: ScalingSection = ScalingSection()
    logging: LoggingSection = LoggingSection()
    reference: str | None = None
    """KL reference model (HF folder or fmray run folder); unset: model.path (LoRA: adapters
    off)."""

    @model_validator(mode="after")
    def _check_rl(self) -> RLConfig:
        if self.model.path is None:
            raise ValueError(
                "model.path must be set: the policy to start from, an HF causal-LM directory "
                "(an SFT export) or an fmray run folder such as runs/sft-tiny"
            )
        workers = self.scaling.num_workers
        if self.rollout.prompts_per_step % workers:
            raise ValueError(
                f"rollout.prompts_per_step={self.rollout.prompts_per_step} must be a multiple of "
                f"scaling.num_workers={workers}"
            )
        per_update = self.train.micro_batch_size * self.train.grad_accum_steps
        if self.samples_per_worker % per_update:
            raise ValueError(
                f"each worker's {self.samples_per_worker} samples per step (rollout."
                "prompts_per_step / scaling.num_workers x rollout.samples_per_prompt) must be a "
                f"multiple of train.micro_batch_size x train.grad_accum_steps = {per_update}"
            )
        if self.lora is not None and self.reference is not None:
            raise ValueError(
                "reference cannot be set with lora: the reference is the base model with the "
                "adapters disabled"
            )
        return self

    @property
    def samples_per_worker(self) -> int:
        per_worker = self.rollout.prompts_per_step // self.scaling.num_workers
        return per_worker * self.rollout.samples_per_prompt

    def updates_per_step(self, epochs: int) -> int:
        """Optimizer steps per RL step."""
        per_update = self.train.micro_batch_size * self.train.grad_accum_steps
        return epochs * self.samples_per_worker // per_update


class RLPlan(RunPlan):
    """What an RL run's workers need: prompts, the chat format and the models."""

    prompts: str
    """JSON file of tokenized train and eval prompts (fmray.rl.prompts)."""
    num_train_prompts: int
    num_eval_prompts: int
    chat_template: str
    stop_token_ids: list[int]
    """Tokens that end a reply (rollouts stop there; exports carry them)."""
    reference_path: str | None = None
    """The KL reference (None: the base model, or the LoRA base)."""
    reward_model_path: str | None = None
    critic_path: str | None = None
    """PPO's critic initialisation (a reward model or the policy's backbone)."""


def optimizer_schedule(train: TrainSection, updates_per_step: int) -> TrainSection:
    """The LR schedule in optimizer steps: train's warmup and horizon (in RL steps) scaled by the
    optimizer steps each RL step makes."""
    decay = train.lr_decay_steps * updates_per_step if train.lr_decay_steps else None
    return train.model_copy(
        update={
            "max_steps": train.max_steps * updates_per_step,
            "warmup_steps": train.warmup_steps * updates_per_step,
            "lr_decay_steps": decay,
        }
    )


# ----------------------------------------------------------------------------- driver


def check_inputs(config: RLConfig, extra_models: dict[str, str | None]) -> None:
    """Fail before Ray starts: the model folders, the prompt files, the rule, checkpoint.resume."""
    from fmray.rl.rewards import load_rule
    from fmray.train.launch import check_chat_inputs, resolve_model_path

    check_chat_inputs(config)  # model.path, data.source / data.eval_source, checkpoint.resume
    models = {"reference": config.reference, "reward.model": config.reward.model, **extra_models}
    for key, path in models.items():
        if path is not None:
            resolve_model_path(path, key)
    if config.reward.rule is not None:
        try:
            load_rule(config.reward.rule)
        except ValueError as err:
            raise ConfigError(f"config error: {err}") from None


def prepare_rl_run(config: RLConfig, critic: str | None = None) -> RLPlan:
    """Driver-side work before the workers start: tokenizer + template, tokenized prompts in
    the run folder, staged models, the plan. A bad prompt raises naming its record."""
    from fmray import storage
    from fmray.data.chat_template import stop_token_ids
    from fmray.rl.prompts import load_prompt_splits, tokenize_prompts, write_prompts
    from fmray.train.launch import (
        check_resume,
        prepare_chat_tokenizer,
        resolve_model_path,
        run_dir_of,
        stage_model,
        write_run_config,
    )

    run_dir = run_dir_of(config)
    model_path = resolve_model_path(str(config.model.path))
    tokenizer, tokenizer_dir = prepare_chat_tokenizer(config.data.tokenizer, model_path, run_dir)
    try:
        train, held = load_prompt_splits(config.data, config.run.seed)
        train_prompts = tokenize_prompts(tokenizer, train, config.data.max_prompt_tokens)
        eval_prompts = tokenize_prompts(tokenizer, held, config.data.max_prompt_tokens)
    except ValueError as err:
        raise ConfigError(f"data error: {err}") from None
    if len(train_prompts) < config.rollout.prompts_per_step:
        raise ConfigError(
            f"config error: rollout.prompts_per_step={config.rollout.prompts_per_step} exceeds "
            f"the {len(train_prompts)} training prompts of data.source={config.data.source!r}"
        )
    prompts_file = storage.join(run_dir, PROMPTS_FILE)
    write_prompts(prompts_file, train_prompts, eval_prompts)
    write_run_config(config, run_dir)
    print(
        f"[fmray] data: {len(train_prompts)} train / {len(eval_prompts)} eval prompts "
        f"({prompts_file})"
    )

    def staged(path: str | None, key: str) -> str | None:
        return None if path is None else stage_model(resolve_model_path(path, key), run_dir)

    return RLPlan(
        run_dir=run_dir,
        tokenizer_dir=tokenizer_dir,
        model_path=stage_model(model_path, run_dir),
        resume_from=check_resume(config),
        prompts=prompts_file,
        num_train_prompts=len(train_prompts),
        num_eval_prompts=len(eval_prompts),
        chat_template=tokenizer.chat_template,
        stop_token_ids=stop_token_ids(tokenizer),
        reference_path=staged(config.reference, "reference"),
        reward_model_path=staged(config.reward.model, "reward.model"),
        critic_path=staged(critic, "critic"),
    )


def run_rl(
    config: RLConfig, train_loop: Any, critic: str | None = None, address: str | None = None
) -> Any:
    """The driver of `fmray ppo` / `fmray grpo`: check, prepare, fit, summary."""
    from fmray import storage
    from fmray.distributed.planner import check_memory
    from fmray.distributed.runtime import init_ray
    from fmray.train.launch import build_trainer, checkpoint_location, fit, print_summary

    check_inputs(config, {"critic": critic})
    check_memory(config)  # the planner: a run that will not fit stops before Ray starts
    plan = prepare_rl_run(config, critic)  # before Ray: a bad prompt fails here
    init_ray(
        address, config.scaling.num_workers * config.scaling.cpus_per_worker, config.logging.verbose
    )
    result = fit(config, lambda cfg: build_trainer(cfg, plan, train_loop))
    outputs = [("policy from", plan.model_path or "")]
    if result.checkpoint is not None:
        location = checkpoint_location(result.checkpoint)
        kind = "merged LoRA" if config.lora is not None else "full"
        outputs.append(
            ("HF export", f"{storage.join(location, 'hf')} ({kind} policy, chat template)")
        )
        if config.lora is not None:
            outputs.append(("adapter", f"{storage.join(location, 'adapter')} (peft)"))
    keys = ("step", "reward_mean", "kl", "val_reward", "val_exact_match")
    print_summary(plan.run_dir, result, outputs, keys)
    return result


# ----------------------------------------------------------------------------- worker


def build_policy(
    config: RLConfig, plan: RLPlan, ds_config: dict[str, Any], schedule: TrainSection, vocab: int
) -> tuple[Any, Any]:
    """The policy (a training engine, LoRA when configured) and the frozen KL reference (an
    inference-only engine; None with LoRA, whose reference is the policy with adapters off)."""
    from fmray.models.lora import apply_lora
    from fmray.models.registry import build_causal_lm
    from fmray.train.launch import local_dir_of
    from fmray.train.worker import build_frozen_engine, build_train_engine, zero3_construction

    assert plan.model_path is not None
    with zero3_construction(ds_config):
        model = build_causal_lm(None, str(local_dir_of(plan.model_path)), vocab)
    model.generation_config.eos_token_id = plan.stop_token_ids
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora is not None:
        model = apply_lora(model, config.lora)
    engine = build_train_engine(model, ds_config, schedule)
    if config.lora is not None:
        return engine, None
    with zero3_construction(ds_config):
        reference = build_causal_lm(
            None, str(local_dir_of(plan.reference_path or plan.model_path)), vocab
        )
    return engine, build_frozen_engine(reference, ds_config)


def build_rewards(config: RLConfig, plan: RLPlan, ds_config: dict[str, Any]) -> Rewards:
    from fmray.data.tokenizer import load_tokenizer
    from fmray.models.heads import build_reward_model
    from fmray.rl.rewards import RewardModelScorer, load_rule
    from fmray.train.launch import local_dir_of
    from fmray.train.worker import build_frozen_engine, zero3_construction

    scorer = None
    if plan.reward_model_path is not None:
        local = local_dir_of(plan.reward_model_path)
        tokenizer = load_tokenizer(local)
        with zero3_construction(ds_config):
            model = build_reward_model(str(local), int(tokenizer.pad_token_id))
        engine = build_frozen_engine(model, ds_config)
        scorer = RewardModelScorer(
            engine, tokenizer, config.reward.max_tokens, config.train.micro_batch_size
        )
    rule = load_rule(config.reward.rule) if config.reward.rule is not None else None
    return Rewards(config.reward, scorer, rule)


@dataclass
class Rewards:
    """The configured reward: weighted sum of the reward model's score and the rule's value."""

    section: RewardSection
    scorer: Any
    rule: Any

    def __call__(
        self, prompts: list[Prompt], completions: list[str], device: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from fmray.rl.rewards import rule_rewards

        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(completions))
        if self.scorer is not None:
            parts["reward_model"] = self.scorer.score(
                [p.messages for p in prompts], completions, device
            )
            total += self.section.model_weight * parts["reward_model"]
        if self.rule is not None:
            texts = [p.messages[-1]["content"] for p in prompts]
            parts["reward_rule"] = rule_rewards(
                self.rule, texts, completions, [p.reference for p in prompts]
            )
            total += self.section.rule_weight * parts["reward_rule"]
        return total, parts


def rank_prompts(
    prompts: list[Prompt], config: RLConfig, step: int, rank: int, world: int
) -> tuple[list[Prompt], list[int]]:
    """This rank's prompts of step `step`, and their slots among the step's prompts."""
    from fmray.rl.prompts import step_prompt_indices

    per_step = config.rollout.prompts_per_step
    indices = step_prompt_indices(step, per_step, len(prompts), config.run.seed)
    share = per_step // world
    slots = list(range(rank * share, (rank + 1) * share))
    return [prompts[indices[s]] for s in slots], slots


def sampling_params(config: RLConfig, step: int, slots: list[int], stops: list[int]) -> list[Any]:
    """One SamplingParams per sample (prompt-major): each its own seed from (run seed, step,
    slot, sample), so a resumed step samples exactly what the uninterrupted one did."""
    from fmray.generation.sampling import SamplingParams

    rollout, group = config.rollout, config.rollout.samples_per_prompt
    return [
        SamplingParams(
            max_tokens=rollout.max_new_tokens,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            seed=hash_seed(config.run.seed, step, slot * group + sample),
            stop_token_ids=tuple(stops),
        )
        for slot in slots
        for sample in range(group)
    ]


def hash_seed(*parts: int) -> int:
    value = 0x9E3779B9
    for part in parts:
        value = (value * 1_000_003 + part + 1) % (2**61 - 1)
    return value


def decode_replies(tokenizer: Any, replies: list[list[int]], stops: list[int]) -> list[str]:
    """Reply texts without their stop token or special tokens."""
    trimmed = [r[:-1] if r and r[-1] in stops else r for r in replies]
    return tokenizer.batch_decode(trimmed, skip_special_tokens=True)


@dataclass
class Rollout:
    """One rank's rollout of a step: samples, rewards and what producing them took."""

    samples: Any
    prompts: list[Prompt]
    """Prompt of each sample (repeated G times, prompt-major)."""
    completions: list[str]
    scores: torch.Tensor
    reward_parts: dict[str, torch.Tensor]
    generation_s: float
    scoring_s: float
    generated_tokens: int


def rollout(
    engine: Any,
    tokenizer: Any,
    rewards: Rewards,
    prompts: list[Prompt],
    params: list[Any],
    config: RLConfig,
    plan: RLPlan,
    device: Any,
) -> Rollout:
    """Generate every sample from the policy's current weights, then score the replies."""
    from fmray.rl.rollout import generate_replies, generation_module, pack_samples

    group = config.rollout.samples_per_prompt
    repeated = [p for p in prompts for _ in range(group)]
    start = time.perf_counter()
    with generation_module(engine, config.zero.stage) as module:
        replies = generate_replies(
            module, [p.ids for p in repeated], params, config.rollout.max_batch_size
        )
    generation_s = time.perf_counter() - start
    start = time.perf_counter()
    completions = decode_replies(tokenizer, replies, plan.stop_token_ids)
    scores, parts = rewards(repeated, completions, device)
    samples = pack_samples(
        [p.ids for p in repeated], replies, plan.stop_token_ids, tokenizer.pad_token_id, device
    )
    return Rollout(
        samples,
        repeated,
        completions,
        scores.to(device),
        parts,
        generation_s,
        time.perf_counter() - start,
        sum(len(r) for r in replies),
    )


def distributed_whiten(values: torch.Tensor, mask: torch.Tensor, device: Any) -> torch.Tensor:
    """(x - mean) / std over the masked elements of every rank (one statistic for the step)."""
    from fmray.train.worker import all_reduce_sums

    total, count = all_reduce_sums([(values * mask).sum(), mask.sum()], device)
    mean = total / max(count, 1.0)
    (squares,) = all_reduce_sums([(((values - mean) * mask) ** 2).sum()], device)
    return (values - mean) * torch.rsqrt(torch.tensor(squares / max(count, 1.0) + 1e-8)) * mask


def rollout_metrics(batch: Rollout, kl_sum: float, device: Any) -> dict[str, float]:
    """Reward mean/std (and each part's mean), reply length, KL per sample (`kl_sum` over this
    rank's samples) and the rollout's timing, over all ranks."""
    from fmray.train.worker import all_reduce_sums

    lengths = batch.samples.action_mask.sum(1)
    names = sorted(batch.reward_parts)
    values = [
        batch.scores.sum(),
        (batch.scores**2).sum(),
        float(len(batch.scores)),
        lengths.sum(),
        batch.samples.finished.float().sum(),
        kl_sum,
        float(batch.generated_tokens),
        *[batch.reward_parts[n].sum() for n in names],
    ]
    totals = all_reduce_sums([torch.as_tensor(v).double().cpu() for v in values], device)
    count = totals[2]
    mean = totals[0] / count
    metrics = {
        "reward_mean": mean,
        "reward_std": max(totals[1] / count - mean**2, 0.0) ** 0.5,
        "response_length": totals[3] / count,
        "finished_fraction": totals[4] / count,
        "kl": totals[5] / count,
        "timing/generation": batch.generation_s,
        "timing/scoring": batch.scoring_s,
        "generation_tokens_per_s": totals[6] / max(batch.generation_s, 1e-9),
    }
    for name, total in zip(names, totals[7:], strict=True):
        metrics[name] = total / count
    return metrics


@torch.no_grad()
def evaluate(
    step: int,
    engine: Any,
    tokenizer: Any,
    rewards: Rewards,
    share: list[Prompt],
    num_counted: int,
    config: RLConfig,
    plan: RLPlan,
    device: Any,
    is_chief: bool,
) -> dict[str, Any]:
    """Greedy replies to this rank's held-out prompts (fmray's generation engine): mean reward
    and exact match against the references, over all ranks, as step `step`'s record (just the
    step when eval.num_examples is 0); rank 0 prints them."""
    from fmray.eval.exact_match import is_exact_match
    from fmray.generation.sampling import SamplingParams
    from fmray.rl.rollout import generate_replies, generation_module
    from fmray.train.metrics import print_line
    from fmray.train.worker import all_reduce_sums

    metrics: dict[str, Any] = {"step": step}
    if not config.eval.num_examples:
        return metrics

    stops = plan.stop_token_ids
    params = [SamplingParams(config.eval.max_new_tokens, 0.0, stop_token_ids=tuple(stops))] * len(
        share
    )
    with generation_module(engine, config.zero.stage) as module:
        replies = generate_replies(module, [p.ids for p in share], params, config.eval.batch_size)
    completions = decode_replies(tokenizer, replies, stops)
    scores, _ = rewards(share, completions, device)
    counted = share[:num_counted]
    matches = [
        float(p.reference is not None and is_exact_match(c, p.reference))
        for p, c in zip(counted, completions, strict=False)
    ]
    with_reference = sum(p.reference is not None for p in counted)
    totals = all_reduce_sums(
        [scores[:num_counted].sum(), float(num_counted), sum(matches), float(with_reference)],
        device,
    )
    metrics["val_reward"] = totals[0] / max(totals[1], 1.0)
    if totals[3]:
        metrics["val_exact_match"] = totals[2] / totals[3]
    if is_chief and config.logging.progress:
        shown = " | ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != "step")
        print_line(f"eval step {step} | {shown}")
    return metrics

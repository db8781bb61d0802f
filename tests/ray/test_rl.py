"""GRPO and PPO on the local Ray cluster, from the session's SFT fit (`sft_run`): GRPO through
`fmray grpo` with the exact-match rule and PPO with the session's reward model summed with the
rule, both (ZeRO-2) from the fit's short, step-40 checkpoint, each raising the mean reward of
its rollouts and held-out exact match. With `make test-faults`: PPO (ZeRO-3) with a worker
SIGKILLed after a checkpoint, resumed and finished, and GRPO's restarted group against the
uninterrupted run."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from statistics import mean
from typing import Any

import pytest
import torch

from fmray.config import validate_config
from fmray.rl import ppo
from tests.ray.chat_models import SFT_EARLY_STEP
from tests.ray.test_pretrain import kill_a_worker_after

pytestmark = pytest.mark.ray

# Measured here (docs/align.md), three seeds of the GRPO test's run (60 steps on the training
# questions about people, from the SFT fit's step-40 checkpoint): the mean exact-match reward
# of its rollouts gains 0.32-0.38 from steps 1-10 to steps 51-60, and held-out exact match
# (all 67 held-out questions, facts neither SFT nor RL asked) rises from 2 to 7-10 questions.
# PPO from the same checkpoint and prompts (0.1 x the session's reward model + exact match,
# lambda 1, critic on the policy's backbone at critic_lr 5e-4, a constant lr), three seeds over
# the test's 40 steps: the reward gains 0.15-0.19 and its exact-match part 0.15-0.17 from steps
# 1-10 to 31-40; held-out exact match 2 -> 8 / 7 / 6 (60 steps: 6 / 5 / 6). With the reward
# model at weight 0.25 and above, the exact-match part does not rise and neither does held-out
# exact match (docs/align.md).
# PPO in the fault tier, from the finished SFT model on 16 fixed training prompts: the reward
# gains 0.21 from steps 1-4 to steps 5-8, the held-out mean reward of greedy replies
# 1.79 -> 2.04.
MIN_GRPO_REWARD_GAIN = 0.15
MIN_GRPO_HELDOUT_GAIN = 3  # questions of 67
PPO_REWARD_MODEL_WEIGHT = 0.1
MIN_PPO_REWARD_GAIN = 0.08
MIN_PPO_RULE_GAIN = 0.08
MIN_PPO_HELDOUT_GAIN = 2  # questions of 67
MIN_KILL_PPO_REWARD_GAIN = 0.08
MIN_KILL_PPO_HELDOUT_REWARD_GAIN = 0.05
MAX_KILL_HELDOUT_EXACT_MATCH_DROP = 0.1


def write_prompt_file(path: Path, examples: list[Any]) -> Path:
    path.write_text(
        "".join(json.dumps({"prompt": e.prompt, "reference": e.response}) + "\n" for e in examples)
    )
    return path


def write_prompts(out: Path, num_train: int, num_eval: int) -> tuple[Path, Path]:
    """The built-in task's first training and held-out questions, with their references."""
    from fmray.data.instructions import build_task

    task = build_task(0)
    return (
        write_prompt_file(out / "train.jsonl", task.train[:num_train]),
        write_prompt_file(out / "eval.jsonl", task.heldout[:num_eval]),
    )


def kill_once_registered(run_dir: Path, name: str, killed: list[int]) -> None:
    """SIGKILL a training worker once Ray Train has registered checkpoint `name` (listed in
    its snapshot), so the restarted group must resume from it."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 600
    while time.time() < deadline:
        if snapshot.exists() and name in snapshot.read_text():
            kill_a_worker_after(run_dir, killed)
            return
        time.sleep(0.05)


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def reward_gain(run: list[dict[str, Any]], window: int) -> float:
    return part_gain(run, "reward_mean", window)


def part_gain(run: list[dict[str, Any]], key: str, window: int) -> float:
    """Mean of `key` over the run's last `window` steps minus its mean over the first."""
    values = [r[key] for r in run if key in r]
    return mean(values[-window:]) - mean(values[:window])


def assert_ppo_metrics(run: list[dict[str, Any]], kl_target: float, samples_per_step: int) -> None:
    """PPO's own metrics are logged, and the adaptive KL coefficient follows Ziegler et al.'s
    update (horizon 10,000 samples) from each step to the next."""
    for key in ("value_loss", "value_clip_fraction", "kl_coef", "reward_model", "reward_rule"):
        assert key in run[-1]
    logged = [r for r in run if "kl_coef" in r]
    for before, after in zip(logged, logged[1:], strict=False):
        error = min(max(before["kl"] / kl_target - 1.0, -0.2), 0.2)
        expected = before["kl_coef"] * (1 + error * samples_per_step / 10000)
        assert after["kl_coef"] == pytest.approx(expected)


def greedy_exact_match(model_dir: Path, prompts_file: Path, max_new_tokens: int) -> float:
    """Stock transformers' generate on the export, outside Ray and fmray's engine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stops = model.generation_config.eos_token_id
    correct = 0
    lines = prompts_file.read_text().splitlines()
    for line in lines:
        record = json.loads(line)
        messages = [{"role": "user", "content": record["prompt"]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops
            )
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        correct += " ".join(answer.strip().lower().split()).rstrip(".") == (
            " ".join(record["reference"].strip().lower().split()).rstrip(".")
        )
    return correct / len(lines)


def test_grpo_cli_raises_the_rule_reward_and_heldout_exact_match(
    sft_run: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """GRPO after a short SFT, as DeepSeek-R1's cold start: the step-40 model answers a third of
    the training questions about people, and most of its misses are well-formed answers about
    the wrong person. Rewarded for exact answers to the training questions, the policy answers
    more held-out questions too (their facts are in the pretrained weights)."""
    from fmray.cli import main
    from fmray.data.instructions import build_task

    early = Path(sft_run.checkpoint.path).parent / f"checkpoint_{SFT_EARLY_STEP:08d}" / "hf"
    task = build_task(0)
    people = [e for e in task.train if ":" in e.key]  # arithmetic keys are the question
    train_file = write_prompt_file(tmp_path / "train.jsonl", people)
    eval_file = write_prompt_file(tmp_path / "eval.jsonl", task.heldout)
    main(
        [
            "grpo",
            "--config",
            "jobs/grpo/tiny.yaml",
            f"model.path={early}",
            f"run.output_dir={tmp_path}",
            f"data.source={train_file}",
            f"data.eval_source={eval_file}",
            "rollout.samples_per_prompt=8",
            "rollout.temperature=0.7",
            "train.max_steps=60",
            "train.lr=3.0e-4",
            "train.eval_every=60",
            "checkpoint.every_steps=60",
            "logging.tensorboard=false",
        ]
    )
    console = capfd.readouterr().out
    assert "[fmray] step 60/60 | reward" in console and "HF export" in console
    run = records(tmp_path / "grpo-tiny")
    start, final = run[0], run[-1]
    print(f"GRPO: start {start}, final {final}, reward gain {reward_gain(run, 10):.3f}")
    assert start["step"] == 0 and final["step"] == 60
    assert reward_gain(run, 10) >= MIN_GRPO_REWARD_GAIN
    num_heldout = len(task.heldout)
    start_right = round(start["val_exact_match"] * num_heldout)
    final_right = round(final["val_exact_match"] * num_heldout)
    assert final_right >= start_right + MIN_GRPO_HELDOUT_GAIN
    for key in ("kl", "kl_k3", "entropy", "clip_fraction", "response_length", "reward_std"):
        assert key in final
    for phase in ("generation", "scoring", "training"):
        assert final[f"timing/{phase}"] > 0
    assert final["generation_tokens_per_s"] > 0

    # The export is the trained policy: stock transformers' greedy answers score as the run did.
    export = tmp_path / "grpo-tiny" / "checkpoint_00000060" / "hf"
    assert greedy_exact_match(export, eval_file, 16) == pytest.approx(
        final["val_exact_match"], abs=1 / num_heldout
    )


def test_ppo_with_reward_model_raises_the_reward_and_heldout_exact_match(
    sft_run: Any, reward_run: Any, tmp_path: Path, record_property: Any
) -> None:
    """PPO from the same step-40 SFT checkpoint as GRPO, rewarded by the session's reward model
    (weight 0.1) plus the exact-match rule, with GAE lambda 1 and a critic on the policy's
    backbone: the rule's reward rises, and the policy answers more held-out questions."""
    from fmray.data.instructions import build_task

    early = Path(sft_run.checkpoint.path).parent / f"checkpoint_{SFT_EARLY_STEP:08d}" / "hf"
    reward_model = Path(reward_run.checkpoint.path).parent  # a run folder: its newest export
    task = build_task(0)
    people = [e for e in task.train if ":" in e.key]
    train_file = write_prompt_file(tmp_path / "train.jsonl", people)
    eval_file = write_prompt_file(tmp_path / "eval.jsonl", task.heldout)
    tree = {
        "run": {"name": "ppo", "output_dir": str(tmp_path)},
        "model": {"path": str(early)},
        "data": {"source": str(train_file), "eval_source": str(eval_file)},
        "rollout": {
            "prompts_per_step": 16,
            "samples_per_prompt": 8,
            "max_new_tokens": 16,
            "temperature": 0.7,
        },
        "reward": {
            "model": str(reward_model),
            "rule": "fmray.rl.rewards:exact_match",
            "model_weight": PPO_REWARD_MODEL_WEIGHT,
        },
        "ppo": {
            "epochs": 1,
            "lam": 1.0,
            "kl_target": 0.5,
            "critic": str(early),  # the policy's backbone with a fresh value head
            "critic_lr": 5e-4,
        },
        "train": {"max_steps": 40, "micro_batch_size": 16, "lr": 3e-4, "eval_every": 20},
        "eval": {"num_examples": len(task.heldout)},
        "zero": {"stage": 2},
        "checkpoint": {"every_steps": 40},
        "scaling": {"num_workers": 2},
        "logging": {"tensorboard": False},
    }
    result = ppo.run(validate_config(ppo.PPOConfig, tree))
    assert result.error is None and result.metrics["step"] == 40
    run = records(tmp_path / "ppo")
    start, final = run[0], run[-1]
    rule_gain = part_gain(run, "reward_rule", 10)
    print(f"PPO: start {start}, final {final}, reward gain {reward_gain(run, 10):.3f}")
    assert [r["step"] for r in run if "reward_mean" in r] == list(range(1, 41))
    assert reward_gain(run, 10) >= MIN_PPO_REWARD_GAIN
    assert rule_gain >= MIN_PPO_RULE_GAIN
    num_heldout = len(task.heldout)
    start_right = round(start["val_exact_match"] * num_heldout)
    final_right = round(final["val_exact_match"] * num_heldout)
    assert final_right >= start_right + MIN_PPO_HELDOUT_GAIN
    assert_ppo_metrics(run, kl_target=0.5, samples_per_step=128)
    meta = json.loads((Path(result.checkpoint.path) / "fmray.json").read_text())
    assert meta["modules"] == ["model", "critic"]
    record_property(
        "ppo_heldout",
        f"held-out exact match {start_right} -> {final_right} of {num_heldout}, "
        f"rule reward gain {rule_gain:.3f}",
    )


@pytest.mark.faults  # a fit and a restart: `make test-faults`
def test_ppo_with_reward_model_zero3_survives_a_killed_worker(
    sft_run: Any, reward_run: Any, tmp_path: Path, record_property: Any
) -> None:
    """PPO (ZeRO-3) from the finished SFT model on 16 fixed training prompts, a worker SIGKILLed
    once checkpoint 4 is registered: the restarted group resumes from it and finishes."""
    sft_model = Path(sft_run.checkpoint.path) / "hf"
    reward_model = Path(reward_run.checkpoint.path).parent  # a run folder: its newest export
    train_file, eval_file = write_prompts(tmp_path, 16, 32)
    tree = {
        "run": {"name": "ppo", "output_dir": str(tmp_path)},
        "model": {"path": str(sft_model)},
        "data": {"source": str(train_file), "eval_source": str(eval_file)},
        "rollout": {"prompts_per_step": 16, "samples_per_prompt": 2, "max_new_tokens": 16},
        "reward": {"model": str(reward_model), "rule": "fmray.rl.rewards:exact_match"},
        "ppo": {"epochs": 2, "kl_target": 0.5},
        "train": {"max_steps": 8, "micro_batch_size": 8, "lr": 1e-4, "eval_every": 8},
        "eval": {"num_examples": 32},
        "zero": {"stage": 3},
        "checkpoint": {"every_steps": 4},
        "scaling": {"num_workers": 2, "max_failures": 1},
        "logging": {"tensorboard": False},
    }
    killed: list[int] = []
    killer = threading.Thread(
        target=kill_once_registered, args=(tmp_path / "ppo", "checkpoint_00000004", killed)
    )
    killer.start()
    result = ppo.run(validate_config(ppo.PPOConfig, tree))
    killer.join()
    assert killed, "no training worker was found to kill"
    assert result.error is None and result.metrics["step"] == 8
    run = records(tmp_path / "ppo")
    start, final = run[0], run[-1]
    print(f"PPO: start {start}, final {final}, reward gain {reward_gain(run, 4):.3f}")
    steps = [r["step"] for r in run if "reward_mean" in r]
    assert steps == list(range(1, 9))  # the resumed group replayed nothing twice, lost nothing
    assert reward_gain(run, 4) >= MIN_KILL_PPO_REWARD_GAIN
    assert final["val_reward"] >= start["val_reward"] + MIN_KILL_PPO_HELDOUT_REWARD_GAIN
    assert final["val_exact_match"] >= start["val_exact_match"] - MAX_KILL_HELDOUT_EXACT_MATCH_DROP
    # The KL coefficient's updates hold across the restart too (it travels in the checkpoint).
    assert_ppo_metrics(run, kl_target=0.5, samples_per_step=32)
    checkpoint = Path(result.checkpoint.path)
    meta = json.loads((checkpoint / "fmray.json").read_text())
    assert meta["modules"] == ["model", "critic"] and meta["resumed_from_step"] == 4
    record_property("ppo_kill", "1 worker kill (ZeRO-3), resumed from step 4, steps 1-8 once")


@pytest.mark.faults  # two fits: `make test-faults`
def test_grpo_killed_worker_group_resumes_as_the_uninterrupted_run(
    sft_run: Any, tmp_path: Path, record_property: Any
) -> None:
    """GRPO (ZeRO-2) loses a worker right after its step-4 checkpoint; the restarted group
    resumes from it and ends with the uninterrupted run's rewards, losses and policy."""
    from safetensors.torch import load_file

    from fmray.rl import grpo

    sft_model = Path(sft_run.checkpoint.path) / "hf"
    train_file, eval_file = write_prompts(tmp_path, 16, 16)

    def config(name: str) -> grpo.GRPOConfig:
        tree = {
            "run": {"name": name, "output_dir": str(tmp_path)},
            "model": {"path": str(sft_model)},
            "data": {"source": str(train_file), "eval_source": str(eval_file)},
            "rollout": {"prompts_per_step": 8, "samples_per_prompt": 4, "max_new_tokens": 12},
            "reward": {"rule": "fmray.rl.rewards:exact_match"},
            "train": {"max_steps": 8, "micro_batch_size": 16, "lr": 2e-4, "eval_every": 8},
            "eval": {"num_examples": 16},
            "checkpoint": {"every_steps": 4},
            "scaling": {"num_workers": 2, "max_failures": 1},
            "logging": {"tensorboard": False},
        }
        return validate_config(grpo.GRPOConfig, tree)

    reference = grpo.run(config("whole"))
    killed: list[int] = []
    killer = threading.Thread(
        target=kill_once_registered, args=(tmp_path / "killed", "checkpoint_00000004", killed)
    )
    killer.start()
    result = grpo.run(config("killed"))
    killer.join()
    assert killed, "no training worker was found to kill"
    assert result.error is None and result.metrics["step"] == 8
    meta = json.loads((Path(result.checkpoint.path) / "fmray.json").read_text())
    assert meta["resumed_from_step"] == 4

    whole, resumed = records(tmp_path / "whole"), records(tmp_path / "killed")
    assert [r["step"] for r in resumed] == [r["step"] for r in whole]  # nothing lost or doubled
    for before, after in zip(whole, resumed, strict=True):
        for key in ("reward_mean", "loss", "kl", "val_exact_match"):
            if key in before:
                assert after[key] == pytest.approx(before[key], abs=1e-6), (before["step"], key)
    expected = load_file(str(Path(reference.checkpoint.path) / "hf" / "model.safetensors"))
    got = load_file(str(Path(result.checkpoint.path) / "hf" / "model.safetensors"))
    diff = max((expected[k] - got[k]).abs().max().item() for k in expected)
    record_property("grpo_kill", f"1 worker kill, resumed from step 4, max weight diff {diff:.1e}")
    assert diff <= 1e-6

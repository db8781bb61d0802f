"""RL's pieces between the losses and a Ray run: prompts, rollouts, scoring, rewards, configs.

python -m pytest -q tests/unit/test_rl_rollout.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fmray.config import ConfigError
from fmray.distributed.deepspeed_setup import build_ds_config
from fmray.generation.sampling import SamplingParams
from fmray.rl.common import decode_replies, hash_seed, optimizer_schedule
from fmray.rl.grpo import GRPOConfig
from fmray.rl.prompts import (
    PromptDataSection,
    load_prompt_splits,
    record_to_prompt,
    step_prompt_indices,
    tokenize_prompts,
)
from fmray.rl.rewards import RewardModelScorer, exact_match, load_rule
from fmray.rl.rollout import (
    ValueModel,
    action_logits,
    action_logps,
    action_values,
    generate_replies,
    generation_module,
    pack_samples,
)

PROMPTS = ["Where does Alice live?", "What is 3 plus 4?", "How old is Bob?"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from fmray.data.chat_template import chat_template_of
    from fmray.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    tok.chat_template = chat_template_of(tok)
    return tok


@pytest.fixture(scope="module")
def prompt_ids(tokenizer: Any) -> list[list[int]]:
    prompts = [("test", [{"role": "user", "content": p}], None) for p in PROMPTS]
    return [p.ids for p in tokenize_prompts(tokenizer, prompts, 64)]


def test_samples_score_the_reply_tokens_of_each_row(tiny_model_dir: Path, prompt_ids) -> None:
    """Left-padded prompts and right-padded replies give each reply token the log-prob the model
    gives it when the row runs alone and unpadded."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    replies = [[5, 6, 7, 8], [9], [10, 11]]
    samples = pack_samples(prompt_ids, replies, [8], 0, torch.device("cpu"))
    assert samples.finished.tolist() == [True, False, False]
    assert samples.action_mask.sum(1).tolist() == [4.0, 1.0, 2.0]
    with torch.no_grad():
        logps = action_logps(action_logits(model, samples), samples)
        for row, (prompt, reply) in enumerate(zip(prompt_ids, replies, strict=True)):
            ids = torch.tensor([prompt + reply])
            alone = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 : -1], -1)
            expected = alone.gather(1, torch.tensor(reply)[:, None]).squeeze(1)
            torch.testing.assert_close(logps[row, : len(reply)], expected, atol=1e-5, rtol=1e-5)
            assert logps[row, len(reply) :].abs().sum() == 0


def test_critic_values_are_the_reward_models_head_at_every_position(
    tiny_model_dir: Path, prompt_ids
) -> None:
    torch.manual_seed(0)
    scorer = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=1, pad_token_id=0
    ).eval()
    critic = ValueModel(scorer).eval()
    replies = [[5, 6, 7], [9, 10, 11]]
    samples = pack_samples(prompt_ids[:2], replies, [], 0, torch.device("cpu"))
    with torch.no_grad():
        values = action_values(critic, samples)
        for row, (prompt, reply) in enumerate(zip(prompt_ids, replies, strict=False)):
            # the value before the last reply token = the reward model's score of the row up to
            # the token before it
            ids = torch.tensor([prompt + reply[:-1]])
            pooled = scorer(input_ids=ids).logits[0, 0]
            torch.testing.assert_close(values[row, len(reply) - 1], pooled, atol=1e-5, rtol=1e-5)


def test_rollouts_under_zero3_gather_once_and_match_the_plain_model(
    single_process_group, tiny_model_dir: Path, prompt_ids
) -> None:
    """The policy under ZeRO-3 generates what the plain model generates; its forward hooks are
    back afterwards (a training step still works)."""
    from fmray.config import TrainSection, ZeroSection
    from fmray.train.worker import build_train_engine, zero3_construction

    train = TrainSection(micro_batch_size=3, lr=1e-3)
    ds_config = build_ds_config(train, ZeroSection(stage=3), 1, False)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with zero3_construction(ds_config):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    engine = build_train_engine(model, ds_config, train)
    params = [SamplingParams(6, 1.0, seed=s) for s in (1, 2, 3)]
    expected = generate_replies(plain, prompt_ids, params, 2)
    with generation_module(engine, 3) as module:
        assert all(p.numel() > 0 for p in module.parameters())
        replies = generate_replies(module, prompt_ids, params, 2)
    assert replies == expected
    samples = pack_samples(prompt_ids, replies, [], 0, torch.device("cpu"))
    loss = -action_logps(action_logits(engine, samples), samples).sum()
    engine.backward(loss)
    engine.step()
    with generation_module(engine, 3) as module:
        moved = generate_replies(module, prompt_ids, [SamplingParams(6, 0.0)] * 3, 3)
    assert len(moved) == 3


def test_prompt_records_and_errors(tmp_path: Path, tokenizer: Any) -> None:
    assert record_to_prompt({"prompt": "Hi?", "reference": "Hello."}, "x") == (
        [{"role": "user", "content": "Hi?"}],
        "Hello.",
    )
    messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    assert record_to_prompt({"messages": messages}, "x") == (messages[:1], "A.")
    assert record_to_prompt({"prompt": "Q?"}, "x")[1] is None
    with pytest.raises(ValueError, match="f.jsonl:3: needs a 'prompt' or a 'messages' field"):
        record_to_prompt({"question": "Q?"}, "f.jsonl:3")
    source = tmp_path / "prompts.jsonl"
    source.write_text(
        "\n".join(json.dumps({"prompt": f"Question {i}?", "answer": str(i)}) for i in range(40))
    )
    train, held = load_prompt_splits(PromptDataSection(source=str(source), val_fraction=0.2), 0)
    assert len(train) + len(held) == 40 and held
    long = [("f.jsonl:7", [{"role": "user", "content": "word " * 80}], None)]
    with pytest.raises(ValueError, match=r"f.jsonl:7: .* over data.max_prompt_tokens=64"):
        tokenize_prompts(tokenizer, long, 64)
    builtin_train, builtin_held = load_prompt_splits(PromptDataSection(), 0)
    assert all(reference for _, _, reference in builtin_train + builtin_held)


def test_step_prompts_cover_each_epoch_and_replay_after_resume() -> None:
    steps = [step_prompt_indices(step, 4, 10, seed=0) for step in range(5)]
    assert sorted(steps[0] + steps[1] + steps[2][:2]) == list(range(10))
    assert step_prompt_indices(3, 4, 10, seed=0) == steps[3]
    assert step_prompt_indices(0, 4, 10, seed=1) != steps[0]
    assert hash_seed(0, 3, 1) == hash_seed(0, 3, 1) != hash_seed(0, 3, 2)


def test_rewards(tiny_model_dir: Path, tokenizer: Any) -> None:
    assert exact_match(
        ["q"] * 3, ["Alice lives in Paris", "no", "x"], ["Alice lives in Paris.", "yes", None]
    ) == [1.0, 0.0, 0.0]
    assert load_rule("fmray.rl.rewards:exact_match") is exact_match
    for spec, message in (
        ("exact_match", "expected 'module:function'"),
        ("no_such_module_x:f", "cannot import 'no_such_module_x'"),
        ("fmray.rl.rewards:nope", "has no function 'nope'"),
    ):
        with pytest.raises(ValueError, match=message):
            load_rule(spec)
    # the scorer reads the reward model exactly as stock transformers scores a conversation
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=1, pad_token_id=tokenizer.pad_token_id
    ).eval()
    scorer = RewardModelScorer(model, tokenizer, max_tokens=256, batch_size=2)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    replies = ["Alice lives in Paris.", "3 plus 4 is 7.", "Bob"]
    scores = scorer.score(conversations, replies, torch.device("cpu"))
    for conversation, reply, score in zip(conversations, replies, scores, strict=True):
        full = [*conversation, {"role": "assistant", "content": reply}]
        text = tokenizer.apply_chat_template(full, tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            torch.testing.assert_close(
                score, model(input_ids=ids).logits[0, 0], atol=1e-5, rtol=1e-5
            )


def test_replies_decode_without_their_stop_token(tokenizer: Any) -> None:
    ids = tokenizer("Alice lives in Paris.", add_special_tokens=False)["input_ids"]
    stop = tokenizer.eos_token_id
    assert decode_replies(tokenizer, [ids + [stop], ids], [stop]) == ["Alice lives in Paris."] * 2


def test_config_errors_name_their_keys() -> None:
    base = {"model": {"path": "m"}}
    with pytest.raises(ValueError, match="model.path must be set"):
        GRPOConfig()
    with pytest.raises(
        ValueError, match=r"rollout.prompts_per_step=15 must be a multiple of scaling.num_workers=2"
    ):
        GRPOConfig(**base, rollout={"prompts_per_step": 15})
    with pytest.raises(ValueError, match="must be a multiple of train.micro_batch_size"):
        GRPOConfig(**base, train={"micro_batch_size": 5})
    with pytest.raises(ValueError, match="reward needs reward.model"):
        GRPOConfig(**base, reward={"rule": None})
    with pytest.raises(ValueError, match="reference cannot be set with lora"):
        GRPOConfig(**base, lora={"r": 4}, reference="m")
    config = GRPOConfig(**base, train={"micro_batch_size": 8, "max_steps": 10, "warmup_steps": 2})
    assert config.samples_per_worker == 32 and config.updates_per_step(2) == 8
    schedule = optimizer_schedule(config.train, 8)
    assert (schedule.max_steps, schedule.warmup_steps) == (80, 16)


def test_cli_refuses_bad_inputs_before_ray(tmp_path: Path, tiny_model_dir: Path) -> None:
    from fmray.rl.common import check_inputs

    config = GRPOConfig(model={"path": str(tiny_model_dir)}, reward={"rule": "nope:f"})
    with pytest.raises(ConfigError, match=r"reward.rule='nope:f': cannot import"):
        check_inputs(config, {})
    config = GRPOConfig(model={"path": str(tiny_model_dir)}, reward={"model": str(tmp_path)})
    with pytest.raises(ConfigError, match="reward.model="):
        check_inputs(config, {})


def test_lora_policy_trains_adapters_and_its_reference_is_the_base(
    single_process_group, tiny_model_dir: Path, tmp_path: Path, prompt_ids, tokenizer
) -> None:
    """With lora.*, the recipes' policy is the base with adapters and no second model is built:
    adapters off, it scores as the plain base model, before and after an update."""
    from fmray.rl.common import RLPlan, build_policy

    config = GRPOConfig(
        model={"path": str(tiny_model_dir)},
        lora={"r": 4},
        train={"micro_batch_size": 3, "lr": 1e-2},
        rollout={"prompts_per_step": 3, "samples_per_prompt": 1},
        scaling={"num_workers": 1},
    )
    plan = RLPlan(
        run_dir=str(tmp_path),
        tokenizer_dir=str(tiny_model_dir),
        model_path=str(tiny_model_dir),
        prompts=str(tmp_path / "prompts.json"),
        num_train_prompts=3,
        num_eval_prompts=3,
        chat_template=tokenizer.chat_template,
        stop_token_ids=[tokenizer.eos_token_id],
    )
    schedule = optimizer_schedule(config.train, 1)
    ds_config = build_ds_config(schedule, config.zero, 1, False)
    engine, reference = build_policy(config, plan, ds_config, schedule, len(tokenizer))
    assert reference is None
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    samples = pack_samples(prompt_ids, [[5, 6, 7], [8, 9], [10]], [], 0, torch.device("cpu"))
    with torch.no_grad():
        expected = action_logps(action_logits(base, samples), samples)
    loss = -action_logps(action_logits(engine, samples), samples).sum()
    engine.backward(loss)
    engine.step()
    with torch.no_grad():
        with engine.module.disable_adapter():
            off = action_logps(action_logits(engine.module, samples), samples)
        on = action_logps(action_logits(engine.module, samples), samples)
    torch.testing.assert_close(off, expected, atol=1e-5, rtol=1e-5)
    assert (on - expected).abs().max() > 1e-3  # the adapters learned
    trainable = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_presets_validate() -> None:
    from fmray.config import load_config
    from fmray.rl.ppo import PPOConfig

    root = Path(__file__).resolve().parents[2] / "jobs"
    for config_class, folder in ((GRPOConfig, "grpo"), (PPOConfig, "ppo")):
        paths = sorted((root / folder).glob("*.yaml"))
        assert len(paths) == 2
        for path in paths:
            load_config(config_class, path, [])

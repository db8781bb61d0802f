"""Preference losses against their closed forms, preference records and the built-in pairs,
and the reward / DPO configs (no Ray)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fmray.config import ConfigError, load_config, validate_config
from fmray.data.preference_data import (
    PAIR_COLUMNS,
    PreferenceDataSection,
    build_preference_data,
    load_pair_splits,
    record_to_pair,
    tokenize_pair,
)
from fmray.data.preferences import build_pairs
from fmray.train.losses import bradley_terry_loss, dpo_loss, sequence_logps

REPO = Path(__file__).resolve().parents[2]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ----------------------------------------------------------------------------- losses


def test_bradley_terry_is_minus_log_sigmoid_of_the_score_gap() -> None:
    chosen, rejected = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 0.5])
    expected = [-log_sigmoid(1.0), -log_sigmoid(-2.0), math.log(2.0)]
    assert bradley_terry_loss(chosen, rejected).tolist() == pytest.approx(expected, rel=1e-6)


POLICY_C, POLICY_R = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
REF_C, REF_R = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
# h = (pi_c - ref_c) - (pi_r - ref_r): pair 0: 1 - (-1) = 2; pair 1: 1 - 2 = -1
H = [2.0, -1.0]


def test_dpo_sigmoid_and_rewards() -> None:
    terms = dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta=0.5)
    assert terms.losses.tolist() == pytest.approx([-log_sigmoid(0.5 * h) for h in H], rel=1e-6)
    assert terms.chosen_rewards.tolist() == pytest.approx([0.5, 0.5])
    assert terms.rejected_rewards.tolist() == pytest.approx([-0.5, 1.0])


def test_cdpo_label_smoothing_mixes_both_directions() -> None:
    eps, beta = 0.2, 0.5
    terms = dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta, "sigmoid", eps)
    expected = [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in H]
    assert terms.losses.tolist() == pytest.approx(expected, rel=1e-6)


def test_ipo_is_squared_distance_to_half_inverse_beta() -> None:
    beta = 0.25
    terms = dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta, "ipo")
    assert terms.losses.tolist() == pytest.approx([(h - 1 / (2 * beta)) ** 2 for h in H])


def test_sequence_logps_sum_only_labelled_next_tokens() -> None:
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, 3, 1, -100], [-100, -100, 2, 4]])
    logps, counts = sequence_logps(logits, labels)
    table = logits.log_softmax(-1)
    expected = [table[0, 0, 3] + table[0, 1, 1], table[1, 1, 2] + table[1, 2, 4]]
    assert logps.tolist() == pytest.approx([float(x) for x in expected], rel=1e-5)
    assert counts.tolist() == [2, 2]


# ----------------------------------------------------------------------------- records


@pytest.mark.parametrize(
    ("record", "prompt"),
    [
        ({"prompt": "Hi?", "chosen": "Yes.", "rejected": "No."}, [("user", "Hi?")]),
        (
            {
                "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                "chosen": [{"role": "assistant", "content": "Yes."}],
                "rejected": "No.",
            },
            [("system", "S"), ("user", "Q")],
        ),
        (
            {
                "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Y"}],
                "rejected": [
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "N"},
                ],
            },
            [("user", "Q")],
        ),
    ],
)
def test_trl_and_openrlhf_records(record: dict, prompt: list[tuple[str, str]]) -> None:
    pair = record_to_pair(record, "f.jsonl:1")
    assert [(m["role"], m["content"]) for m in pair.prompt] == prompt
    assert pair.chosen and pair.rejected and pair.chosen != pair.rejected


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "Q", "chosen": "A"}, "f.jsonl:7: missing field 'rejected'"),
        ({"prompt": "Q", "chosen": " ", "rejected": "B"}, "f.jsonl:7: field 'chosen' is an empty"),
        ({"chosen": "A", "rejected": "B"}, "f.jsonl:7: missing field 'prompt'"),
        ({"prompt": 3, "chosen": "A", "rejected": "B"}, "f.jsonl:7: field 'prompt' must be"),
    ],
)
def test_bad_records_name_the_record_and_field(record: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        record_to_pair(record, "f.jsonl:7")


def test_prompt_longer_than_the_row_names_the_record(tiny_tokenizer_dir: Path) -> None:
    from fmray.data.chat_template import DEFAULT_CHAT_TEMPLATE
    from fmray.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    pair = record_to_pair({"prompt": "Alice " * 40, "chosen": "A.", "rejected": "B."}, "p.jsonl:2")
    with pytest.raises(ValueError, match="p.jsonl:2: field 'prompt' takes .* data.seq_len=32"):
        tokenize_pair(tokenizer, pair, DEFAULT_CHAT_TEMPLATE, 32)
    short = record_to_pair({"prompt": "Q?", "chosen": "Alice " * 40, "rejected": "B."}, "p:3")
    columns, truncated = tokenize_pair(tokenizer, short, DEFAULT_CHAT_TEMPLATE, 32)
    assert truncated and all(len(columns[name]) == 32 for name in PAIR_COLUMNS)
    # Labels cover the reply only: the rejected reply's tokens, then padding.
    labels = columns["rejected_labels"]
    reply = [t for t in labels if t != -100]
    assert tokenizer.decode(reply[:-1]).strip() == "B." and reply[
        -1
    ] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_builtin_pairs_prefer_the_truth_and_split_by_fact() -> None:
    from fmray.data.instructions import build_task

    train, heldout = build_pairs()
    task = build_task()
    assert len(train) == 2 * len(task.train) and len(heldout) == 2 * len(task.heldout)
    truth = {e.prompt: e.response for e in task.train + task.heldout}
    for pair in train + heldout:
        assert pair.chosen == truth[pair.prompt] and pair.rejected != pair.chosen
    assert {p.kind for p in heldout} == {"wrong_fact", "malformed"}
    # A wrong fact is a well-formed sentence of the same shape: same length in words.
    wrong = [p for p in train if p.kind == "wrong_fact"]
    assert all(len(p.rejected.split()) == len(p.chosen.split()) for p in wrong)
    held_prompts = {p.prompt for p in heldout}
    assert not held_prompts & {p.prompt for p in train}
    assert build_pairs() == (train, heldout)  # deterministic


def test_file_source_rows_and_cache(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    from fmray.data.chat_template import DEFAULT_CHAT_TEMPLATE

    source = tmp_path / "prefs.jsonl"
    records = [
        {"prompt": f"What is {i} plus 1?", "chosen": f"{i} plus 1 is {i + 1}.", "rejected": "no"}
        for i in range(60)
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = PreferenceDataSection(source=str(source), seq_len=48, val_fraction=0.2)
    train, held = load_pair_splits(data, seed=0)
    assert len(train) + len(held) == 60 and held
    built = build_preference_data(
        data, 0, str(tiny_tokenizer_dir), DEFAULT_CHAT_TEMPLATE, str(tmp_path / "cache")
    )
    assert (built.num_train_rows, built.num_eval_rows) == (len(train), len(held))
    assert built.eval_conversations[0][-1]["role"] == "assistant"
    again = build_preference_data(
        data, 0, str(tiny_tokenizer_dir), DEFAULT_CHAT_TEMPLATE, str(tmp_path / "cache")
    )
    assert again == built

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records[0]) + "\n" + json.dumps({"prompt": "Q", "chosen": "A"}))
    with pytest.raises(ValueError, match="bad.jsonl:2: missing field 'rejected'"):
        load_pair_splits(PreferenceDataSection(source=str(bad)), seed=0)


# ----------------------------------------------------------------------------- configs


def test_presets_validate_and_dpo_rules() -> None:
    from fmray.train.dpo import DPOConfig
    from fmray.train.reward import RewardConfig

    for path in sorted((REPO / "jobs" / "reward").glob("*.yaml")):
        load_config(RewardConfig, path, [])
    for path in sorted((REPO / "jobs" / "dpo").glob("*.yaml")):
        load_config(DPOConfig, path, [])
    with pytest.raises(ConfigError, match="dpo.label_smoothing applies to dpo.loss=sigmoid"):
        validate_config(
            DPOConfig, {"model": {"path": "m"}, "dpo": {"loss": "ipo", "label_smoothing": 0.1}}
        )
    with pytest.raises(ConfigError, match="dpo.reference cannot be set with lora"):
        validate_config(DPOConfig, {"model": {"path": "m"}, "lora": {}, "dpo": {"reference": "r"}})
    with pytest.raises(ConfigError, match="model.path must be set for reward"):
        validate_config(RewardConfig, {})


def test_tune_searches_dpo_and_reward_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    from fmray.tune.search import TuneConfig, resolve_base

    monkeypatch.chdir(REPO)  # the preset names its base relative to the repository

    config = load_config(TuneConfig, REPO / "jobs" / "tune" / "dpo_tiny.yaml", [])
    assert config.recipe == "dpo" and config.metric == "val_margin"
    base = resolve_base(config)
    assert base["train"]["max_steps"] == 60 and base["dpo"]["beta"] == 0.1
    reward = validate_config(
        TuneConfig,
        {
            "recipe": "reward",
            "base": str(REPO / "jobs" / "reward" / "tiny.yaml"),
            "search_space": {"train.lr": "loguniform(1e-4, 1e-3)"},
            "metric": "val_accuracy",
            "mode": "max",
        },
    )
    assert resolve_base(reward)["data"]["seq_len"] == 64
    with pytest.raises(ConfigError, match="val_exact_match"):
        validate_config(TuneConfig, {"recipe": "reward", "metric": "val_exact_match"})


@pytest.mark.parametrize("recipe", ["reward", "dpo"])
def test_bad_records_stop_the_cli_before_ray_starts(
    recipe: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fmray.cli import main
    from fmray.distributed import runtime

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started for a run whose data is bad")

    monkeypatch.setattr(runtime, "init_ray", no_ray)

    bad = tmp_path / "prefs.jsonl"
    good = {"prompt": "What is 1 plus 1?", "chosen": "1 plus 1 is 2.", "rejected": "1 plus 1 is 3."}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": ""}) + "\n")
    args = [f"model.path={tiny_model_dir}", f"data.source={bad}", f"run.output_dir={tmp_path}"]
    with pytest.raises(SystemExit) as exit_info:
        main([recipe, "--config", str(REPO / "jobs" / recipe / "tiny.yaml"), *args])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error == f"data error: {bad}:2: field 'chosen' is an empty reply"


# ----------------------------------------------------------------- precomputed reference


class FakeShard:
    """A rank's dataset shard: `iter_batches` over its rows in order, as Ray Data gives them."""

    def __init__(self, rows: dict[str, np.ndarray]) -> None:
        self.rows = rows

    def iter_batches(self, batch_size: int, batch_format: str):
        assert batch_format == "numpy"
        for start in range(0, len(self.rows["index"]), batch_size):
            yield {name: values[start : start + batch_size] for name, values in self.rows.items()}


@pytest.mark.parametrize("rank,world,start_step", [(0, 1, 0), (1, 2, 3)])
def test_precomputed_reference_scores_each_row_once_and_equals_the_in_run_reference(
    rank: int, world: int, start_step: int
) -> None:
    """`dpo.precompute_reference`: one pass over the rank's epoch (from a resumed step too)
    scores every pair it reads by row index, leaves the batch iterator where it was, and the
    DPO losses of the following steps equal those with the reference model kept."""
    from fmray.data.pipeline import iter_train_batches, rank_block_indices
    from fmray.models.registry import build_causal_lm
    from fmray.train.dpo import (
        policy_logps,
        precompute_reference,
        reference_logps,
        stored_reference,
    )

    micro, accum, seq_len, num_rows = 2, 2, 12, 20
    global_batch = micro * accum * world
    steps_per_epoch = num_rows // global_batch
    generator = torch.Generator().manual_seed(rank)
    mine = list(rank_block_indices(rank, world, micro, 0, steps_per_epoch * global_batch))
    rows: dict[str, np.ndarray] = {"index": np.array(mine)}
    for side in ("chosen", "rejected"):
        ids = torch.randint(3, 64, (len(mine), seq_len), generator=generator)
        labels = ids.clone()
        labels[:, :5] = -100  # the prompt
        rows[f"{side}_input_ids"], rows[f"{side}_labels"] = ids.numpy(), labels.numpy()
    torch.manual_seed(0)
    policy = build_causal_lm("tiny", None, 64).eval()
    torch.manual_seed(1)
    reference = build_causal_lm("tiny", None, 64).eval()
    columns = (*PAIR_COLUMNS, "index")

    def batches():
        shard = FakeShard(rows)
        return iter_train_batches(
            shard, rank, world, micro, start_step, global_batch, num_rows, seq_len, columns
        )

    cpu = torch.device("cpu")
    with_precompute = batches()
    scores = precompute_reference(
        None, reference, with_precompute, steps_per_epoch * accum, cpu, False
    )
    assert sorted(scores) == mine  # each of this rank's rows once
    kept = batches()
    for _ in range(steps_per_epoch * accum + 3):  # past the epoch's end: it cycles
        expected_rows, got_rows = next(kept), next(with_precompute)
        np.testing.assert_array_equal(got_rows["index"], expected_rows["index"])
        in_run = reference_logps(None, reference, expected_rows, cpu, False)
        stored = stored_reference(scores, got_rows, cpu)
        torch.testing.assert_close(stored, in_run, rtol=0, atol=1e-6)
        with torch.no_grad():
            scored = policy_logps(policy, got_rows, cpu, False)
        losses = [
            dpo_loss(scored[0], scored[1], ref[0], ref[1], 0.1).losses for ref in (stored, in_run)
        ]
        torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)

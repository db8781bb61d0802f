"""Reward model and DPO on the local Ray cluster, from the session's SFT model (`sft_run`), on
the built-in preference pairs: both learn the held-out preferences with ZeRO-3 on 2 workers, the
reward model's export scores in stock transformers outside Ray; with `make test-faults`, a DPO run
with its reference scores precomputed and a worker SIGKILLed after a checkpoint ends as the
uninterrupted run."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from fmray.config import validate_config
from fmray.train import dpo
from tests.ray.chat_models import align_tree
from tests.ray.test_pretrain import kill_a_worker_after

pytestmark = pytest.mark.ray

# Measured here (see docs/align.md), chance being 0.5 and a margin of 0: the reward model's
# held-out accuracy 0.70 (malformed replies 0.94, wrong facts about unseen facts ~0.5); DPO's
# held-out preference accuracy 0.77 with a margin of 0.17 (beta 0.1).
MIN_RM_ACCURACY = 0.62
MIN_RM_MALFORMED_ACCURACY = 0.8
MIN_DPO_ACCURACY = 0.68
MIN_DPO_MARGIN = 0.08


@pytest.fixture(scope="module")
def sft_model(sft_run) -> Path:
    return Path(sft_run.checkpoint.path) / "hf"


def transformers_accuracy(model_dir: Path, pairs: list[Any]) -> dict[str, float]:
    """Stock transformers, outside Ray: each conversation rendered with the exported chat
    template is scored at its last token; the fraction of pairs whose chosen reply scores
    higher, over all pairs and per kind of rejected reply."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    wins: dict[str, list[bool]] = {"all": []}
    for pair in pairs:
        scores = []
        for reply in (pair.chosen, pair.rejected):
            messages = [
                {"role": "user", "content": pair.prompt},
                {"role": "assistant", "content": reply},
            ]
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
            with torch.no_grad():
                scores.append(model(input_ids=ids).logits[0, 0].item())
        for key in ("all", pair.kind):
            wins.setdefault(key, []).append(scores[0] > scores[1])
    return {key: sum(won) / len(won) for key, won in wins.items()}


def test_reward_model_learns_heldout_preferences_and_scores_in_transformers(
    reward_run: Any, tmp_path: Path
) -> None:
    """The session's reward-model fit (`reward_run`: ZeRO-3, 80 steps, also PPO's reward)."""
    from fmray.checkpoint import export_checkpoint
    from fmray.data.preferences import build_pairs

    metrics = reward_run.metrics
    print(f"reward model held-out: {metrics}")
    assert metrics["val_accuracy"] >= MIN_RM_ACCURACY and metrics["val_margin"] > 0

    # The HF export and `fmray export` (consolidated from the ZeRO-3 shards) score the run's
    # 128 evaluated pairs as the run did; malformed replies are told apart almost always.
    checkpoint = Path(reward_run.checkpoint.path)
    exported = export_checkpoint(str(checkpoint), tmp_path / "exported")
    heldout = build_pairs()[1][:128]
    for model_dir in (checkpoint / "hf", exported):
        accuracy = transformers_accuracy(model_dir, heldout)
        print(f"{model_dir}: {accuracy}")
        assert accuracy["all"] == pytest.approx(metrics["val_accuracy"], abs=1 / 128)
        assert accuracy["malformed"] >= MIN_RM_MALFORMED_ACCURACY


DPO = {"train": {"max_steps": 60, "lr": 1e-4}, "checkpoint": {"every_steps": 30}}


@pytest.fixture(scope="module")
def dpo_run(sft_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("dpo")
    return dpo.run(validate_config(dpo.DPOConfig, align_tree(sft_model, out, "dpo", **DPO)))


def losses_of(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_dpo_learns_heldout_preferences(dpo_run: Any) -> None:
    metrics = dpo_run.metrics
    print(f"DPO held-out: {metrics}")
    # The policy starts as the reference: margin 0, accuracy undefined; it ends well above.
    assert metrics["val_accuracy"] >= MIN_DPO_ACCURACY
    assert metrics["val_margin"] >= MIN_DPO_MARGIN
    assert metrics["val_rewards_chosen"] > metrics["val_rewards_rejected"]
    assert 0.0 <= metrics["val_exact_match"] <= 1.0
    checkpoint = Path(dpo_run.checkpoint.path)
    meta = json.loads((checkpoint / "fmray.json").read_text())
    assert meta["kind"] == "causal_lm" and meta["modules"] == ["model"]  # reference not saved
    assert (checkpoint / "hf" / "chat_template.jinja").is_file()


@pytest.mark.faults  # a second DPO fit: `make test-faults` (the unit tier checks precompute)
def test_precomputed_reference_survives_a_killed_worker_as_the_uninterrupted_run(
    dpo_run: Any, sft_model: Path, tmp_path: Path
) -> None:
    """DPO with its reference log-probs computed once, and a worker SIGKILLed after the step-30
    checkpoint (the group restarts from it and computes them again), ends as the run that keeps
    the reference model. tests/unit/test_preference.py checks the precomputed scores row by row
    against the in-run reference, from a resumed step too."""
    tree = align_tree(sft_model, tmp_path, "dpo", **DPO)
    tree["dpo"] = {"precompute_reference": True}
    tree["scaling"]["max_failures"] = 1
    killed: list[int] = []
    first = tmp_path / "dpo" / "checkpoint_00000030"
    killer = threading.Thread(target=kill_a_worker_after, args=(first, killed))
    killer.start()
    result = dpo.run(validate_config(dpo.DPOConfig, tree))
    killer.join()
    assert killed, "no training worker was found to kill"
    assert result.error is None and result.metrics["step"] == 60
    reference_dir = Path(dpo_run.checkpoint.path).parent
    assert losses_of(tmp_path / "dpo") == pytest.approx(losses_of(reference_dir), abs=1e-5)
    for key in ("val_loss", "val_accuracy", "val_margin"):
        assert result.metrics[key] == pytest.approx(dpo_run.metrics[key], abs=1e-5)

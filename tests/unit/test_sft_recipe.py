"""SFT recipe pieces without Ray: config errors, model paths, eval sharding, greedy decoding."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fmray.config import ConfigError, load_config, validate_config
from fmray.eval.exact_match import greedy_generate, is_exact_match
from fmray.train.launch import resolve_model_path
from fmray.train.sft import SFTConfig
from fmray.train.worker import rank_share
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.path=null", "model.path must be set for sft"),
        ("lora.r=0", "lora.r=0: Input should be greater than or equal to 1"),
        ("lora.rank=8", "unknown key lora.rank=8 (allowed here: r, alpha, dropout"),
        ("data.packing=maybe", "data.packing='maybe': Input should be a valid boolean"),
        ("eval.max_new_tokens=0", "eval.max_new_tokens=0: Input should be greater than"),
    ],
)
def test_bad_sft_config_gives_one_line_error(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, REPO_ROOT / "jobs" / "sft" / "tiny.yaml", [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_lora_is_enabled_by_any_lora_key() -> None:
    tiny = REPO_ROOT / "jobs" / "sft" / "tiny.yaml"
    assert load_config(SFTConfig, tiny).lora is None
    config = load_config(SFTConfig, tiny, ["lora.r=4"])
    assert config.lora is not None and config.lora.r == 4 and config.lora.alpha == 16.0


def test_model_path_may_be_a_run_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir.resolve())
    for step in (40, 120):
        shutil.copytree(tiny_model_dir, tmp_path / f"checkpoint_{step:08d}" / "hf")
        (tmp_path / f"checkpoint_{step:08d}" / "fmray.json").write_text(f'{{"step": {step}}}')
    (tmp_path / "checkpoint_00000160" / "hf").mkdir(parents=True)  # no weights: skipped
    (tmp_path / "checkpoint_00000160" / "hf" / "config.json").write_text("{}")
    (tmp_path / "checkpoint_00000160" / "fmray.json").write_text('{"step": 160}')
    assert resolve_model_path(str(tmp_path)) == str(tmp_path / "checkpoint_00000120" / "hf")
    with pytest.raises(ConfigError, match="is neither an HF model folder"):
        resolve_model_path(str(tmp_path / "nothing"))


def test_eval_shares_cover_every_example_once_with_equal_sizes() -> None:
    items = list(range(7))
    shares = [rank_share(items, rank, 3) for rank in range(3)]
    assert {len(share) for share, _ in shares} == {3}  # same forward passes on every rank
    counted = [x for share, own in shares for x in share[:own]]
    assert sorted(counted) == items


def test_greedy_generation_matches_transformers_generate(
    tiny_tokenizer_dir: Path, tiny_model_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from fmray.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = ["Alice lives in", "What is 2 plus 3? It is", "Counting: one two"]
    # Left-padded batch with a KV cache against one-prompt-at-a-time transformers generate.
    answers = greedy_generate(model, tokenizer, prompts, 6, 8, torch.device("cpu"))
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=list(stops))
        new = out[0, ids.shape[1] :].tolist()
        new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
        assert answer == tokenizer.decode(new, skip_special_tokens=True)


def test_exact_match_ignores_case_spaces_and_final_period() -> None:
    assert is_exact_match(" alice lives in  Paris ", "Alice lives in Paris.")
    assert not is_exact_match("Alice lives in Oslo.", "Alice lives in Paris.")
    assert not is_exact_match("", "Alice lives in Paris.")


def test_sft_sections_reuse_the_shared_ones() -> None:
    config = validate_config(SFTConfig, {"model": {"path": "m"}, "zero": {"stage": 3}})
    assert config.zero.stage == 3 and config.train.max_steps == 200 and config.run.name == "sft"

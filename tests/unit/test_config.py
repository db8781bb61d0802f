"""Config: round trip, dotted overrides, and a one-line error for every kind of bad input."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fmray.config import ConfigError, dump_config, load_config, parse_overrides
from fmray.train.pretrain import PretrainConfig
from tests.conftest import REPO_ROOT

TINY = REPO_ROOT / "jobs" / "pretrain" / "tiny.yaml"


def test_round_trip(tmp_path: Path) -> None:
    config = load_config(PretrainConfig, TINY, ["train.lr=3e-4", "zero.stage=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(config))
    assert load_config(PretrainConfig, path) == config


def test_overrides_apply_and_parse_types() -> None:
    config = load_config(
        PretrainConfig,
        TINY,
        ["train.max_steps=50", "zero.stage=3", "train.betas=[0.8, 0.9]", "model.preset=small"],
    )
    assert config.train.max_steps == 50
    assert config.zero.stage == 3
    assert config.train.betas == (0.8, 0.9)
    assert config.model.preset == "small"
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lrr=0.1", "unknown key train.lrr=0.1 (allowed here: max_steps"),
        ("train.max_steps=abc", "train.max_steps='abc': Input should be a valid integer"),
        ("zero.stage=4", "zero.stage=4: Input should be less than or equal to 3"),
        ("train.lr=-1", "train.lr=-1: Input should be greater than 0"),
        ("zero.offload_optimizer=true", "zero.offload_optimizer=true needs zero.stage in 1, 2, 3"),
        ("model.preset=gpt-9", "model.preset='gpt-9' is unknown (allowed: tiny, small"),
        ("nosuchsection.x=1", "unknown key nosuchsection={'x': 1} (allowed here: run, model"),
        ("train.max_steps", "override 'train.max_steps' is not key=value"),
    ],
)
def test_bad_input_gives_one_line_error(override: str, expected: str) -> None:
    overrides = [override]
    if override.startswith("zero.offload"):
        overrides.append("zero.stage=0")
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, TINY, overrides)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainConfig, "no/such.yaml")


def test_cli_rejects_bad_config_before_ray_starts() -> None:
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fmray",
            "pretrain",
            "--config",
            str(TINY),
            "zero.stage=0",
            "zero.offload_optimizer=true",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "config error: zero.offload_optimizer=true needs zero.stage in 1, 2, 3 (got 0)"
    ]
    assert "Ray" not in proc.stdout + proc.stderr
    assert time.perf_counter() - start < 60


def cli_help(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    from fmray.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_cli_help_lists_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    out = cli_help(capsys, ["pretrain", "--help"])
    for key in (
        "train.lr (float, default 0.001): Peak learning rate.",
        "run.name (str, default 'pretrain')",
        "zero.stage",
        "checkpoint.resume",
        "scaling.num_workers",
        "data.seq_len",
        "logging.tensorboard",
        "logging.verbose (bool, default False)",
    ):
        assert key in out


def test_help_shows_the_recipe_defaults_not_the_section_classes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # SFTConfig needs model.path to validate; help must not.
    out = cli_help(capsys, ["sft", "--help"])
    assert "  train.lr (float, default 0.0001): Peak learning rate." in out
    assert "  train.max_steps (int, default 200):" in out
    assert "  train.eval_every (int, default 50):" in out
    assert "  run.name (str, default 'sft'):" in out
    # An optional section still lists its keys.
    assert "  lora (optional section, default None):" in out
    assert "  lora.r (int, default 8):" in out


def test_help_with_a_config_file_shows_the_values_a_run_would_use(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO_ROOT)
    argv = ["sft", "--config", "jobs/sft/tiny.yaml", "--help", "train.lr=3e-4", "lora.r=4"]
    out = cli_help(capsys, argv)
    assert "from jobs/sft/tiny.yaml and the command line" in out
    assert "  train.max_steps (int, 150 from jobs/sft/tiny.yaml; default 200):" in out
    assert "  run.name (str, 'sft-tiny' from jobs/sft/tiny.yaml; default 'sft'):" in out
    assert "  zero.stage (int, 2 from jobs/sft/tiny.yaml; default 0):" in out
    # Overrides after --help count too, parsed as the run would parse them.
    assert "  train.lr (float, 0.0003 from the command line; default 0.0001):" in out
    assert "  lora (optional section, set from the command line; default None):" in out
    assert "  lora.r (int, 4 from the command line; default 8):" in out
    assert "  lora.alpha (float, default 16.0):" in out
    assert "  train.grad_accum_steps (int, default 1):" in out


def test_help_shows_invalid_values_instead_of_failing(capsys: pytest.CaptureFixture[str]) -> None:
    out = cli_help(capsys, ["pretrain", "train.max_steps=abc", "zero.stage=9", "--help"])
    assert "  train.max_steps (int, 'abc' from the command line; default 100):" in out
    assert "  zero.stage (int, 9 from the command line; default 0):" in out


def test_help_of_a_mapping_lists_its_entries(capsys: pytest.CaptureFixture[str]) -> None:
    out = cli_help(capsys, ["serve", "models.big.path=/models/big", "--help"])
    assert "  models.big.path (str, '/models/big' from the command line; required):" in out
    assert "  models.big.engine.max_batch_size (int, default 16):" in out
    default_out = cli_help(capsys, ["serve", "--help"])
    assert "  models.tiny.path (str, default 'runs/pretrain-tiny'):" in default_out


def test_python_m_fmray_runs_the_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fmray", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: fmray <command>")
    for command in ("pretrain", "sft", "tune", "serve", "export"):
        assert f"  {command} " in proc.stdout


def test_every_pretrain_preset_validates() -> None:
    presets = sorted((REPO_ROOT / "jobs" / "pretrain").glob("*.yaml"))
    assert presets
    for path in presets:
        load_config(PretrainConfig, path)


def test_partial_override_keeps_recipe_defaults() -> None:
    config = load_config(PretrainConfig, None, ["run.seed=3"])
    assert config.run.name == "pretrain"
    assert config.run.seed == 3


def test_resume_modes_are_checked_before_ray(tmp_path: Path) -> None:
    from fmray.train.launch import check_resume

    (tmp_path / "r" / "checkpoint_00000010").mkdir(parents=True)
    (tmp_path / "r" / "checkpoint_00000010" / "fmray.json").write_text('{"step": 10}')
    overrides = [f"run.output_dir={tmp_path}", "run.name=r", "checkpoint.resume=never"]
    never = load_config(PretrainConfig, None, overrides)
    with pytest.raises(ConfigError, match="checkpoint.resume=never but .* already holds"):
        check_resume(never)
    bad_path = load_config(PretrainConfig, None, [f"checkpoint.resume={tmp_path}/nope"])
    with pytest.raises(ConfigError, match="is not an fmray checkpoint directory"):
        check_resume(bad_path)
    check_resume(load_config(PretrainConfig, None, [f"run.output_dir={tmp_path}"]))

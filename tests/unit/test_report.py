"""`fmray report RUN_DIR` on run folders written in the recipes' own format (no Ray)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from fmray.cli import main
from fmray.config import dump_config, load_config
from fmray.recipes import recipe_config_class
from fmray.report import read_metrics, write_report
from tests.conftest import REPO_ROOT


def write_run(run_dir: Path, recipe: str, records: list[dict], checkpoint_kind: str) -> None:
    """A run folder as the recipes leave it: config.yaml (the resolved config of the recipe's
    tiny preset), metrics.jsonl and checkpoint_<step>/fmray.json (the last two of every 10)."""
    run_dir.mkdir(parents=True)
    config = load_config(recipe_config_class(recipe), REPO_ROOT / f"jobs/{recipe}/tiny.yaml")
    (run_dir / "config.yaml").write_text(dump_config(config))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for step in sorted({r["step"] for r in records if r["step"] % 10 == 0})[-2:]:
        ckpt = run_dir / f"checkpoint_{step:08d}"
        ckpt.mkdir()
        meta = {"kind": checkpoint_kind, "modules": ["model"], "step": step, "tag": f"step_{step}"}
        (ckpt / "fmray.json").write_text(json.dumps(meta))


def train_records(num_steps: int, extra_eval: dict[str, float]) -> list[dict]:
    """The per-step records of step_metrics, an evaluation every 10 steps."""
    records = []
    for step in range(1, num_steps + 1):
        record = {
            "step": step,
            "loss": 4.0 / step,
            "lr": 1e-3,
            "grad_norm": 1.0 / step,
            "tokens_per_s": 1000.0 + step,
            "step_time_s": 0.1,
            "elapsed_s": 0.1 * step,
        }
        if step % 10 == 0:
            record["val_loss"] = 5.0 / step
            record.update({k: v * step / num_steps for k, v in extra_eval.items()})
        records.append(record)
    return records


def distinct_colours(path: Path) -> int:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return len(image.convert("RGB").getcolors(maxcolors=1 << 20) or [])


def test_sft_report_draws_the_curves_and_summarises_the_key_metrics(tmp_path, capsys) -> None:
    run_dir = tmp_path / "sft-tiny"
    write_run(run_dir, "sft", train_records(30, {"val_exact_match": 0.6}), "causal_lm")

    main(["report", str(run_dir)])

    out = capsys.readouterr().out
    report = run_dir / "report"
    assert "sft run" in out
    assert str(report / "index.html") in out
    # curves.png: a real chart (axes, two lines, text), not an empty canvas
    assert distinct_colours(report / "curves.png") > 20
    summary = (report / "summary.txt").read_text()
    assert "val_exact_match  0.6 at step 30 (first 0.2 at step 10, best 0.6)" in summary
    assert "loss             0.1333 at step 30 (first 4 at step 1, best 0.1333)" in summary
    assert f"newest {run_dir / 'checkpoint_00000030'}" in summary
    assert "steps 20, 30" in summary
    page = (report / "index.html").read_text()
    assert 'src="curves.png"' in page and "val_exact_match" in page


@pytest.mark.parametrize(
    ("recipe", "kind", "evals", "expected"),
    [
        ("pretrain", "causal_lm", {}, "val_loss"),
        ("reward", "reward", {"val_accuracy": 0.9, "val_margin": 2.0}, "val_accuracy     0.9"),
        ("dpo", "causal_lm", {"val_accuracy": 0.8, "val_margin": 1.0}, "val_margin       1"),
    ],
)
def test_each_recipe_is_recognised_from_its_config(tmp_path, recipe, kind, evals, expected):
    run_dir = tmp_path / recipe
    write_run(run_dir, recipe, train_records(20, evals), kind)
    report = write_report(run_dir)
    assert report.kind == recipe
    assert expected in report.summary
    assert f"checkpoint kind  {kind}" in report.summary


def test_rl_report_shows_held_out_reward_before_and_after(tmp_path) -> None:
    records = [{"step": 0, "val_reward": 1.5, "val_exact_match": 0.25}]
    for step in range(1, 11):
        records.append(
            {
                "step": step,
                "loss": 0.1,
                "reward_mean": 1.0 + step / 10,
                "kl": 0.01 * step,
                "response_length": 5.0,
                "generation_tokens_per_s": 900.0,
                "lr": 1e-4,
                "grad_norm": float("nan"),  # ZeRO-2 may log no norm: skipped, not plotted as NaN
                "tokens_per_s": 100.0,
                "step_time_s": 1.0,
                "elapsed_s": float(step),
                "timing/rollout_s": 0.5,
            }
        )
    records[-1].update(val_reward=2.0, val_exact_match=0.5)
    write_run(tmp_path / "grpo", "grpo", records, "causal_lm")

    report = write_report(tmp_path / "grpo")

    assert report.kind == "grpo"
    assert "val_exact_match  0.5 at step 10 (first 0.25 at step 0, best 0.5)" in report.summary
    assert "reward_mean      2 at step 10 (first 1.1 at step 1, best 2)" in report.summary
    assert "grad_norm" not in read_metrics(tmp_path / "grpo" / "metrics.jsonl")
    assert distinct_colours(report.out_dir / "curves.png") > 20


def test_diffusion_report_carries_each_checkpoints_sample_grid(tmp_path) -> None:
    run_dir = tmp_path / "diffusion-tiny"
    evals = {"colour_acc": 0.9, "shape_acc": 0.5, "position_acc": 0.4}
    records = train_records(20, evals)
    for record in records:
        record["images_per_s"] = record.pop("tokens_per_s")
    write_run(run_dir, "diffusion", records, "diffusion")
    for i, ckpt in enumerate(sorted(run_dir.glob("checkpoint_*"))):
        Image.new("RGB", (64, 32), (200 * i, 30, 90)).save(ckpt / "samples.png")

    report = write_report(run_dir)

    assert report.kind == "diffusion"
    grids = sorted(p.name for p in report.out_dir.glob("samples_step_*.png"))
    assert grids == ["samples_step_00000010.png", "samples_step_00000020.png"]
    with Image.open(report.out_dir / grids[1]) as grid:
        assert grid.getpixel((0, 0)) == (200, 30, 90)
    assert "colour_acc       0.9 at step 20" in report.summary
    assert "samples_step_00000020.png" in (report.out_dir / "index.html").read_text()


def test_tune_report_draws_one_curve_per_trial(tmp_path, capsys) -> None:
    exp_dir = tmp_path / "tune-sft-tiny"
    rows = []
    for i, trial in enumerate(["a0001", "a0002", "a0003"]):
        run = exp_dir / trial / "run"
        run.mkdir(parents=True)
        steps = 20 if i else 40  # ASHA stopped two trials at the first rung
        records = [{"step": s, "val_loss": 3.0 - s / 20 + i} for s in range(10, steps + 1, 10)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        status = "completed" if i == 0 else "stopped early"
        score = records[-1]["val_loss"]
        rows.append({"trial_id": trial, "status": status, "steps": steps, "val_loss": score})
    with (exp_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    best = {"metric": "val_loss", "best_trial": "a0001", "best_metric": 1.0}
    best |= {"best_params": {"train.lr": 0.001}, "best_config": str(exp_dir / "best_config.yaml")}
    (exp_dir / "best.json").write_text(json.dumps(best))

    main(["report", str(exp_dir), "--index", str(tmp_path / "index.html")])

    summary = (exp_dir / "report" / "summary.txt").read_text()
    assert "trials           3" in summary
    assert "trial a0002      stopped early     20 steps  val_loss 3" in summary
    assert "best trial       a0001 (val_loss=1)" in summary
    assert distinct_colours(exp_dir / "report" / "trials.png") > 20
    index = (tmp_path / "index.html").read_text()
    assert 'href="tune-sft-tiny/report/index.html"' in index
    assert "index.html" in capsys.readouterr().out


def test_not_a_run_folder_is_one_clear_line(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"fmray report: {tmp_path / 'empty'} is not a run folder (no config.yaml, no results.csv)"
    )
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "missing")])
    assert "does not exist" in capsys.readouterr().err

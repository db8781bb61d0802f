"""`fmray quickstart`'s plumbing with fake stages (no Ray): each stage's config validates, stages
chain their run folders, finished stages are reused, every stage gets a report, and the summary
table and index page name each stage's key metric, checkpoint, the endpoint and the samples.

The real lifecycle runs in `make quickstart` (about 15 minutes on 2 cores; see
docs/quickstart.md), not in the test suite.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from fmray import quickstart
from fmray.cli import main
from fmray.config import dump_config, validate_config
from fmray.recipes import recipe_config_class


def fake_metrics(command: str, max_steps: int) -> list[dict[str, Any]]:
    """What each recipe logs, with values that improve over the run."""
    records: list[dict[str, Any]] = []
    if command == "grpo":
        records.append({"step": 0, "val_reward": 0.5, "val_exact_match": 0.4})
    for step in range(1, max_steps + 1):
        frac = step / max_steps
        record: dict[str, Any] = {"step": step, "loss": 2.0 - frac, "lr": 1e-3}
        if command == "grpo":
            record |= {"reward_mean": frac, "kl": 0.01}
        if step == max_steps:
            record["val_loss"] = 1.5
            record |= {
                "sft": {"val_exact_match": 0.4},
                "reward": {"val_accuracy": 0.75, "val_margin": 1.2},
                "dpo": {"val_accuracy": 0.7, "val_exact_match": 0.45},
                "grpo": {"val_reward": 1.0, "val_exact_match": 0.5},
                "diffusion": {"colour_acc": 0.9, "shape_acc": 0.6, "position_acc": 0.5},
            }.get(command, {})
        records.append(record)
    return records


def fake_run(calls: list[str]) -> Any:
    """A stand-in for the recipes: writes the run folder a real run leaves (config, metrics,
    final checkpoint; a tokenizer; a search's table), from the config the stage would run."""

    def run(stage: quickstart.Stage, tree: dict[str, Any]) -> None:
        calls.append(stage.name)
        config = validate_config(recipe_config_class(stage.command), tree)
        run_dir = Path(config.run.output_dir) / config.run.name
        run_dir.mkdir(parents=True, exist_ok=True)
        if stage.command == "tokenizer":
            (run_dir / "tokenizer").mkdir()
            (run_dir / "tokenizer" / "tokenizer.json").write_text("{}")
            return
        if stage.command == "tune":
            for i in range(config.num_samples):
                trial = run_dir / f"t{i}" / "run"
                trial.mkdir(parents=True)
                rows = [{"step": s, config.metric: 0.1 * s + i} for s in (10, 20)]
                (trial / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            with (run_dir / "results.csv").open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["trial_id", "status", "steps", config.metric])
                writer.writerows([["t0", "completed", 20, 2.0], ["t1", "completed", 20, 3.0]])
            best = {"metric": config.metric, "best_trial": "t1", "best_metric": 3.0}
            best |= {"best_params": {}, "best_config": str(run_dir / "best_config.yaml")}
            (run_dir / "best.json").write_text(json.dumps(best))
            return
        (run_dir / "config.yaml").write_text(dump_config(config))
        records = fake_metrics(stage.command, config.train.max_steps)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        ckpt = run_dir / f"checkpoint_{config.train.max_steps:08d}"
        ckpt.mkdir()
        meta = {"kind": "causal_lm", "step": config.train.max_steps, "modules": ["model"]}
        (ckpt / "fmray.json").write_text(json.dumps(meta))

    return run


def test_stages_chain_their_run_folders(tmp_path) -> None:
    stages = {s.name: s for s in quickstart.build_stages(tmp_path)}
    assert list(stages) == [
        "tokenizer",
        "pretrain",
        "sft",
        "reward",
        "dpo",
        "grpo",
        "tune",
        "diffusion",
    ]
    trees = {name: quickstart.stage_tree(s, tmp_path) for name, s in stages.items()}
    out = tmp_path.resolve()
    assert trees["pretrain"]["data"]["tokenizer"] == f"{out}/tokenizer/tokenizer"
    assert trees["pretrain"]["scaling"]["num_workers"] == 2
    assert trees["sft"]["model"]["path"] == f"{out}/pretrain"
    assert trees["reward"]["model"]["path"] == f"{out}/sft"
    assert trees["dpo"]["model"]["path"] == f"{out}/sft"
    assert trees["grpo"]["model"]["path"] == f"{out}/dpo"
    assert trees["grpo"]["reward"]["rule"] == "fmray.rl.rewards:exact_match"
    assert trees["tune"]["overrides"]["model.path"] == f"{out}/sft"
    assert Path(trees["tune"]["base"]).is_file()
    for name, tree in trees.items():
        assert tree["run"] == {"output_dir": str(out), "name": name} | {
            k: v for k, v in tree["run"].items() if k not in ("output_dir", "name")
        }


def test_verbose_sets_logging_verbose_in_every_ray_stage(tmp_path) -> None:
    from fmray.config import validate_config
    from fmray.recipes import recipe_config_class

    for stage in quickstart.build_stages(tmp_path, verbose=True):
        config = validate_config(
            recipe_config_class(stage.command), quickstart.stage_tree(stage, tmp_path)
        )
        # The tokenizer runs without Ray; fmray tune passes the setting on to its trials.
        assert stage.command == "tokenizer" or config.logging.verbose, stage.name
    for stage in quickstart.build_stages(tmp_path):
        assert "logging.verbose=true" not in stage.overrides


def test_quickstart_runs_each_stage_once_and_summarises(tmp_path, capsys, monkeypatch) -> None:
    calls: list[str] = []
    served: list[tuple[Path, int, bool]] = []

    def fake_serve(
        out: Path, port: int, keep_serving: bool, verbose: bool = False
    ) -> quickstart.Served:
        served.append((out, port, keep_serving))
        image = out / "quickstart_image.png"
        image.write_bytes(b"png")
        answer = "2 plus 3 is 5."
        url = f"http://localhost:{port}"
        return quickstart.Served(url, "What is 2 plus 3?", answer, answer, image)

    monkeypatch.setattr(quickstart, "run_recipe", fake_run(calls))
    monkeypatch.setattr(quickstart, "serve_and_ask", fake_serve)
    monkeypatch.setattr(quickstart, "image_models_field", lambda: "image_models")
    out = tmp_path / "qs"

    main(["quickstart", "--out", str(out), "--port", "18123"])

    names = ["tokenizer", "pretrain", "sft", "reward", "dpo", "grpo", "tune", "diffusion"]
    assert calls == names
    assert served == [(out.resolve(), 18123, False)]
    text = capsys.readouterr().out
    for number, name in enumerate(names, start=1):
        assert f"[fmray] quickstart {number}/9 {name}: " in text
    assert "[fmray] quickstart 9/9 serve: the GRPO model and the diffusion model" in text
    summary = (out / "summary.txt").read_text()
    assert summary.strip() in text
    rows = {line.split()[0]: line for line in summary.splitlines()[2:12] if line.strip()}
    assert "held-out loss 1.500" in rows["pretrain"]
    assert "exact match 0.400" in rows["sft"]
    assert "RM accuracy 0.750" in rows["reward"]
    assert "exact match 0.400 -> 0.450" in rows["dpo"]  # SFT's, then DPO's
    assert "exact match 0.400 -> 0.500" in rows["grpo"]  # GRPO's own step-0 evaluation
    assert "held-out reward 0.500 -> 1.000" in rows["grpo"]
    assert "val_margin 3.000" in rows["tune"]
    assert "adherence colour 0.900, shape 0.600, position 0.500" in rows["diffusion"]
    assert f"{out / 'grpo' / 'checkpoint_00000020'}" in rows["grpo"]
    assert "endpoint   http://localhost:18123/v1  (models: tiny-chat, shapes)" in summary
    assert "answer     '2 plus 3 is 5.'" in summary
    assert f"image      {out.resolve() / 'quickstart_image.png'}" in summary
    index = (out / "index.html").read_text()
    for name in names[1:]:
        assert f'href="{name}/report/index.html"' in index
        assert (out / name / "report" / "summary.txt").is_file()
    assert "RM accuracy 0.750" in index
    assert '<img src="quickstart_image.png"' in index and "What is 2 plus 3?" in index

    # again: every stage is reused, nothing re-runs, and the summary says so
    calls.clear()
    main(["quickstart", "--out", str(out), "--port", "18123"])
    assert calls == []
    text = capsys.readouterr().out
    assert f"[fmray] quickstart 3/9 sft: done before, reusing {out / 'sft'}" in text
    assert "reused" in (out / "summary.txt").read_text()


def test_an_interrupted_stage_runs_again(tmp_path) -> None:
    calls: list[str] = []
    stages = quickstart.build_stages(tmp_path)[:3]
    quickstart.run_stages(stages, tmp_path, run=fake_run(calls))
    # SFT stopped before its last step: its newest checkpoint is older
    sft = tmp_path / "sft"
    (sft / "checkpoint_00000150").rename(sft / "checkpoint_00000050")
    (sft / "checkpoint_00000050" / "fmray.json").write_text(json.dumps({"step": 50}))
    calls.clear()
    quickstart.run_stages(stages, tmp_path, run=fake_run(calls))
    assert calls == ["sft"]  # the real recipe resumes from checkpoint 50 (resume=auto)
    assert (sft / "checkpoint_00000150" / "fmray.json").is_file()


def test_port_in_use_is_one_clear_line(tmp_path, capsys) -> None:
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            main(["quickstart", "--out", str(tmp_path), "--port", str(port)])
    assert exit_info.value.code == 2
    expected = f"fmray quickstart: port {port} is in use; pass --port with a free one"
    assert capsys.readouterr().err.strip() == expected

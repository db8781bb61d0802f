"""A recipe module with the tunable interface (prepare_run, build_trainer) and no Ray Train:
its trainer reports a closed-form validation curve through the same callbacks a Ray Train run
calls, and writes real fmray checkpoints (fmray.json), in milliseconds.

Tune's plumbing (ASHA stopping, PBT segments, clones and resumes, results, best config) is
tested with it; one real search in tests/ray/test_tune.py checks the Ray Train integration.
val_loss(step) = 1 / (1 + lr * 1000 * step): a higher learning rate is always better, so the
winner and the clones are known in advance.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmray import storage
from fmray.config import (
    CheckpointSection,
    DataSection,
    ModelSection,
    RunSection,
    ScalingSection,
    Section,
    TrainSection,
)
from fmray.train.launch import run_dir_of
from fmray.train.plan import TrainPlan


class FakeConfig(Section):
    run: RunSection = RunSection(name="fake")
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection(max_steps=8, eval_every=2, warmup_steps=0)
    checkpoint: CheckpointSection = CheckpointSection()
    scaling: ScalingSection = ScalingSection(num_workers=1)
    step_seconds: float = 0.0
    """Wall time per step, so a test can act while a search is under way."""


def val_loss(lr: float, step: int) -> float:
    return 1.0 / (1.0 + lr * 1000.0 * step)


def prepare_run(config: FakeConfig) -> TrainPlan:
    run_dir = run_dir_of(config)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return TrainPlan(
        run_dir=run_dir,
        tokenizer_dir=str(Path(run_dir) / "tokenizer"),
        train_data=str(Path(run_dir) / "train"),
        eval_data=str(Path(run_dir) / "eval"),
        seq_len=8,
        num_train_rows=64,
        num_eval_batches=1,
    )


@dataclass
class FakeCheckpoint:
    path: str


@dataclass
class FakeResult:
    metrics: dict[str, Any]
    checkpoint: FakeCheckpoint | None
    error: Exception | None = None


class FakeTrainer:
    def __init__(self, config: FakeConfig, plan: TrainPlan, callbacks: list[Any]) -> None:
        self.config, self.plan, self.callbacks = config, plan, callbacks

    def fit(self) -> FakeResult:
        config, plan = self.config, self.plan
        start, progress = 0, 0.0
        # A PBT segment continues from its (possibly cloned) checkpoint; a restarted trial, as
        # a real recipe does, from the newest checkpoint in its own run folder.
        resume_from = plan.resume_from or newest_checkpoint(plan.run_dir)
        if resume_from:
            meta = json.loads(storage.read_text(storage.join(resume_from, "fmray.json")))
            start, progress = meta["step"], meta["progress"]
        stop = min(plan.stop_step or config.train.max_steps, config.train.max_steps)
        metrics: dict[str, Any] = {}
        checkpoint = None
        for step in range(start + 1, stop + 1):
            time.sleep(config.step_seconds)
            # Progress accumulates at the current LR: a PBT mutation changes the slope from here.
            progress += config.train.lr * 1000.0
            metrics = {"step": step, "val_loss": 1.0 / (1.0 + progress)}
            with (Path(plan.run_dir) / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            if step % config.train.eval_every and step != stop:
                continue
            checkpoint = self.write_checkpoint(step, progress, start)
            self.forward_to_tune(metrics)
        return FakeResult(metrics, checkpoint)

    def forward_to_tune(self, metrics: dict[str, Any]) -> None:
        """What Tune's callback does with a Ray Train report, minus the hop through the Train
        controller's actor (calling it from the trial's own thread would deadlock Tune's
        session, which expects the report from another actor)."""
        import ray.tune

        from fmray.tune.trial import EvalReportCallback

        for callback in self.callbacks:
            if isinstance(callback, EvalReportCallback) and callback.metric in metrics:
                ray.tune.report(metrics)

    def write_checkpoint(self, step: int, progress: float, start: int) -> FakeCheckpoint:
        ckpt = Path(self.plan.run_dir) / f"checkpoint_{step:08d}"
        ckpt.mkdir(parents=True, exist_ok=True)
        meta = {
            "kind": "fake",
            "step": step,
            "progress": progress,
            "trial_id": self.plan.trial_id,
            "experiment": self.plan.experiment,
            "resumed_from_step": start,
            "resumed_from": self.plan.resume_from,
            "pid": os.getpid(),
        }
        (ckpt / "fmray.json").write_text(json.dumps(meta))
        (ckpt / "fmray.yaml").write_text(f"train:\n  lr: {self.config.train.lr}\n")
        return FakeCheckpoint(str(ckpt))


def newest_checkpoint(run_dir: str) -> str | None:
    done = sorted(Path(run_dir).glob("checkpoint_*/fmray.json"))
    return str(done[-1].parent) if done else None


def build_trainer(
    config: FakeConfig, plan: TrainPlan, callbacks: list[Any] | None = None
) -> FakeTrainer:
    return FakeTrainer(config, plan, callbacks or [])

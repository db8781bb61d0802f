"""One Tune trial: a recipe's TorchTrainer fitted inside a Tune function trainable.

    fmray tune --config jobs/tune/sft_tiny.yaml       # runs `run_trial` once per trial (CPU)

`run_trial` builds the trial's recipe config (base + sampled values, its own run folder under the
experiment), fits the recipe's TorchTrainer and forwards Ray Train's evaluation reports to Tune
with TuneReportCallback; under PBT it runs checkpointed segments instead. `ReleaseStoppedTrials`
frees the workers of trials Tune stopped.
"""

from __future__ import annotations

import importlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import ray
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from fmray.tune.results import segment_name
from fmray.tune.space import apply_params


class EvalReportCallback(TuneReportCallback):
    """TuneReportCallback that forwards only reports carrying the searched metric.

    Those are the evaluations: schedulers compare trials at evaluation steps, and Tune's check
    that every result holds the metric passes.
    """

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.metric = metric
        self.forwarded = 0

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        if metrics and self.metric in metrics[0]:
            self.forwarded += 1
            super().after_report(run_context, metrics, checkpoint)


def run_trial(params: dict[str, Any], setup: dict[str, Any]) -> None:
    """A Tune trial (in its own actor): the recipe's TorchTrainer with the sampled params."""
    import ray.tune

    # The recipe was looked up on the driver: a trial imports exactly that module.
    module = importlib.import_module(setup["module"])
    trial_id = ray.tune.get_context().get_trial_id()
    tree = apply_params(setup["base"], params)
    tree["run"] = {
        **tree["run"],
        "output_dir": str(Path(setup["exp_dir"]) / trial_id),
        "name": "run",
    }
    config = getattr(module, setup["config_class"]).model_validate(tree)
    lineage = {"trial_id": trial_id, "experiment": setup["experiment"]}
    if setup["scheduler"] == "pbt":
        run_pbt_segments(module, config, lineage, setup["perturbation_interval"])
        return
    plan = module.prepare_run(config).model_copy(update=lineage)
    forward = EvalReportCallback(setup["metric"])
    module.build_trainer(config, plan, callbacks=[forward]).fit()
    if forward.forwarded == 0:
        report_finished_run(Path(plan.run_dir), setup["metric"])


def report_finished_run(run_dir: Path, metric: str) -> None:
    """Tell Tune the result of a run that had already finished.

    When the search's driver dies after a trial's last evaluation but before Tune saved that
    in its experiment state, the restored search starts the trial again; the recipe resumes
    from the run's last checkpoint, has no step left to run and reports nothing. Its newest
    evaluation record (metrics.jsonl) and checkpoint then stand for it, as they did before.
    """
    import ray.tune

    from fmray.checkpoint import latest_checkpoint

    records = []
    if (run_dir / "metrics.jsonl").exists():
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    evaluations = [r for r in records if metric in r]
    if not evaluations:
        return  # nothing was evaluated: Tune keeps the trial without a score
    newest = latest_checkpoint([str(run_dir)])
    checkpoint = ray.tune.Checkpoint.from_directory(newest) if newest else None
    ray.tune.report(evaluations[-1], checkpoint=checkpoint)


def run_pbt_segments(module: Any, config: Any, lineage: dict[str, Any], interval: int) -> None:
    """PBT: Ray Train runs of `interval` steps, each reported to Tune with its checkpoint.

    After PBT clones a stronger trial, this function restarts with the mutated config and the
    clone's checkpoint (`tune.get_checkpoint`). Each segment is its own Ray Train run, so Ray
    Train's record of an earlier segment never overrides the checkpoint handed over by Tune.
    """
    import ray.tune

    from fmray.checkpoint import read_meta

    checkpoint = ray.tune.get_checkpoint()
    resume_from = checkpoint.path if checkpoint is not None else None
    start = read_meta(Path(resume_from))["step"] if resume_from else 0
    while start < config.train.max_steps:
        stop = min(start + interval, config.train.max_steps)
        name = segment_name(start, uuid.uuid4().hex[:6])
        segment = config.model_copy(update={"run": config.run.model_copy(update={"name": name})})
        update = {**lineage, "stop_step": stop, "resume_from": resume_from}
        plan = module.prepare_run(segment).model_copy(update=update)
        result = module.build_trainer(segment, plan).fit()
        metrics = {**result.metrics, "segment_steps": stop - start}
        metrics["checkpoint_path"] = result.checkpoint.path
        ray.tune.report(
            metrics, checkpoint=ray.tune.Checkpoint.from_directory(result.checkpoint.path)
        )
        resume_from, start = result.checkpoint.path, stop


class ReleaseStoppedTrials(Callback):
    """Frees the worker placement groups of trials Tune stopped, a few seconds after they end.

    A stopped trial's Ray Train controller dies with the trial; Ray Train then relies on a
    cleaner actor that cannot find its cluster when one machine runs several Ray instances, and
    the leaked workers' CPUs would starve every later trial. Recipes record their placement
    group ids in <trial>/<run>/placement_groups.txt; this frees any still held.
    """

    GRACE_S = 10.0

    def __init__(self, exp_dir: Path) -> None:
        self.exp_dir = exp_dir
        self.ended: dict[str, float] = {}

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.ended[trial.trial_id] = time.monotonic()

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.ended[trial.trial_id] = time.monotonic()

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        due = [i for i, t in self.ended.items() if time.monotonic() - t > self.GRACE_S]
        for trial_id in due:
            del self.ended[trial_id]
            release_placement_groups(self.exp_dir / trial_id)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        for trial_id in list(self.ended):
            release_placement_groups(self.exp_dir / trial_id)
        self.ended.clear()


def release_placement_groups(trial_dir: Path) -> None:
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for record in trial_dir.glob("*/placement_groups.txt"):
        for pg_id in record.read_text().split():
            group = PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id)))
            if ray.util.placement_group_table(group).get("state") not in (None, "REMOVED"):
                remove_placement_group(group)

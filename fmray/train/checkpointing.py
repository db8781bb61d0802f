"""Resume and the checkpoint-and-report block, the same for every recipe.

    start_step = resume(engines, config.train, plan, kind)             # before the loop
    checkpoint_and_report(metrics, done, engines, export, ...)     # at checkpoint steps

Resume takes Ray Train's newest registered checkpoint of this run (after a worker-group restart,
or when the same command runs again), else the plan's `resume_from`. A checkpoint is written by
all ranks into local folders that Ray Train merges into <run dir>/checkpoint_<step> and registers
only once complete.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmray import storage
from fmray.config import TrainSection
from fmray.train.plan import RunPlan


@dataclass(frozen=True)
class Export:
    """What a checkpoint exports: its kind, the module to export, and the tokenizer."""

    kind: str
    module: str
    tokenizer: Any
    weights: bool
    """checkpoint.export_hf: include the weights (false: config and tokenizer only)."""


def resume(
    engines: dict[str, Any],
    train: TrainSection,
    plan: RunPlan,
    kind: str,
    schedules: dict[str, TrainSection] | None = None,
    state_out: dict[str, Any] | None = None,
) -> int:
    """Restore the engines, optimizers, schedulers and RNG; returns the step to continue from
    (0 for a fresh run). The LR and weight decay are then set from this run's config: `train`,
    or `schedules[name]` for an engine with its own (PPO's critic). `state_out` receives the
    loop state saved with the checkpoint."""
    import ray.train

    from fmray.checkpoint.format import load_checkpoint
    from fmray.train.worker import apply_schedule

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        source: Any = checkpoint.as_directory()
    else:  # checkpoint.resume=PATH or a PBT donor, downloaded first when remote
        resume_from = plan.resume_from
        source = nullcontext(str(storage.local_copy(resume_from)) if resume_from else None)
    with source as ckpt_dir:
        if ckpt_dir is None:
            return 0
        step = load_checkpoint(Path(ckpt_dir), engines, kind, state_out)
    for name, engine in engines.items():
        apply_schedule(engine, (schedules or {}).get(name, train))
    return step


def checkpoint_and_report(
    metrics: dict[str, Any],
    step: int,
    engines: dict[str, Any],
    export: Export,
    config_yaml: str,
    meta: dict[str, Any],
    state: dict[str, Any] | None = None,
) -> None:
    """Save every rank's share with the kind's export and hand it to Ray Train (collective)."""
    import ray.train

    from fmray.checkpoint.exporters import exporter_for
    from fmray.checkpoint.format import rank_and_world, save_checkpoint

    rank, _ = rank_and_world()
    local_dir = Path(tempfile.mkdtemp(prefix=f"fmray-ckpt-{rank}-"))
    meta = {**meta, "export_module": export.module}
    exporter_for(export.kind).write_live(
        engines[export.module], local_dir, export.tokenizer, meta, export.weights
    )
    # fmray.json is written last (rank 0): a folder without it is never taken for a checkpoint.
    save_checkpoint(local_dir, step, engines, export.kind, config_yaml, meta, state)
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(str(local_dir)),
        checkpoint_dir_name=f"checkpoint_{step:08d}",
    )
    shutil.rmtree(local_dir, ignore_errors=True)


def lineage(config_name: str, plan: RunPlan, start_step: int) -> dict[str, Any]:
    """What a checkpoint records about where it came from."""
    return {
        "run": config_name,
        "trial_id": plan.trial_id,
        "experiment": plan.experiment,
        "base_model": plan.model_path,
        "resumed_from_step": start_step,
        "resumed_from": plan.resume_from,
    }

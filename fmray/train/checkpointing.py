"""Resume and the checkpoint-and-report block, the same for every recipe.

    start_step = resume(engines, config.train, plan, kind)             # before the loop
    checkpoint_and_report(metrics, done, engines, export, ...)     # at checkpoint steps

Resume takes Ray Train's newest registered checkpoint of this run (after a worker-group restart,
or when the same command runs again), else the plan's `resume_from`. A checkpoint is written by
all ranks into local folders that Ray Train merges into <run dir>/checkpoint_<step> and registers
only once complete. Every rank checks the files it will read against the checkpoint's manifests
first; when one is damaged (truncated, corrupted, missing), all ranks fall back together to the
newest older checkpoint of the run folder that is intact, and say so. An explicit
`checkpoint.resume=PATH` that is damaged stops the run with the file named.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
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
        step = load_newest_intact(checkpoint, plan.run_dir, engines, kind, state_out)
    elif plan.resume_from:  # checkpoint.resume=PATH or a PBT donor, downloaded when remote
        step = load_checkpoint(storage.local_copy(plan.resume_from), engines, kind, state_out)
    else:
        return 0
    for name, engine in engines.items():
        apply_schedule(engine, (schedules or {}).get(name, train))
    return step


def load_newest_intact(
    registered: Any,
    run_dir: str,
    engines: dict[str, Any],
    kind: str,
    state_out: dict[str, Any] | None,
) -> int:
    """Load Ray Train's newest registered checkpoint, or, when any rank finds a file of it
    damaged, the newest older intact checkpoint of the run folder (all ranks agree on which)."""
    import torch.distributed as dist

    from fmray.checkpoint import checkpoint_records
    from fmray.checkpoint.format import (
        CheckpointDamagedError,
        load_checkpoint,
        rank_and_world,
        verify_checkpoint,
    )
    from fmray.train.metrics import print_line
    from fmray.train.worker import all_reduce_sums

    rank, world = rank_and_world()
    newest = Path(registered.path).name
    newest_step = int(newest.rsplit("_", 1)[-1]) if newest.startswith("checkpoint_") else None

    def sources() -> Iterator[tuple[str, Any]]:
        yield newest, registered.as_directory
        # The run folder's older checkpoints are listed only once the newest proved damaged.
        for step, _, location in reversed(checkpoint_records(run_dir)):
            if newest_step is None or step < newest_step:
                yield storage.name_of(location), partial(local_checkpoint, location)

    problems: list[str] = []
    for name, open_dir in sources():
        with open_dir() as ckpt_dir:
            try:
                problem = verify_checkpoint(Path(ckpt_dir), rank, world=world)
            except (OSError, ValueError) as error:
                problem = f"{name}: {error}"
            if problem:
                print_line(f"checkpoint damaged: {problem}")  # by the rank that found it
            damaged = float(problem is not None)
            if dist.is_initialized():
                damaged = all_reduce_sums([damaged], device_of(engines))[0]
            if damaged == 0:
                if problems and rank == 0:
                    print_line(f"resuming from {name}, the newest intact checkpoint")
                return load_checkpoint(Path(ckpt_dir), engines, kind, state_out, verify=False)
        problems.append(problem or f"{name}: damaged (see the other ranks' lines)")
    raise CheckpointDamagedError(f"no intact checkpoint to resume from: {'; '.join(problems)}")


def local_checkpoint(location: str) -> Any:
    return nullcontext(str(storage.local_copy(location)))


def device_of(engines: dict[str, Any]) -> Any:
    return next(iter(engines.values())).device


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

"""The typed plan a driver hands every worker of a run (and Tune hands each trial's driver).

The driver resolves everything that needs one view of the world (the run folder, tokenizer,
prepared data, base model) once, so workers never re-derive paths or disagree about them.
Every location is an absolute local path or a URI in the run's storage.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RunPlan(BaseModel):
    """Where a run's inputs are: what every recipe's workers need before their loop."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_dir: str
    """The run folder: <run.output_dir>/<run.name>, local or remote."""
    tokenizer_dir: str
    """The tokenizer every worker loads (and every export carries)."""
    model_path: str | None = None
    """Base model folder; None: a fresh model from the config's preset."""
    resume_from: str | None = None
    """Checkpoint to start from when Ray Train holds none for this run (checkpoint.resume=PATH,
    or the checkpoint Tune's PBT hands a trial)."""
    stop_step: int | None = None
    """Stop (with a checkpoint) after this step without changing the LR schedule (PBT)."""
    trial_id: str | None = None
    """Tune trial this run belongs to (recorded in its checkpoints)."""
    experiment: str | None = None
    """Tune experiment this run belongs to."""


class TrainPlan(RunPlan):
    """A run that streams prepared rows through Ray Data: the data geometry; recipes extend it
    with their own fields."""

    train_data: str
    """Folder of parquet shards with a global `index` column: the training rows."""
    eval_data: str
    """Folder of parquet shards of held-out rows."""
    seq_len: int
    """Tokens per row."""
    num_train_rows: int
    """Rows in train_data."""
    num_eval_batches: int
    """Held-out micro-batches each worker evaluates."""

"""Driver-side pieces every recipe shares: the run folder, staging inputs into the run's storage,
the TorchTrainer, placement-group records and the final summary.

A recipe's `run(config)` reads: check_inputs -> init_ray -> prepare_run (recipe-specific, using
the helpers here) -> fit(config, lambda cfg: build_trainer(cfg, plan)) -> print_summary.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from fmray import storage
from fmray.config import ConfigError, dump_config
from fmray.train.plan import RunPlan, TrainPlan

CONFIG_FILE = "config.yaml"
PLACEMENT_GROUPS_FILE = "placement_groups.txt"


def run_dir_of(config: Any) -> str:
    """<run.output_dir>/<run.name>: an absolute local path or a URI."""
    return storage.join(storage.resolve(config.run.output_dir), config.run.name)


def check_resume(config: Any) -> str | None:
    """checkpoint.resume: 'auto' and 'never' (which refuses a run folder that already holds
    checkpoints) give None; anything else must be a checkpoint folder, returned resolved."""
    from fmray.checkpoint import list_checkpoints

    resume = config.checkpoint.resume
    run_dir = run_dir_of(config)
    if resume == "never" and list_checkpoints(run_dir):
        raise ConfigError(
            f"config error: checkpoint.resume=never but {run_dir} already holds checkpoints "
            "(choose another run.name, or checkpoint.resume=auto)"
        )
    if resume in ("auto", "never"):
        return None
    location = storage.resolve(resume)
    if not storage.is_file(storage.join(location, "fmray.json")):
        raise ConfigError(
            f"config error: checkpoint.resume={resume!r} is not an fmray checkpoint directory "
            "(allowed: auto, never, or a checkpoint folder)"
        )
    return location


def resolve_model_path(path: str, key: str = "model.path") -> str:
    """An HF model folder, or the newest HF export with weights inside an fmray run folder."""
    from fmray.checkpoint import find_hf_export

    try:
        return find_hf_export(path)
    except FileNotFoundError:
        raise ConfigError(
            f"config error: {key}={path!r} is neither an HF model folder (config.json) nor "
            "an fmray checkpoint or run folder with an exported model (checkpoint_*/hf)"
        ) from None


def check_chat_inputs(config: Any) -> None:
    """Fail before Ray starts (chat recipes: sft, reward, dpo): model.path, the data files and
    checkpoint.resume must exist."""
    resolve_model_path(str(config.model.path))
    for key, source in (
        ("data.source", config.data.source),
        ("data.eval_source", config.data.eval_source),
    ):
        if source not in (None, "builtin") and not storage.exists(storage.resolve(source)):
            raise ConfigError(f"config error: {key}={source!r}: no such file or folder")
    check_resume(config)


def prepare_chat_tokenizer(
    tokenizer_setting: str | None, model_path: str, run_dir: str
) -> tuple[Any, str]:
    """The tokenizer of a chat recipe (data.tokenizer, else the model's own) with its chat
    template set (the tokenizer's own, else fmray's ChatML), saved into <run dir>/tokenizer so
    every export carries it and serving formats prompts the same way; also where it went."""
    from transformers import AutoConfig

    from fmray.data.chat_template import chat_template_of
    from fmray.data.tokenizer import load_tokenizer

    model_local = local_dir_of(model_path)
    tokenizer_source = (
        local_dir_of(storage.resolve(tokenizer_setting)) if tokenizer_setting else model_local
    )
    tokenizer = load_tokenizer(tokenizer_source)
    vocab_size = AutoConfig.from_pretrained(str(model_local)).vocab_size
    if len(tokenizer) > vocab_size:
        raise ConfigError(
            f"config error: the tokenizer has {len(tokenizer)} tokens but model.path={model_path} "
            f"embeds {vocab_size}; use the model's own tokenizer (unset data.tokenizer)"
        )
    tokenizer.chat_template = chat_template_of(tokenizer)
    return tokenizer, save_tokenizer(tokenizer, storage.join(run_dir, "tokenizer"))


def data_cache_root(cache_dir: str | None, run_dir: str) -> str:
    """Where prepared data goes: data.cache_dir (shared across runs) or <run dir>/data."""
    return storage.resolve(cache_dir) if cache_dir else storage.join(run_dir, "data")


def write_run_config(config: Any, run_dir: str) -> None:
    storage.write_text(storage.join(run_dir, CONFIG_FILE), dump_config(config))


def save_tokenizer(tokenizer: Any, location: str) -> str:
    """Save a tokenizer to `location` (local or remote) and return the location."""
    staging = storage.staging_dir(location)
    tokenizer.save_pretrained(str(staging))
    if not storage.is_remote(location):
        shutil.rmtree(storage.resolve(location), ignore_errors=True)
    storage.publish_dir(staging, location)
    return location


def stage_model(model_dir: str, run_dir: str) -> str:
    """The base-model folder the workers load: `model_dir` itself, unless the run lives in
    remote storage and the model on this machine; then it is uploaded once into
    <run dir>/base_model, so workers on other nodes reach it."""
    if storage.is_remote(model_dir) or not storage.is_remote(run_dir):
        return model_dir
    target = storage.join(run_dir, "base_model")
    local_names = sorted(p.name for p in Path(model_dir).iterdir() if p.is_file())
    if storage.list_names(target) != local_names:
        print(f"[fmray] uploading the base model {model_dir} -> {target}")
        storage.upload_dir(model_dir, target)
    return target


def local_dir_of(location: str) -> Path:
    """A local folder holding `location`'s files (downloaded into a fresh temporary folder when
    remote; the caller's process owns it)."""
    if not storage.is_remote(location):
        return storage.local_copy(location)  # the folder itself: no scratch folder to leak
    return storage.local_copy(location, tempfile.mkdtemp(prefix="fmray-input-"))


def build_trainer(
    config: Any,
    plan: RunPlan,
    train_loop: Any,
    callbacks: list[Any] | None = None,
) -> Any:
    """The TorchTrainer: one worker per DeepSpeed rank, each reading its own train and eval
    rows (strided by micro-batch, see fmray.data.pipeline) when the plan has prepared rows (RL
    runs read their prompts from the plan instead)."""
    from ray.data import ExecutionOptions
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from fmray.data.pipeline import rank_datasets
    from fmray.distributed.worker_groups import ReleaseFailedWorkerGroup

    train, scaling = config.train, config.scaling
    workers, micro = scaling.num_workers, train.micro_batch_size
    global_batch = micro * train.grad_accum_steps * workers
    datasets = {}
    if isinstance(plan, TrainPlan):
        train_limit = (plan.num_train_rows // global_batch) * global_batch
        eval_limit = plan.num_eval_batches * micro * workers
        datasets = {
            **rank_datasets(plan.train_data, workers, micro, train_limit, "train"),
            **rank_datasets(plan.eval_data, workers, micro, eval_limit, "eval"),
        }
    return TorchTrainer(
        train_loop,
        train_loop_config={"config": config, "plan": plan},
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=config.run.name,
            storage_path=storage.resolve(config.run.output_dir),
            checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep_last),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            callbacks=[ReleaseFailedWorkerGroup(), *(callbacks or [])],
            # Ray Train's own INFO lines go to its log files, not the console, unless verbose.
            logging_config=LoggingConfig(log_level="INFO" if config.logging.verbose else "WARNING"),
        ),
        datasets=datasets,
        dataset_config=DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )


def fit(config: Any, make_trainer: Any) -> Any:
    """`make_trainer(config).fit()`, fitted again from the newest registered checkpoint when a
    worker dies under one of Ray Train's controller calls.

    Ray Train retries a worker group that fails while training, or while it initialises, but a
    worker actor that dies under some other controller call (launching the train function, its
    callbacks) ends the run with a ControllerError that its failure policy never retries,
    whatever `max_failures` says. Such a death is the same fault as any other worker death, so
    fmray re-fits the run (Ray Train restores its newest registered checkpoint, as when the
    command is re-run); each re-fit counts against `scaling.max_failures`, and the next fit gets
    what is left of it.
    """
    from ray.exceptions import RayActorError
    from ray.train import ControllerError

    from fmray.train.metrics import print_line

    budget = config.scaling.max_failures
    refits = 0
    from fmray.distributed.worker_groups import free_orphaned_worker_groups

    while True:
        free_orphaned_worker_groups()
        try:
            return make_trainer(config).fit()
        except ControllerError as error:
            cause = error.controller_failure
            if not isinstance(cause, RayActorError) or (budget != -1 and refits >= budget):
                raise
            refits += 1
            left = -1 if budget == -1 else budget - refits
            config = config.model_copy(
                update={"scaling": config.scaling.model_copy(update={"max_failures": left})}
            )
            shown = "unlimited" if budget == -1 else f"{refits}/{budget}"
            print_line(
                f"a worker died under a Ray Train controller call ({type(cause).__name__}); "
                f"fitting again from the newest checkpoint (restart {shown})"
            )


def check_batch_geometry(
    config: Any, num_train_rows: int, num_eval_rows: int, source_key: str
) -> int:
    """Eval micro-batches per worker; one-line errors if the data is too small for the batch."""
    train, workers = config.train, config.scaling.num_workers
    global_batch = train.micro_batch_size * train.grad_accum_steps * workers
    if num_train_rows < global_batch:
        raise ConfigError(
            f"config error: global batch of {global_batch} rows (train.micro_batch_size x "
            f"train.grad_accum_steps x scaling.num_workers) exceeds the {num_train_rows} "
            f"training rows of {source_key}"
        )
    num_eval_batches = min(train.eval_batches, num_eval_rows // (train.micro_batch_size * workers))
    if num_eval_batches == 0:
        raise ConfigError(
            f"config error: {num_eval_rows} held-out rows are fewer than train.micro_batch_size "
            "x scaling.num_workers; add held-out data or lower train.micro_batch_size"
        )
    return num_eval_batches


def record_placement_group(run_dir: str) -> None:
    """Append the workers' placement group id to <run dir>/placement_groups.txt (rank 0).

    Ray Train frees it when the run ends, or through a cleaner actor when its controller is
    killed (Tune stopping a trial); that cleaner cannot find its cluster on a machine running
    several Ray instances. With the id on record, Tune's driver frees it instead.
    """
    import ray.util

    placement_group = ray.util.get_current_placement_group()
    if placement_group is None:
        return
    path = storage.join(run_dir, PLACEMENT_GROUPS_FILE)
    known = storage.read_text(path) if storage.is_file(path) else ""
    storage.write_text(path, known + placement_group.id.hex() + "\n")


def print_summary(
    run_dir: str, result: Any, outputs: list[tuple[str, str]], final_keys: tuple[str, ...]
) -> None:
    """Where everything went, and the final metrics."""
    print("[fmray] done.")
    rows = [
        ("run folder", run_dir),
        ("config", storage.join(run_dir, CONFIG_FILE)),
        ("metrics", f"{storage.join(run_dir, 'metrics.jsonl')} (TensorBoard: tensorboard/)"),
    ]
    if result.checkpoint is not None:
        rows.append(("checkpoint", checkpoint_location(result.checkpoint)))
    rows += outputs
    for label, value in rows:
        print(f"  {label:<13} {value}")
    if result.metrics:
        shown = {k: round(v, 4) for k, v in result.metrics.items() if k in final_keys}
        print(f"  {'final':<13} {shown}")


def checkpoint_location(checkpoint: Any) -> str:
    """A Ray Train checkpoint as fmray names locations: a local path or a URI."""
    import pyarrow.fs as pafs

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return checkpoint.path
    scheme = checkpoint.filesystem.type_name.replace("gcs", "gs")
    return f"{scheme}://{checkpoint.path}"

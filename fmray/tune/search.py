"""Hyperparameter search with Ray Tune over a recipe's config; every trial is a Ray Train run.

    fmray tune --config jobs/tune/sft_tiny.yaml                      # CPU: ASHA, trials x 2 workers
    fmray tune --config jobs/tune/sft_tiny.yaml scheduler.name=pbt   # population based training
    fmray tune --config jobs/tune/sft_lora_llama_1b.yaml --address auto  # GPU

A trial is a Tune function trainable that builds the recipe's TorchTrainer (N DeepSpeed workers)
and fits it; Ray Train's reports reach Tune through TuneReportCallback. ASHA stops trials whose
eval metric trails at a rung; PBT runs each trial in segments of `perturbation_interval` steps,
each ending in a checkpoint Tune can clone into a weaker trial before mutating its config.
`max_concurrent_trials` follows from the cluster's CPUs/GPUs and each trial's workers, so trials
never wait on each other's resources.

Outputs in <run.output_dir>/<run.name>/: results.csv (one row per trial), best_config.yaml (ready
for `fmray <recipe> --config`), best.json (lineage of the best checkpoint), one folder per trial
id holding its Ray Train run (run/: config.yaml, metrics.jsonl, checkpoints whose fmray.json
names the experiment and trial) and data/ (tokenized once, shared by all trials). Running the
same command again resumes an interrupted search (`Tuner.restore`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from ray.tune import Callback

from fmray.config import (
    ConfigError,
    RunSection,
    Section,
    deep_merge,
    read_yaml,
    set_dotted,
    validate_config,
)
from fmray.recipes import (
    get_recipe,
    pbt_recipes,
    recipe_config_class,
    recipe_module,
    tunable_recipes,
)
from fmray.tune.space import Distribution, apply_params, check_values, parse_search_space
from fmray.tune.trial import ReleaseStoppedTrials, run_trial

# A trial's own process only drives its TorchTrainer; its workers hold the real resources.
TRIAL_DRIVER_CPUS = 0.1
# Left free beside the trials for Ray Data's reading tasks and the trial drivers.
RESERVED_CPUS = 1.0
# Config keys that hold paths: made absolute, since Tune runs each trial in its own folder.
PATH_KEYS = ("model.path", "data.source", "data.eval_source", "data.tokenizer", "data.cache_dir")


class SchedulerSection(Section):
    name: Literal["asha", "pbt", "fifo"] = "asha"
    """asha (stop trailing trials early), pbt (clone and mutate), fifo (run all to the end)."""
    grace_period: int = Field(10, ge=1)
    """ASHA: steps every trial runs before it may be stopped (the first rung)."""
    reduction_factor: float = Field(2.0, gt=1.0)
    """ASHA: 1/reduction_factor of the trials reaching a rung go on to the next."""
    perturbation_interval: int = Field(20, ge=1)
    """PBT: steps per segment; each segment ends in a checkpoint and an exploit/explore step."""
    quantile_fraction: float = Field(0.25, gt=0.0, le=0.5)
    """PBT: trials in the bottom fraction clone one in the top fraction."""
    synch: bool = False
    """PBT: perturb only once every trial has reached the same interval, so clones always come
    from the same step (reproducible); by default a fast trial runs ahead and a slow one may
    clone its final checkpoint."""


class TuneLoggingSection(Section):
    verbose: bool = False
    """Show Ray Tune's status tables and Ray's own log lines on the console too (they are always
    in Ray's log folder); every trial's run gets logging.verbose=true as well. Otherwise fmray
    prints one line per trial start and end."""


class TuneConfig(Section):
    run: RunSection = RunSection(name="tune")
    logging: TuneLoggingSection = TuneLoggingSection()
    recipe: str = "sft"
    """Recipe whose config is searched (tunable recipes are marked in fmray.recipes)."""
    base: str | None = None
    """YAML config of the recipe (e.g. jobs/sft/tiny.yaml) that every trial starts from."""
    overrides: dict[str, Any] = {}
    """Dotted overrides of the base for every trial, e.g. {train.max_steps: 60}."""
    search_space: dict[str, Any] = {}
    """Dotted key -> loguniform(a, b), uniform(a, b), randint(a, b), choice([..]), grid([..])."""
    metric: str = "val_loss"
    """Reported metric the search optimises (each recipe's are listed in fmray.recipes: sft
    val_loss / val_exact_match, reward val_accuracy, dpo val_margin, ...)."""
    mode: Literal["min", "max"] = "min"
    """Whether a lower or a higher metric is better."""
    num_samples: int = Field(4, ge=1)
    """Trials sampled from the space (times the number of grid points)."""
    scheduler: SchedulerSection = SchedulerSection()
    max_concurrent_trials: int = Field(0, ge=0)
    """Trials running at once; 0: as many as the cluster fits (a lower cap if set)."""
    search_seed: int | None = 0
    """Seed of the random sampling (null: a fresh draw every search)."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue an interrupted search of the same run.name; never: refuse to."""

    @field_validator("overrides", "search_space", mode="before")
    @classmethod
    def _dotted_keys(cls, value: Any) -> Any:
        # `search_space.train.lr=...` on the command line arrives nested: flatten it.
        return flatten_dotted(value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check_search(self) -> TuneConfig:
        tunable = tunable_recipes()
        if self.recipe not in tunable:
            raise ValueError(
                f"recipe={self.recipe!r} cannot be tuned (allowed: {', '.join(tunable)})"
            )
        metrics = get_recipe(self.recipe).tunable_metrics
        if self.metric not in metrics:
            raise ValueError(
                f"metric={self.metric!r} is not reported by {self.recipe} "
                f"(allowed: {', '.join(metrics)})"
            )
        try:
            space = parse_search_space(recipe_config_class(self.recipe), self.search_space)
        except ConfigError as err:
            raise ValueError(str(err).removeprefix("config error: ")) from None
        if self.scheduler.name == "pbt":
            if not get_recipe(self.recipe).pbt:
                raise ValueError(
                    f"scheduler.name=pbt needs a recipe that runs in segments "
                    f"(allowed: {', '.join(pbt_recipes())})"
                )
            if any(d.kind == "grid" for d in space.values()):
                raise ValueError("scheduler.name=pbt cannot mutate grid([...]); use choice([...])")
        return self


def flatten_dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": x}, "lora.r": y} -> {"train.lr": x, "lora.r": y}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ----------------------------------------------------------------------------- driver


def resolve_base(config: TuneConfig) -> dict[str, Any]:
    """The recipe config every trial starts from (validated), with absolute paths."""
    config_class = recipe_config_class(config.recipe)
    tree = read_yaml(config.base) if config.base else {}
    overrides: dict[str, Any] = {}
    for key, value in config.overrides.items():
        set_dotted(overrides, key, value)
    tree = deep_merge(tree, overrides)
    base = validate_config(config_class, tree).model_dump(mode="json")
    for key in (*PATH_KEYS, *get_recipe(config.recipe).path_keys):
        section, _, name = key.partition(".")
        value = (base.get(section) or {}).get(name)
        if isinstance(value, str) and Path(value).exists():
            base[section][name] = str(Path(value).resolve())
    return base


def check_schedule(config: TuneConfig, base: dict[str, Any]) -> None:
    """The scheduler must be able to act before trials end (one line, before Ray starts)."""
    train, scheduler = base["train"], config.scheduler
    if scheduler.name == "asha":
        if not train["eval_every"] or train["eval_every"] > scheduler.grace_period:
            raise ConfigError(
                f"config error: scheduler.grace_period={scheduler.grace_period} needs the recipe "
                f"to evaluate at least that often (train.eval_every={train['eval_every']})"
            )
        if scheduler.grace_period >= train["max_steps"]:
            raise ConfigError(
                f"config error: scheduler.grace_period={scheduler.grace_period} must be below "
                f"train.max_steps={train['max_steps']} or ASHA never stops a trial"
            )
    if scheduler.name == "pbt" and scheduler.perturbation_interval >= train["max_steps"]:
        raise ConfigError(
            f"config error: scheduler.perturbation_interval={scheduler.perturbation_interval} "
            f"must be below train.max_steps={train['max_steps']}"
        )


def derive_max_concurrent(
    cluster: dict[str, float], scaling: dict[str, Any], requested: int
) -> int:
    """Trials that fit the cluster at once: CPUs (and GPUs) over each trial's workers."""
    workers = scaling["num_workers"]
    per_trial_cpus = workers * scaling["cpus_per_worker"] + TRIAL_DRIVER_CPUS
    fit = int((cluster.get("CPU", 0.0) - RESERVED_CPUS) // per_trial_cpus)
    if scaling["use_gpu"]:
        fit = min(fit, int(cluster.get("GPU", 0.0) // workers))
    fit = max(1, fit)
    return min(requested, fit) if requested else fit


def build_scheduler(config: TuneConfig, space: dict[str, Distribution], max_steps: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    scheduler = config.scheduler
    if scheduler.name == "asha":
        return ASHAScheduler(
            time_attr="step",
            max_t=max_steps,
            grace_period=scheduler.grace_period,
            reduction_factor=scheduler.reduction_factor,
            # A trial at max_steps ends by itself, so its last checkpoint completes.
            stop_last_trials=False,
        )
    if scheduler.name == "pbt":
        return PopulationBasedTraining(
            time_attr="step",
            perturbation_interval=scheduler.perturbation_interval,
            hyperparam_mutations={key: d.to_tune() for key, d in space.items()},
            quantile_fraction=scheduler.quantile_fraction,
            synch=scheduler.synch,
        )
    return FIFOScheduler()


class TrialProgress(Callback):
    """fmray's console line for each trial event: started (with its params), finished or stopped
    early (at which step, with the searched metric), failed (with Tune's error file)."""

    def __init__(self, metric: str, max_steps: int) -> None:
        self.metric = metric
        self.max_steps = max_steps

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        params = ", ".join(f"{key}={format_value(v)}" for key, v in sorted(trial.config.items()))
        print(f"[fmray] trial {trial.trial_id} started | {params}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        step = result.get("step")
        ended = "finished" if step is None or step >= self.max_steps else "stopped early"
        line = f"[fmray] trial {trial.trial_id} {ended}"
        if step is not None:
            line += f" at step {step}"
        if self.metric in result:
            line += f" | {self.metric} {format_value(result[self.metric])}"
        print(line, flush=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        step = (trial.last_result or {}).get("step")
        where = f" after step {step}" if step is not None else ""
        print(
            f"[fmray] trial {trial.trial_id} failed{where} | error: {trial.error_file}", flush=True
        )


def format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@contextlib.contextmanager
def tune_console(verbose: bool) -> Iterator[None]:
    """Unless verbose: Tune's legacy output engine, which prints nothing at verbose=0 (the new
    one still prints the experiment's set-up box and where results go); fmray's TrialProgress
    and results table report the search."""
    if verbose:
        yield
        return
    previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous


def build_tuner(
    config: TuneConfig,
    exp_dir: Path,
    trainable: Any,
    space: dict[str, Distribution],
    max_steps: int,
    max_concurrent: int,
) -> Any:
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from fmray import storage

    return tune.Tuner(
        trainable,
        param_space={key: d.to_tune() for key, d in space.items()},
        tune_config=tune.TuneConfig(
            metric=config.metric,
            mode=config.mode,
            num_samples=config.num_samples,
            scheduler=build_scheduler(config, space, max_steps),
            search_alg=BasicVariantGenerator(
                random_state=config.search_seed, max_concurrent=max_concurrent
            ),
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(
            name=config.run.name,
            storage_path=storage.resolve(config.run.output_dir),
            # PBT clones from checkpoints: keep a few beyond the newest one.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
            callbacks=[ReleaseStoppedTrials(exp_dir), TrialProgress(config.metric, max_steps)],
            verbose=1 if config.logging.verbose else 0,
        ),
    )


def run(config: TuneConfig, address: str | None = None) -> Any:
    import ray
    from ray import tune

    from fmray import storage
    from fmray.distributed.runtime import init_ray
    from fmray.tune.results import summarize

    # --- everything that can be wrong fails here, before Ray starts
    module, config_class = recipe_module(config.recipe), recipe_config_class(config.recipe)
    if storage.is_remote(config.run.output_dir):
        raise ConfigError(
            f"config error: run.output_dir={config.run.output_dir!r}: fmray tune keeps its "
            "experiment (results table, trial folders) on a local or shared filesystem; "
            "remote storage is supported by the training recipes"
        )
    exp_dir = Path(storage.resolve(config.run.output_dir)) / config.run.name
    user_base = resolve_base(config)
    space = parse_search_space(config_class, config.search_space)
    check_values(config_class, user_base, space)
    check_schedule(config, user_base)
    if hasattr(module, "check_inputs"):
        module.check_inputs(config_class.model_validate(user_base))
    restoring = (exp_dir / "tuner.pkl").is_file()
    if restoring and config.resume == "never":
        raise ConfigError(
            f"config error: resume=never but {exp_dir} holds a search (choose another run.name)"
        )

    # --- cluster: how many trials fit at once
    scaling = user_base["scaling"]
    required_cpus = scaling["num_workers"] * scaling["cpus_per_worker"] + TRIAL_DRIVER_CPUS
    init_ray(address, required_cpus, config.logging.verbose)
    max_concurrent = derive_max_concurrent(
        ray.cluster_resources(), scaling, config.max_concurrent_trials
    )
    print(f"[fmray] {exp_dir}: up to {max_concurrent} trials at once")

    # --- shared data: tokenized once here, so concurrent trials never race to build it
    trial_base = apply_params(user_base, {"data.cache_dir": str(exp_dir / "data")})
    if config.logging.verbose:
        trial_base = apply_params(trial_base, {"logging.verbose": True})
    prepare = apply_params(trial_base, {"run.output_dir": str(exp_dir), "run.name": "prepare"})
    plan = module.prepare_run(config_class.model_validate(prepare))
    trial_base = apply_params(trial_base, {"data.tokenizer": plan.tokenizer_dir})

    # --- search (or continue an interrupted one)
    setup = {
        "module": module.__name__,
        "config_class": config_class.__name__,
        "base": trial_base,
        "exp_dir": str(exp_dir),
        "experiment": config.run.name,
        "metric": config.metric,
        "scheduler": config.scheduler.name,
        "perturbation_interval": config.scheduler.perturbation_interval,
    }
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup), {"CPU": TRIAL_DRIVER_CPUS}
    )
    max_steps = user_base["train"]["max_steps"]
    if restoring:
        print(f"[fmray] resuming the search in {exp_dir}")
        tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_errored=True)
    else:
        tuner = build_tuner(config, exp_dir, trainable, space, max_steps, max_concurrent)
    with tune_console(config.logging.verbose):
        results = tuner.fit()
    summarize(results, config, user_base, space, exp_dir)
    return results

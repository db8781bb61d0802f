"""The Ray runtime fmray runs on: an embedded local instance or an existing cluster."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

# Worker processes inherit these unless the user already set them.
WORKER_ENV_DEFAULTS = {
    # DeepSpeed JIT-builds its CPU comm op on first start: build it once per machine.
    "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "fmray" / "torch_extensions"),
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # Workers' Ray Data progress bars would interleave with fmray's own progress line.
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}


# Passed on as set on the driver: run storage credentials and endpoints (pyarrow reads them),
# offline mode and the accelerator choice.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "RAY_AUTH_MODE", "DS_ACCELERATOR", "PYTHONPATH")
FORWARDED_ENV_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_", "GCS_")


def worker_env() -> dict[str, str]:
    env = {key: os.environ.get(key, value) for key, value in WORKER_ENV_DEFAULTS.items()}
    for key, value in os.environ.items():
        if key in FORWARDED_ENV or key.startswith(FORWARDED_ENV_PREFIXES):
            env[key] = value
    return env


# Ray Train reads these on the driver and hands them to its controller. A report reaches the
# driver at the controller's next poll of the workers (Ray's default: every 2 s).
TRAIN_ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
# On an embedded single-machine instance there is no spot preemption to watch and no metrics
# exporter to feed: each would cost an actor and its process start per run.
LOCAL_TRAIN_ENV_DEFAULTS = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


def apply_train_env(local: bool) -> None:
    """Set fmray's Ray Train defaults in this (driver) process unless the user set them."""
    defaults = {**TRAIN_ENV_DEFAULTS, **(LOCAL_TRAIN_ENV_DEFAULTS if local else {})}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


# An embedded instance serves one run on this machine: no metrics collection/export by the
# raylet and workers, no usage-stats reporting. The dashboard stays: Ray Train's placement-group
# cleaner polls the State API (served by the dashboard) every second for its controller, and
# without a dashboard the answer is "not found", which it reads as a dead controller and removes
# the run's placement group (measured: `is_actor_alive` gives None for a live actor when
# include_dashboard=False). FMRAY_RAY_DASHBOARD=1 starts Ray as a plain ray.init() would.
LOCAL_ENV_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0"}


def local_ray_options() -> dict:
    """ray.init arguments of an embedded instance that starts only what a run uses."""
    if os.environ.get("FMRAY_RAY_DASHBOARD") == "1":
        return {}
    for key, value in LOCAL_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return {"_system_config": {"enable_metrics_collection": False}}


def set_local_env_defaults() -> None:
    """Say explicitly what Ray and DeepSpeed would otherwise pick with a console notice, for an
    embedded instance; the user's own RAY_AUTH_MODE and DS_ACCELERATOR win.

    - Token authentication, Ray's default for a new local instance. Ray announces it unless
      RAY_AUTH_MODE is set, and this process read its Ray config on import, so the mode is set
      the way Ray sets it by default (the variable, then a config refresh), minus the notice.
    - On a machine without a GPU, DeepSpeed's CPU accelerator, which it otherwise picks after a
      warning in every process (workers get it through worker_env()).
    """
    if "RAY_AUTH_MODE" not in os.environ:
        try:
            from ray._private.authentication.authentication_token_setup import (
                _enable_token_auth,
            )
        except ImportError:  # another Ray: it picks and announces the default itself
            pass
        else:
            _enable_token_auth()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def disable_data_progress_bars() -> None:
    """Ray Data reads RAY_DATA_DISABLE_PROGRESS_BARS once, when it is imported, which may be
    before init_ray set it here; this driver's DataContext also travels with its datasets to the
    training workers, whose bars would interleave with fmray's progress line."""
    if os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") == "1":
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False


def init_ray(address: str | None = None, required_cpus: float = 0.0, verbose: bool = False) -> None:
    """Connect to `address` (or RAY_ADDRESS), else start an embedded local Ray instance.

    A local instance advertises at least `required_cpus` + 1 CPUs: training workers hold their
    CPUs for the whole run, and Ray Data's reading tasks need a little room beside them.
    Unless `verbose`, the console shows fmray's lines, warnings and errors, not Ray's INFO lines
    nor its known-benign notices (fmray.distributed.console); Ray's log folder keeps everything
    either way.
    """
    import ray

    from fmray.distributed.console import quiet_console

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address is None:
        set_local_env_defaults()  # before worker_env(), which forwards them
    for key, value in worker_env().items():
        os.environ.setdefault(key, value)
    apply_train_env(local=address is None)
    disable_data_progress_bars()
    num_cpus, options = None, {}
    if address is None:
        num_cpus = max(os.cpu_count() or 1, int(required_cpus + 0.999) + 1)
        options = local_ray_options()
    ray.init(
        # "local": a new embedded instance even where `ray start` left a cluster running (a
        # bare ray.init() would join it, or fail on a stale record of it).
        address=address or "local",
        num_cpus=num_cpus,
        runtime_env={"env_vars": worker_env()},
        log_to_driver=True,
        configure_logging=False,
        **options,
    )
    if not verbose:
        quiet_console()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

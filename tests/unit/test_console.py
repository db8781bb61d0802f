"""Console filter: which forwarded worker lines reach the console (shapes copied from real runs)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest

from fmray.distributed.console import ConsoleFilter, Verdict, line_verdict

FMRAY, SHOW, HIDE = Verdict.FMRAY, Verdict.SHOW, Verdict.HIDE

# (line, verdict) in the order a worker printed them; each line's previous is the one above.
TRAINING_RUN = [
    ("Setting up process group for: env:// [rank=0, world_size=2]", HIDE),
    (
        "[2026-11-30 16:38:06,278] [WARNING] [real_accelerator.py:213:get_accelerator] Setting "
        "accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
        SHOW,
    ),
    ("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully", HIDE),
    (
        "Starting execution of Dataset val_rank0_0356f0cqYDciWdJtaY9D7a_0. Full logs are in "
        "/tmp/ray/session_2026-11-30_16-33-25_897837_9551/logs/ray-data",
        HIDE,
    ),
    (
        "Execution plan of Dataset val_rank0_0356f0cqYDciWdJtaY9D7a_0: InputDataBuffer[Input] -> "
        "TaskPoolMapOperator[ListFiles] -> TaskPoolMapOperator[ReadFilesParquetV2->MapBatches("
        "keep_rank_rows)]",
        HIDE,
    ),
    (
        "Progress bars disabled. To enable, set "
        "`ray.data.DataContext.get_current().enable_progress_bars = True`.",
        HIDE,
    ),
    # Ray Data's notice that a small read has fewer inputs than its task cap: benign, and the
    # continuation of the warning goes with it.
    (
        "/home/user/proj/.venv/lib/python3.11/site-packages/ray/data/_internal/execution/operators/"
        "task_pool_map_operator.py:319: UserWarning: The maximum number of concurrent tasks for "
        "'ReadFilesParquetV2->MapBatches(keep_rank_rows)' is set to 2, but the operator only "
        "received 1 input(s).",
        HIDE,
    ),
    ("  warnings.warn(", HIDE),
    (
        "\u2714\ufe0f  Dataset val_rank0_0356f0cqYDciWdJtaY9D7a_0 execution finished in 386.79 "
        "seconds",
        HIDE,
    ),
    (
        "/home/user/proj/.venv/lib/python3.11/site-packages/torch/distributed/c10d_logger.py:83: "
        "FutureWarning: `torch.distributed.all_gather_into_tensor` is deprecated.",
        SHOW,
    ),
    ("  return func(*args, **kwargs)", SHOW),
    # A progress bar after a shown warning: its leading "\r" does not make it a continuation.
    (
        "\rWriting model shards:   0%|          | 0/1 [00:00<?, ?it/s]\rWriting model shards: "
        "100%|##########| 1/1 [00:00<00:00, 104.83it/s]",
        HIDE,
    ),
    (
        "Checkpoint successfully created at: Checkpoint(filesystem=local, "
        "path=/tmp/quiet-check/pretrain-tiny/checkpoint_00000002)",
        HIDE,
    ),
    (
        "Reporting training result 1: TrainingReport(checkpoint=Checkpoint(filesystem=local, "
        "path=/tmp/quiet-check/pretrain-tiny/checkpoint_00000002), metrics={'step': 2}, "
        "validation=False) from rank 0",
        HIDE,
    ),
    (
        "[fmray] step 4/4 | loss 5.7349 | val 5.5764 | lr 1.50e-03 | grad 2.148 | 3,714 tok/s | "
        "0.551 s/step | ETA 0 s",
        FMRAY,
    ),
    ("  checkpoint    /tmp/quiet-check/pretrain-tiny/checkpoint_00000004", FMRAY),
]

FAILED_WORKER = [
    ("Error in training function:", SHOW),
    ("Traceback (most recent call last):", SHOW),
    ('  File "/home/user/proj/fmray/train/pretrain.py", line 75, in train_loop', SHOW),
    ("    train = config.train", SHOW),
    ("            ^^^^^^^^^^^^", SHOW),
    ("AttributeError: 'dict' object has no attribute 'train'", SHOW),
    ("", SHOW),
]

CONTROLLER = [
    ("Requesting resources: {'CPU': 1.0} * 2", HIDE),
    (
        "Attempting to start training worker group of size 2 with the following resources: "
        "[{'CPU': 1.0}] * 2",
        HIDE,
    ),
    ("Started training worker group of size 2: ", HIDE),
    ("- (ip=192.0.2.2, pid=6736) world_rank=0, local_rank=0, node_rank=0", HIDE),
    (
        "[2026-11-30 16:29:32,418 E 6474 6597] core_worker.cc:2465: Actor with class name: "
        "'PreemptionWatcher' and ID: '1d5ed4616a91ee83f8a6b52401000000' has constructor "
        "arguments in the object store and max_restarts > 0.",
        SHOW,
    ),
    ("[FailurePolicy] RETRY", SHOW),
    ("  Source: worker group", SHOW),
    ("  Error count: 1 (max allowed: 1)", SHOW),
    ("Error: Training failed due to worker errors:", SHOW),
    ("[Rank 0 Error Snippet]:", SHOW),
]

RAY_DATA_RECORDS = [
    (
        "2026-11-30 16:27:55,853\tINFO streaming_executor.py:215 -- Starting execution of Dataset "
        "dataset_0356ekBuREBXS0tnpuhQv9_0. Full logs are in /tmp/ray/session_x/logs/ray-data",
        HIDE,
    ),
    # The indented continuation of a hidden record stays hidden, even if it names an error.
    ("    ActorPoolMapOperator[MapBatches(TokenizeBatch)] errors: 0", HIDE),
    (
        "2026-11-30 16:27:55,983\tWARNING __init__.py:28 -- Progress bars disabled. To enable, "
        "set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
        SHOW,
    ),
    (
        "[2026-11-30 16:38:06,278] [INFO] [config.py:1003:print] DeepSpeedEngine configuration:",
        HIDE,
    ),
    ("[2026-11-30 16:27:55,981 I 4815 4815] core_worker.cc:120: an error-free info line", HIDE),
]


# Lines of a quickstart run (copied from its console) that are Ray's or a library's internal
# notices, each hidden by default; Ray dedups repeats with a coloured suffix.
DEDUP = "\x1b[32m [repeated 2x across cluster]\x1b[0m"
QUICKSTART_NOTICES = [
    (
        "/home/user/proj/.venv/lib/python3.11/site-packages/ray/data/_internal/execution/operators/"
        "task_pool_map_operator.py:319: UserWarning: The maximum number of concurrent tasks for "
        "'ReadParquet->SplitBlocks(6)' is set to 2, but the operator only received 1 input(s). "
        "This means that the operator can launch at most 1 task(s), which is less than the "
        "concurrency limit. You might be able to increase the number of concurrent tasks by "
        "configuring `override_num_blocks` earlier in the pipeline." + DEDUP,
        HIDE,
    ),
    ("  warnings.warn(" + DEDUP, HIDE),
    (
        "[transformers] `CLIPImageProcessor` requires torchvision (not installed); falling back "
        "to `CLIPImageProcessorPil` for backward compatibility. Install torchvision to use the "
        "default backend, or import `CLIPImageProcessorPil` directly to silence this warning.",
        HIDE,
    ),
    (
        "[transformers] `SiglipImageProcessor` requires torchvision (not installed); falling back "
        "to `SiglipImageProcessorPil` for backward compatibility. Install torchvision to use the "
        "default backend, or import `SiglipImageProcessorPil` directly to silence this warning.",
        HIDE,
    ),
    (
        "WARNING 2026-12-01 10:38:11,499 controller 8325 -- Cannot deregister autoscaling state "
        "for deployment Deployment(name='OpenAIIngress', app='fmray-quickstart') because it is "
        "not registered",
        HIDE,
    ),
    # Progress bars of transformers in a worker ("Writing model shards") were hidden already.
    (
        "\rWriting model shards:   0%|          | 0/1 [00:00<?, ?it/s]\rWriting model shards: "
        "100%|##########| 1/1 [00:00<00:00, 197.02it/s]",
        HIDE,
    ),
]

# Real problems from the same sources stay visible: only the exact notices above are hidden.
REAL_PROBLEMS = [
    (
        "/x/site-packages/ray/data/_internal/execution/operators/task_pool_map_operator.py:250: "
        "UserWarning: some other Ray Data warning",
        SHOW,
    ),
    ("  warnings.warn(", SHOW),
    ("ERROR 2026-12-01 10:38:11,499 controller 8325 -- Failed to update the deployment", SHOW),
    (
        "WARNING 2026-12-01 10:38:11,499 controller 8325 -- Deployment 'LLMServer' in application "
        "'fmray-quickstart' has 1 replicas that have taken more than 30s to initialize.",
        SHOW,
    ),
    ("[transformers] `CLIPImageProcessor` is deprecated and raises an error", SHOW),
    # DeepSpeed's accelerator notice is avoided at its source on a local CPU run (DS_ACCELERATOR);
    # where it does come (a cluster), it can mean a GPU that was not found, so it shows.
    (
        "[2026-12-01 10:32:14,750] [WARNING] [real_accelerator.py:213:get_accelerator] Setting "
        "accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
        SHOW,
    ),
    ("Traceback (most recent call last):", SHOW),
    ('  File "/home/user/proj/fmray/serve/llm/engine.py", line 10, in generate', SHOW),
    ("RuntimeError: CUDA out of memory", SHOW),
]


@pytest.mark.parametrize(
    "lines",
    [TRAINING_RUN, FAILED_WORKER, CONTROLLER, RAY_DATA_RECORDS, QUICKSTART_NOTICES, REAL_PROBLEMS],
    ids=lambda _: "",
)
def test_line_verdicts(lines: list[tuple[str, Verdict]]) -> None:
    previous = HIDE
    for line, expected in lines:
        verdict = line_verdict(line, previous)
        assert verdict is expected, line
        previous = verdict


def worker_batch(lines: list[str], pid: Any = 6736, is_err: bool = False) -> dict[str, Any]:
    return {
        "ip": "192.0.2.2",
        "pid": pid,
        "job": "01000000",
        "is_err": is_err,
        "lines": lines,
        "actor_name": "RayTrainWorker",
        "task_name": None,
        "localhost": "192.0.2.2",
    }


def test_filter_prints_fmray_lines_plainly_and_hands_the_rest_to_ray_in_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    printed: list[dict[str, Any]] = []
    console = ConsoleFilter(printed.append)
    console(
        worker_batch(
            [
                "Setting up process group for: env:// [rank=0, world_size=2]",
                "/x/c10d_logger.py:83: FutureWarning: deprecated.",
                "  return func(*args, **kwargs)",
                "[fmray] step 1/4 | loss 6.0",
                "Reporting training result 1: TrainingReport(...) from rank 0",
                "[fmray] step 2/4 | loss 5.9",
            ]
        )
    )
    assert [batch["lines"] for batch in printed] == [
        ["/x/c10d_logger.py:83: FutureWarning: deprecated.", "  return func(*args, **kwargs)"]
    ]
    assert printed[0]["pid"] == 6736 and printed[0]["actor_name"] == "RayTrainWorker"
    assert capsys.readouterr().out == "[fmray] step 1/4 | loss 6.0\n[fmray] step 2/4 | loss 5.9\n"


def test_filter_keeps_a_traceback_split_across_batches() -> None:
    printed: list[dict[str, Any]] = []
    console = ConsoleFilter(printed.append)
    console(worker_batch(["Traceback (most recent call last):"], is_err=True))
    # Another worker's chatter in between does not break the first worker's traceback.
    console(worker_batch(["Setting up process group for: env://"], pid=7000, is_err=True))
    console(worker_batch(['  File "x.py", line 1, in f', "ValueError: boom"], is_err=True))
    assert [batch["lines"] for batch in printed] == [
        ["Traceback (most recent call last):"],
        ['  File "x.py", line 1, in f', "ValueError: boom"],
    ]


def test_filter_passes_ray_notices_through() -> None:
    printed: list[dict[str, Any]] = []
    console = ConsoleFilter(printed.append)
    notice = worker_batch(["A worker died or was killed while executing a task."], pid="raylet")
    console(notice)
    assert printed == [notice]


# The raylet's notices at a quickstart's end (copied from its console): not the run's problems.
BENIGN_RAYLET = [
    "WARNING: 8 PYTHON worker processes have been started on node: "
    "f5713bb619bec8c957b259576830a7dade7bb805464f11bfb5478c8a with address: 192.0.2.2, which is "
    "4x the maximum expected startup concurrency (2). This could be a result of using a large "
    "number of actors, tasks blocked in ray.get() calls, or tasks with fractional CPU requests "
    "(e.g., num_cpus=0.1) allowing high concurrency. See "
    "https://github.com/ray-project/ray/issues/3644 for some discussion of workarounds.",
    "Task ServeController.graceful_shutdown failed. There are infinite retries remaining, so the "
    "task will be retried. Error: The actor is dead because it was killed by `ray.kill`.",
]
REAL_RAYLET = [
    "A worker died or was killed while executing a task by an unexpected system error.",
    "[2026-12-01 10:38:25,324 E 2424 2424] (raylet) node_manager.cc:3000: 1 Workers (tasks / "
    "actors) killed due to memory pressure (OOM), 0 Workers crashed due to other reasons.",
    "Task RayTrainWorker.run_train_fn failed. Error: The actor is dead because it was killed by "
    "`ray.kill`.",
]


def test_filter_hides_the_raylets_benign_notices_only() -> None:
    printed: list[dict[str, Any]] = []
    console = ConsoleFilter(printed.append)
    console(worker_batch(BENIGN_RAYLET, pid="raylet"))
    assert printed == []
    console(worker_batch([*BENIGN_RAYLET, *REAL_RAYLET], pid="raylet"))
    assert [batch["lines"] for batch in printed] == [REAL_RAYLET]


def test_cluster_messages_lose_the_benign_notices_while_the_filter_is_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The raylet's published notices reach Ray's printer directly, not its print handler."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from fmray.distributed.console import RAY_PRINT_HANDLER, filtered_error_messages

    printed: list[dict[str, Any]] = []
    notices = filtered_error_messages(lambda data, ignore_prefix: printed.append(data))
    # An earlier test's Ray session may have left its filter installed: set both states here.
    monkeypatch.setattr(dispatcher, "handlers", [(RAY_PRINT_HANDLER, print)])
    for line in [*BENIGN_RAYLET, *REAL_RAYLET]:
        notices({"lines": [line], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    monkeypatch.setattr(dispatcher, "handlers", [(RAY_PRINT_HANDLER, ConsoleFilter(print))])
    for line in [*BENIGN_RAYLET, *REAL_RAYLET]:
        notices({"lines": [line], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    # Without the filter (a verbose session) all of them; with it, the real ones.
    assert [data["lines"][0] for data in printed] == [*BENIGN_RAYLET, *REAL_RAYLET, *REAL_RAYLET]


def test_install_wraps_rays_cluster_message_printer_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from fmray.distributed.console import RAY_PRINT_HANDLER, install_console_filter

    # Ray's own printer, even where an earlier test's Ray session left it wrapped.
    original = getattr(ray_worker.print_to_stdstream, "fmray_wraps", ray_worker.print_to_stdstream)
    monkeypatch.setattr(ray_worker, "print_to_stdstream", original)
    monkeypatch.setattr(dispatcher, "handlers", [(RAY_PRINT_HANDLER, print)])
    assert install_console_filter()
    wrapped = ray_worker.print_to_stdstream
    assert wrapped is not original and wrapped.fmray_wraps is original
    monkeypatch.setattr(dispatcher, "handlers", [(RAY_PRINT_HANDLER, print)])
    assert install_console_filter()  # a new Ray session: its handler is wrapped again ...
    assert ray_worker.print_to_stdstream is wrapped  # ... the printer only once


def test_install_wraps_rays_print_handler_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from fmray.distributed.console import RAY_PRINT_HANDLER, install_console_filter

    printed: list[dict[str, Any]] = []
    # Stand in for Ray's handler (a Ray instance of the Ray tests may own the real one); Ray's
    # printer of cluster messages, which install wraps, is restored afterwards.
    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)
    monkeypatch.setattr(dispatcher, "handlers", [(RAY_PRINT_HANDLER, printed.append)])
    assert install_console_filter()
    assert not install_console_filter()
    dispatcher.emit(worker_batch(["Requesting resources: {'CPU': 1.0} * 2", "ERROR: x"]))
    assert [batch["lines"] for batch in printed] == [["ERROR: x"]]
    monkeypatch.setattr(dispatcher, "handlers", [])
    assert not install_console_filter()  # log_to_driver=False: nothing to filter


def test_driver_consoles_show_rays_warnings() -> None:
    import ray.data  # noqa: F401 - configures the "ray.data" logger
    from ray._private.log import PlainRayHandler

    from fmray.distributed.console import RayInfoFilter, quiet_driver_loggers

    handlers = [*logging.getLogger("ray").handlers, *logging.getLogger("ray.data").handlers]
    filters = {handler: list(handler.filters) for handler in handlers}
    try:
        quiet_driver_loggers()
        quiet_driver_loggers()
        consoles = [h for h in handlers if isinstance(h, PlainRayHandler)]
        # "ray"'s (which ray.train's records reach), and "ray.data"'s unless an earlier Ray
        # session in this process already reconfigured Ray Data's logging.
        assert consoles
        for handler in consoles:
            assert sum(isinstance(f, RayInfoFilter) for f in handler.filters) == 1
        # Ray Data's log file (in Ray's log folder) keeps every record.
        file = [h for h in logging.getLogger("ray.data").handlers if h.name == "file"]
        assert file and file[0].filters == filters[file[0]]
    finally:
        for handler, kept in filters.items():
            handler.filters[:] = kept

    def record(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, "x.py", 1, "message", None, None)

    keep = RayInfoFilter()
    assert not keep.filter(record("ray.data._internal.execution.streaming_executor", logging.INFO))
    assert not keep.filter(record("ray.train.v2._internal.execution.controller", logging.INFO))
    assert keep.filter(record("ray.data", logging.WARNING))
    assert keep.filter(record("ray.data._internal.progress", logging.WARNING))
    # Tune's INFO lines too: fmray prints a line per trial event and its own results table.
    assert not keep.filter(record("ray.tune.tune", logging.INFO))
    assert keep.filter(record("ray.tune.execution.tune_controller", logging.ERROR))
    # Ray Data's note that progress bars are off (fmray turned them off), as Ray logs it.
    progress = logging.LogRecord(
        "ray.data._internal.progress",
        logging.WARNING,
        "__init__.py",
        28,
        "Progress bars disabled. To enable, set "
        "`ray.data.DataContext.get_current().enable_progress_bars = True`.",
        None,
        None,
    )
    assert not keep.filter(progress)


def test_transformers_torchvision_notice_and_bars_are_off_on_the_driver() -> None:
    from transformers.utils import logging as transformers_logging

    from fmray.distributed.console import (
        TRANSFORMERS_IMPORTS_LOGGER,
        TorchvisionFallbackFilter,
        no_progress_bar,
        quiet_library_output,
    )

    imports = logging.getLogger(TRANSFORMERS_IMPORTS_LOGGER)
    kept = list(imports.filters)
    seen: list[str] = []
    collect = logging.Handler()
    collect.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    imports.addHandler(collect)
    previous_hook = transformers_logging.set_tqdm_hook(None)
    try:
        quiet_library_output()
        quiet_library_output()
        assert sum(isinstance(f, TorchvisionFallbackFilter) for f in imports.filters) == 1
        fallback = (
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
            "`CLIPImageProcessorPil` for backward compatibility. Install torchvision to use the "
            "default backend, or import `CLIPImageProcessorPil` directly to silence this warning."
        )
        transformers_logging.get_logger(TRANSFORMERS_IMPORTS_LOGGER).warning(fallback)
        transformers_logging.get_logger(TRANSFORMERS_IMPORTS_LOGGER).warning("a real warning")
        assert seen == ["a real warning"]
        # transformers' own progress bars (save_pretrained's "Writing model shards") are off.
        assert transformers_logging.set_tqdm_hook(no_progress_bar) is no_progress_bar
        bars: list[dict[str, Any]] = []
        bar = no_progress_bar(lambda *args, **kwargs: bars.append(kwargs), ([1, 2],), {"desc": "x"})
        assert bar is None and bars == [{"desc": "x", "disable": True}]
        assert list(transformers_logging.tqdm([1, 2], desc="Writing model shards")) == [1, 2]
    finally:
        imports.removeHandler(collect)
        imports.filters[:] = kept
        transformers_logging.set_tqdm_hook(previous_hook)


@pytest.fixture
def saved_environ() -> Iterator[None]:
    """init_ray sets its defaults in os.environ: put it back as it was."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.usefixtures("saved_environ")
def test_init_ray_quiets_the_console_unless_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from fmray.distributed import console, runtime

    calls: list[str] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append("init"))
    monkeypatch.setattr(console, "quiet_console", lambda: calls.append("quiet"))
    monkeypatch.setattr(runtime, "set_local_env_defaults", lambda: None)
    monkeypatch.setattr(runtime, "disable_data_progress_bars", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    runtime.init_ray()
    assert calls == ["init", "quiet"]
    calls.clear()
    runtime.init_ray(verbose=True)  # logging.verbose=true: Ray's console as Ray prints it
    assert calls == ["init"]


@pytest.mark.usefixtures("saved_environ")
def test_local_instance_says_its_settings_explicitly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Token authentication the way Ray enables it by default (it announces it otherwise), and
    DeepSpeed's CPU accelerator (picked after a warning in every process unless set)."""
    from ray._private.authentication import authentication_token_setup as auth

    from fmray.distributed import runtime

    enabled: list[bool] = []
    monkeypatch.setattr(auth, "_enable_token_auth", lambda: enabled.append(True))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: False)
    runtime.set_local_env_defaults()
    assert enabled == [True]
    assert runtime.worker_env()["DS_ACCELERATOR"] == "cpu"  # the workers get it too
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    runtime.set_local_env_defaults()
    assert enabled == [True]  # the user's choices stay
    assert os.environ["DS_ACCELERATOR"] == "xpu"
    monkeypatch.delenv("DS_ACCELERATOR")
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: True)
    runtime.set_local_env_defaults()
    assert "DS_ACCELERATOR" not in os.environ  # a GPU machine: DeepSpeed finds it


@pytest.mark.usefixtures("saved_environ")
def test_driver_data_context_follows_the_workers_progress_bar_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray.data import DataContext

    from fmray.distributed import runtime

    context = DataContext.get_current()
    monkeypatch.setattr(context, "enable_progress_bars", True)
    monkeypatch.setenv("RAY_DATA_DISABLE_PROGRESS_BARS", "0")  # the user's choice
    runtime.disable_data_progress_bars()
    assert context.enable_progress_bars
    monkeypatch.setenv("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    runtime.disable_data_progress_bars()
    assert not context.enable_progress_bars

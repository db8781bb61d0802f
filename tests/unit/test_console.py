"""Console filter: which forwarded worker lines reach the console (shapes copied from real runs)."""

from __future__ import annotations

import logging
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
    (
        "/home/user/proj/.venv/lib/python3.11/site-packages/ray/data/_internal/execution/operators/"
        "task_pool_map_operator.py:319: UserWarning: The maximum number of concurrent tasks for "
        "'ReadFilesParquetV2->MapBatches(keep_rank_rows)' is set to 2, but the operator only "
        "received 1 input(s).",
        SHOW,
    ),
    ("  warnings.warn(", SHOW),
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


@pytest.mark.parametrize(
    "lines", [TRAINING_RUN, FAILED_WORKER, CONTROLLER, RAY_DATA_RECORDS], ids=lambda _: ""
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


def test_install_wraps_rays_print_handler_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from fmray.distributed.console import RAY_PRINT_HANDLER, install_console_filter

    printed: list[dict[str, Any]] = []
    # Stand in for Ray's handler (a Ray instance of the Ray tests may own the real one).
    monkeypatch.setattr(dispatcher, "handlers", [(RAY_PRINT_HANDLER, printed.append)])
    assert install_console_filter()
    assert not install_console_filter()
    dispatcher.emit(worker_batch(["Requesting resources: {'CPU': 1.0} * 2", "ERROR: x"]))
    assert [batch["lines"] for batch in printed] == [["ERROR: x"]]
    monkeypatch.setattr(dispatcher, "handlers", [])
    assert not install_console_filter()  # log_to_driver=False: nothing to filter


def test_driver_consoles_show_rays_warnings_and_tunes_info() -> None:
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
    assert keep.filter(record("ray.tune.tune", logging.INFO))

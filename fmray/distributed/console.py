"""What reaches the console from Ray: fmray's own lines, warnings, errors and tracebacks.

Ray forwards every worker's stdout/stderr to the driver, where its "ray_print_logs" handler
prints each line behind a `(RayTrainWorker pid=...)` prefix. fmray's progress lines come that
way too (rank 0 writes them), buried in Ray's INFO chatter: Train's reporting lines, Ray Data's
execution plans, DeepSpeed's set-up. `install_console_filter` wraps that handler so that by
default only these lines pass:

- lines starting with `[fmray]`, printed as they are (no worker prefix);
- log records at WARNING or above, and plain lines that name a warning, error or failure;
- Python tracebacks, and the indented lines that continue a line that passed;
- the raylet's and autoscaler's notices (worker deaths, OOM kills, scaling).

A few notices of Ray's and the libraries' internals name a warning but ask nothing of the user
(`BENIGN_WORKER_LINES`, `BENIGN_RAY_NOTICES`, `BENIGN_RECORDS`); they are hidden too, matched by
their source and exact wording so that any other warning or error still shows. Notices that
fmray can avoid at their source are avoided there instead (fmray.distributed.runtime).

Everything stays in Ray's log folder (e.g. /tmp/ray/session_latest/logs); `logging.verbose=true`
prints it all on the console as Ray does.
"""

from __future__ import annotations

import enum
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

FMRAY_PREFIX = "[fmray]"
# Marks ray.experimental.tqdm_ray progress-bar updates, which Ray's handler draws as bars.
RAY_TQDM_MAGIC = "__ray_tqdm_magic_token__"
# Ray's driver-side handler that prints forwarded worker output (ray._private.worker.connect).
RAY_PRINT_HANDLER = "ray_print_logs"
# Driver-side loggers with console handlers ("ray" also prints for ray.train, ray.tune, ...).
CONSOLE_LOGGERS = ("ray", "ray.data")

# The level of a log record as Python logging in Ray / Ray Data (`2026-01-01 10:00:00,123\tINFO
# file.py:12 -- ...`), DeepSpeed (`[2026-01-01 10:00:00,123] [INFO] [...]`) and Ray's C++ core
# (`[2026-01-01 10:00:00,123 E 4815 4815] core_worker.cc:...`) write it.
LOG_RECORD = re.compile(
    r"^\[?\d{4}-\d\d-\d\d[ T][\d:,.]+\]?\s+"
    r"(?:\[(?P<bracketed>[A-Z]+)\]|(?P<word>[A-Z]{4,8})\b|(?P<letter>[DIWEF])\s)"
)
SHOWN_LEVELS = {"WARN", "WARNING", "ERROR", "CRITICAL", "FATAL", "W", "E", "F"}
# In workers Ray Train and Ray Data print records without their level (PlainRayHandler), so a
# plain line passes when it names a problem (Python warnings and tracebacks do too).
PROBLEM = re.compile(
    r"error|exception|warning|traceback|fatal|critical|fail|retry|killed|died", re.IGNORECASE
)

# Worker lines that name a warning but are Ray's or a library's internal notice, each matched by
# its source and wording (the lines that continue one, such as `  warnings.warn(`, follow it).
BENIGN_WORKER_LINES = re.compile(
    "|".join(
        [
            # Ray Data: a read of fewer files than its cap on concurrent tasks (small data sets).
            r"/ray/data/_internal/execution/operators/task_pool_map_operator\.py:\d+: UserWarning: "
            r"The maximum number of concurrent tasks for '.*' is set to \d+, but the operator "
            r"only received \d+ input",
            # transformers: diffusers imports an image processor whose default backend needs
            # torchvision, and transformers uses the PIL one.
            r"^\[transformers\] `\w+ImageProcessor` requires torchvision \(not installed\); "
            r"falling back to `\w+ImageProcessorPil`",
            # Serve's controller as it deploys or deletes an application.
            r"^WARNING [\d-]+ [\d:,]+ controller \d+ -- Cannot deregister autoscaling state for "
            r"deployment .* because it is not registered",
        ]
    )
)
# The raylet's notices that are not a problem of the run: worker processes of short data tasks
# counted against a startup limit, and Serve's controller stopped by `serve.shutdown()` while its
# own graceful shutdown was in flight.
RAY_NOTICE_SOURCES = ("raylet", "autoscaler")
BENIGN_RAY_NOTICES = re.compile(
    r"^WARNING: \d+ PYTHON worker processes have been started on node: .* maximum expected "
    r"startup concurrency"
    r"|^Task ServeController\.graceful_shutdown failed\b.*killed by `ray\.kill`"
)
# Driver log records (logger name prefix, message prefix) of the same kind: Ray Data says that
# progress bars are off, which fmray chose (its own progress line reports the run).
BENIGN_RECORDS = (("ray.data._internal.progress", "Progress bars disabled."),)
# transformers' notice of the same torchvision fallback, on the driver.
TRANSFORMERS_IMPORTS_LOGGER = "transformers.utils.import_utils"
TORCHVISION_FALLBACK = re.compile(
    r"^`\w+ImageProcessor` requires torchvision \(not installed\); falling back to "
    r"`\w+ImageProcessorPil`"
)


class Verdict(enum.Enum):
    FMRAY = "fmray"  # fmray's own line: printed without Ray's prefix
    SHOW = "show"  # printed as Ray prints it
    HIDE = "hide"  # only in Ray's log folder


def line_verdict(line: str, previous: Verdict) -> Verdict:
    """Whether a forwarded worker line reaches the console; `previous` is the source's last."""
    if line.startswith(FMRAY_PREFIX):
        return Verdict.FMRAY
    if RAY_TQDM_MAGIC in line:
        return Verdict.SHOW
    if BENIGN_WORKER_LINES.search(line):
        return Verdict.HIDE
    record = LOG_RECORD.match(line)
    if record is not None:
        level = record.group("bracketed") or record.group("word") or record.group("letter")
        return Verdict.SHOW if level in SHOWN_LEVELS else Verdict.HIDE
    if not line.strip() or line.startswith((" ", "\t")):
        # Continues the line before: a traceback frame, an execution plan, a warning's source,
        # fmray's own multi-line text. (Not "\r": a progress bar redrawing is a line of its own.)
        return previous
    return Verdict.SHOW if PROBLEM.search(line) else Verdict.HIDE


class ConsoleFilter:
    """Wraps Ray's print handler: forwards only the lines `line_verdict` shows."""

    def __init__(self, print_batch: Callable[[dict[str, Any]], None]) -> None:
        self.print_batch = print_batch
        # Last verdict per output stream of each worker, so a traceback split across
        # batches keeps its frames.
        self.previous: dict[tuple[Any, Any, bool], Verdict] = {}

    def __call__(self, batch: dict[str, Any]) -> None:
        if batch.get("pid") in RAY_NOTICE_SOURCES:
            # Ray's own notices (worker deaths, OOM kills, autoscaling), all but the benign ones.
            self.flush(batch, ray_notices(batch))
            return
        source = (batch.get("ip"), batch.get("pid"), bool(batch.get("is_err")))
        previous = self.previous.get(source, Verdict.HIDE)
        shown: list[str] = []
        for line in batch.get("lines", []):
            verdict = line_verdict(line, previous)
            previous = verdict
            if verdict is Verdict.SHOW:
                shown.append(line)
                continue
            self.flush(batch, shown)
            if verdict is Verdict.FMRAY:
                sink = sys.stderr if batch.get("is_err") else sys.stdout
                print(line, file=sink, flush=True)
        self.flush(batch, shown)
        self.previous[source] = previous

    def flush(self, batch: dict[str, Any], lines: list[str]) -> None:
        """Hand the shown lines gathered so far to Ray's handler (keeps the output's order)."""
        if lines:
            self.print_batch({**batch, "lines": list(lines)})
            lines.clear()


def ray_notices(batch: dict[str, Any]) -> list[str]:
    """The lines of a raylet/autoscaler batch that reach the console."""
    return [line for line in batch.get("lines", []) if not BENIGN_RAY_NOTICES.search(line)]


def console_filter_installed() -> bool:
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    return isinstance(dict(dispatcher.handlers).get(RAY_PRINT_HANDLER), ConsoleFilter)


def filtered_error_messages(print_to_stdstream: Callable[..., None]) -> Callable[..., None]:
    """Ray's printer of the errors and warnings the cluster publishes to this driver (the raylet's
    notices come this way, not through the print handler), minus the benign raylet notices
    while the console filter is on."""

    def print_notices(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") in RAY_NOTICE_SOURCES and console_filter_installed():
            lines = ray_notices(data)
            if not lines:
                return
            data = {**data, "lines": lines}
        print_to_stdstream(data, ignore_prefix)

    print_notices.fmray_wraps = print_to_stdstream  # type: ignore[attr-defined]
    return print_notices


def install_console_filter() -> bool:
    """Filter the worker output Ray prints on this driver; False if Ray prints none."""
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    handler = dict(dispatcher.handlers).get(RAY_PRINT_HANDLER)
    if handler is None or isinstance(handler, ConsoleFilter):
        return False
    # Same name, so Ray removes the filter with its own handler when it disconnects.
    dispatcher.remove_handler(RAY_PRINT_HANDLER)
    dispatcher.add_handler(RAY_PRINT_HANDLER, ConsoleFilter(handler))
    # Ray's error listener looks the printer up by name on each message; the wrapper filters
    # only while the print handler above is a ConsoleFilter (not in a later verbose session).
    if not hasattr(ray_worker.print_to_stdstream, "fmray_wraps"):
        ray_worker.print_to_stdstream = filtered_error_messages(ray_worker.print_to_stdstream)
    return True


class RayInfoFilter(logging.Filter):
    """On a console handler: Ray's records at WARNING and above, but for `BENIGN_RECORDS`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        return not any(
            record.name.startswith(name) and str(record.msg).startswith(message)
            for name, message in BENIGN_RECORDS
        )


class TorchvisionFallbackFilter(logging.Filter):
    """On transformers' import logger: drops its notice that an image processor uses PIL."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not TORCHVISION_FALLBACK.match(str(record.msg))


def quiet_driver_loggers() -> None:
    """The driver's console shows Ray's (Ray Data's, Ray Train's) warnings and errors only;
    their log files keep every record."""
    import ray.data  # noqa: F401 - configures the "ray.data" logger, whose handlers follow

    for name in CONSOLE_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            is_console = isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            )
            if is_console and not any(isinstance(f, RayInfoFilter) for f in handler.filters):
                handler.addFilter(RayInfoFilter())


def quiet_library_output() -> None:
    """On the driver: no transformers save/load progress bars, no torchvision-fallback notice.

    Only transformers' own bars (e.g. "Writing model shards"); the Hub's download bars stay.
    """
    imports = logging.getLogger(TRANSFORMERS_IMPORTS_LOGGER)
    if not any(isinstance(f, TorchvisionFallbackFilter) for f in imports.filters):
        imports.addFilter(TorchvisionFallbackFilter())
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    set_hook = getattr(transformers_logging, "set_tqdm_hook", None)
    if set_hook is None:
        return
    previous = set_hook(no_progress_bar)
    if previous is not None and previous is not no_progress_bar:
        set_hook(previous)  # a hook of the user's own stays


def no_progress_bar(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict) -> Any:
    """transformers' tqdm hook: the bar's iterable without the bar."""
    return factory(*args, **{**kwargs, "disable": True})


def quiet_console() -> None:
    """Everything above, on this driver (`init_ray` calls it unless `logging.verbose=true`)."""
    install_console_filter()
    quiet_driver_loggers()
    quiet_library_output()

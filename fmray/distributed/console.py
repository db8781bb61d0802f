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
# Driver-side loggers with console handlers ("ray" also prints for ray.train, ray.serve, ...).
CONSOLE_LOGGERS = ("ray", "ray.data")
# Tune's driver output (trial status, where results went) stays as Ray prints it.
KEEP_INFO_FROM = ("ray.tune",)

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
        if batch.get("pid") in ("raylet", "autoscaler"):
            self.print_batch(batch)  # Ray's own notices (worker deaths, OOM kills, autoscaling)
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


def install_console_filter() -> bool:
    """Filter the worker output Ray prints on this driver; False if Ray prints none."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    handler = dict(dispatcher.handlers).get(RAY_PRINT_HANDLER)
    if handler is None or isinstance(handler, ConsoleFilter):
        return False
    # Same name, so Ray removes the filter with its own handler when it disconnects.
    dispatcher.remove_handler(RAY_PRINT_HANDLER)
    dispatcher.add_handler(RAY_PRINT_HANDLER, ConsoleFilter(handler))
    return True


class RayInfoFilter(logging.Filter):
    """On a console handler: Ray's records at WARNING and above, and Tune's at any level."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.startswith(KEEP_INFO_FROM)


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

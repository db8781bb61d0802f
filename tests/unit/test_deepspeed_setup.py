"""How fmray starts DeepSpeed in a worker: what it imports and the op it finds built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_deepspeed_imports_without_mlflow_and_mlflow_still_imports_after() -> None:
    """Every training worker imports DeepSpeed through `import_deepspeed`: MLflow (DeepSpeed's
    unused autotuner imports it) stays out of the worker, and a run that logs to MLflow still
    imports it afterwards. A fresh interpreter, so nothing this session imported counts."""
    script = (
        "import sys\n"
        "from fmray.distributed.deepspeed_setup import import_deepspeed\n"
        "deepspeed = import_deepspeed()\n"
        "assert deepspeed.initialize and 'mlflow' not in sys.modules, 'mlflow imported'\n"
        "import mlflow\n"
        "assert mlflow.log_metric\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_the_cpu_comm_op_is_built_once_into_the_extensions_cache() -> None:
    """`make install` runs `python -m fmray.distributed.build_ops`, so the first fit on a machine
    finds DeepSpeed's shm-comm op compiled; running it again reuses the built op."""
    done = subprocess.run(
        [sys.executable, "-m", "fmray.distributed.build_ops"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("[fmray] DeepSpeed's CPU comm op is ready"), done.stdout
    built = Path(line.rsplit(": ", 1)[1])
    assert built.is_file() and built.name == "deepspeed_shm_comm.so"
    cache = os.environ.get("TORCH_EXTENSIONS_DIR")
    if cache:
        assert built.is_relative_to(cache)

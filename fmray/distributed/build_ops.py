"""Build DeepSpeed's CPU collectives op once per machine, before the first fit needs it.

On CPU, every DeepSpeed worker loads the shm-comm op (its shared-memory all-reduce) when it
starts; the first start on a machine compiles it into TORCH_EXTENSIONS_DIR, about 40 s on two
cores, while the run's other workers wait. `make install` runs this module, so that compile
happens during installation instead of inside the first training run:

    python -m fmray.distributed.build_ops
"""

from __future__ import annotations

import os
import time

from fmray.distributed.runtime import WORKER_ENV_DEFAULTS


def build_cpu_comm_op() -> str | None:
    """The built op's file, or None where DeepSpeed would not load it either (its accelerator
    is not the CPU: GPU collectives need no JIT op)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", WORKER_ENV_DEFAULTS["TORCH_EXTENSIONS_DIR"])
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    # The condition DeepSpeed's own start-up applies (deepspeed.comm.torch.build_shm_op).
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder.load().__file__


def main() -> None:
    start = time.perf_counter()
    built = build_cpu_comm_op()
    if built is None:
        print("[fmray] no op to build: DeepSpeed does not use its CPU comm op here")
    else:
        seconds = time.perf_counter() - start
        print(f"[fmray] DeepSpeed's CPU comm op is ready ({seconds:.0f} s): {built}")


if __name__ == "__main__":
    main()

"""Fixtures of the unit tier."""

from __future__ import annotations

import os
import socket

import pytest


@pytest.fixture(scope="session")
def single_process_group() -> None:
    """A world of one (gloo) for DeepSpeed engines built in the test process, without Ray."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
        os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        deepspeed.init_distributed(dist_backend="gloo")

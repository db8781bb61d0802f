"""Shared fixtures. Tests run offline, and DeepSpeed's JIT ops build once per machine."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "fmray" / "torch_extensions")
)
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 512-token BPE tokenizer trained on the synthetic corpus."""
    from fmray.data.corpus import generate_corpus
    from fmray.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(generate_corpus(1000, seed=0), 512, out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised (seed 0) tiny preset saved as an HF causal-LM directory."""
    import torch

    from fmray.data.tokenizer import load_tokenizer
    from fmray.models.registry import build_causal_lm

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = build_causal_lm(
        "tiny",
        None,
        vocab_size=len(tokenizer),
        special_tokens={
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
    )
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A local S3-compatible server (moto) with bucket `fmray-test`; yields its endpoint.

    The AWS_* variables are set for this process (pyarrow reads the endpoint from
    AWS_ENDPOINT_URL), and fmray forwards them to Ray's workers when Ray starts after this.
    """
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("the moto S3 server did not start") from None
            time.sleep(0.2)
    for key, value in S3_ENV.items():
        os.environ[key] = value
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    import pyarrow.fs as pafs

    s3 = pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True
    )
    s3.create_dir(S3_BUCKET)
    yield endpoint
    server.terminate()
    server.wait(timeout=30)


S3_BUCKET = "fmray-test"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}

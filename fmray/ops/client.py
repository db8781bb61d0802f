"""The connection to a Ray cluster's job server, shared by `fmray submit` and `fmray jobs`:
its address, the authentication token, the client, following a job, and its exit status.

The job server is the head node's dashboard port (8265 by default): `http://HEAD_IP:8265`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from fmray.config import ConfigError

ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
"""Read in this order when --address is not given (as `ray job` reads them)."""

EXIT_STOPPED = 143
"""Exit status of `fmray submit` / `fmray jobs logs --follow` for a stopped job (128 + SIGTERM,
the signal Ray's job server sends the entrypoint)."""


def job_server_address(address: str | None, prog: str) -> str:
    """--address, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS; `HOST:PORT` gets http://."""
    address = address or next((os.environ[k] for k in ADDRESS_ENV if os.environ.get(k)), None)
    if not address:
        raise ConfigError(
            f"{prog}: no job server address: pass --address http://HEAD_IP:8265 (the head "
            "node's dashboard port) or set RAY_API_SERVER_ADDRESS"
        )
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise ConfigError(
            f"{prog}: --address={address!r} is not a job server URL "
            "(expected http://HEAD_IP:8265, the head node's dashboard port)"
        )
    return address.rstrip("/")


def auth_token() -> str | None:
    """The cluster token the `ray` CLI would use, found by Ray's own loader: RAY_AUTH_TOKEN,
    else the file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token. None when there is no
    token or RAY_AUTH_MODE=disabled; RAY_AUTH_MODE=token without a token is an error."""
    from ray._raylet import AuthenticationTokenLoader

    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled":
        return None
    loader = AuthenticationTokenLoader.instance()
    if loader.has_token(ignore_auth_mode=True):
        return loader.get_raw_token(ignore_auth_mode=True)
    if mode == "token":
        raise ConfigError(
            "fmray: RAY_AUTH_MODE=token but no token found: set RAY_AUTH_TOKEN, or "
            "RAY_AUTH_TOKEN_PATH, or put the cluster's token (`ray get-auth-token` on the head) "
            "in ~/.ray/auth_token"
        )
    return None


def connect(address: str | None, prog: str) -> Any:
    """A JobSubmissionClient for the job server, sending the token when there is one."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # The SDK's INFO lines (websocket closed, uploads) would interleave with the job's logs.
    logging.getLogger("ray.dashboard.modules").setLevel(logging.WARNING)
    url = job_server_address(address, prog)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return JobSubmissionClient(url, headers=headers)
    except AuthenticationError:
        why = "refused this token" if token else "needs a token and none was found"
        raise SystemExit(
            f"{prog}: the job server at {url} {why} (set RAY_AUTH_TOKEN to the output of "
            "`ray get-auth-token` on the head node)"
        ) from None
    except ConnectionError:
        raise SystemExit(
            f"{prog}: no Ray job server answers at {url} (the head node's dashboard port, "
            "8265 by default; is the cluster up and the port reachable?)"
        ) from None


def job_info(client: Any, job_id: str, prog: str) -> Any:
    try:
        return client.get_job_info(job_id)
    except RuntimeError as err:
        if "does not exist" in str(err) or "404" in str(err):
            raise SystemExit(f"{prog}: no job {job_id!r} (`fmray jobs list` shows them)") from None
        raise


def exit_status(info: Any) -> int:
    """0 for SUCCEEDED, the entrypoint's own exit status for FAILED (1 if Ray did not record
    one), EXIT_STOPPED for STOPPED."""
    status = str(info.status.value if hasattr(info.status, "value") else info.status)
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return EXIT_STOPPED
    return info.driver_exit_code or 1


def follow(client: Any, job_id: str, prog: str, out: TextIO | None = None) -> Any:
    """Stream the job's logs until it ends; return its final JobInfo. Ctrl-C propagates."""
    asyncio.run(_tail(client, job_id, out or sys.stdout))
    return wait_until_done(client, job_id, prog)


async def _tail(client: Any, job_id: str, out: TextIO) -> None:
    try:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()
    except RuntimeError as err:  # the log stream broke; the status poll below still finishes
        print(f"[fmray] log stream interrupted ({err}); waiting for the job to end", flush=True)


def wait_until_done(client: Any, job_id: str, prog: str, timeout_s: float | None = None) -> Any:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = job_info(client, job_id, prog)
        if info.status.is_terminal():
            return info
        if deadline is not None and time.monotonic() > deadline:
            return info
        time.sleep(0.5)


def duration(info: Any) -> str:
    if not info.start_time:
        return "-"
    end = info.end_time or time.time() * 1000
    seconds = max(0, round((end - info.start_time) / 1000))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def timestamp(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def job_id_of(info: Any) -> str:
    return info.submission_id or info.job_id or "?"

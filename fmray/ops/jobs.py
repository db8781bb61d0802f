"""`fmray jobs`: the jobs of a Ray cluster's job server (fmray's or any other).

    fmray jobs list --address http://HEAD_IP:8265
    fmray jobs status JOB_ID --address http://HEAD_IP:8265
    fmray jobs logs JOB_ID [--follow] --address http://HEAD_IP:8265
    fmray jobs stop JOB_ID [--no-wait] --address http://HEAD_IP:8265

--address defaults to RAY_API_SERVER_ADDRESS (then RAY_ADDRESS); the token is found as
`fmray submit` finds it. `logs --follow` exits with the job's exit status, as `fmray submit`.
"""

from __future__ import annotations

import argparse
from typing import Any

from fmray.ops import client as jobs_client

PROG = "fmray jobs"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str, with_id: bool = True) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--address", help="job server URL, http://HEAD_IP:8265")
        if with_id:
            sub.add_argument("job_id", help="submission id (`fmray jobs list` shows them)")
        return sub

    action("list", "every job of the cluster, oldest first", with_id=False)
    action("status", "a job's status, entrypoint, times and exit status")
    logs = action("logs", "a job's logs so far")
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    stop = action("stop", "stop a job (SIGTERM to its entrypoint, then SIGKILL)")
    stop.add_argument("--no-wait", action="store_true", help="do not wait for it to end")
    return parser


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    client = jobs_client.connect(args.address, PROG)
    if args.action == "list":
        list_jobs(client)
    elif args.action == "status":
        show_status(jobs_client.job_info(client, args.job_id, PROG))
    elif args.action == "logs":
        logs(client, args.job_id, args.follow)
    else:
        stop(client, args.job_id, wait=not args.no_wait)


def list_jobs(client: Any) -> None:
    jobs = sorted(client.list_jobs(), key=lambda info: info.start_time or 0)
    if not jobs:
        print("[fmray] no jobs on this cluster")
        return
    rows = [("JOB", "STATUS", "STARTED", "DURATION", "ENTRYPOINT")]
    for info in jobs:
        entrypoint = info.entrypoint if len(info.entrypoint) <= 70 else info.entrypoint[:67] + "..."
        rows.append(
            (
                jobs_client.job_id_of(info),
                info.status.value,
                jobs_client.timestamp(info.start_time),
                jobs_client.duration(info),
                entrypoint,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), end=""
        )
        print(f"  {row[4]}")


def show_status(info: Any) -> None:
    status = info.status.value
    if info.status.is_terminal():
        status += f" (exit status {jobs_client.exit_status(info)})"
    rows = [
        ("job", jobs_client.job_id_of(info)),
        ("status", status),
        ("entrypoint", info.entrypoint),
        ("started", jobs_client.timestamp(info.start_time)),
        ("ended", jobs_client.timestamp(info.end_time)),
        ("duration", jobs_client.duration(info)),
    ]
    if info.message:
        rows.append(("message", info.message.strip().splitlines()[-1]))
    for label, value in rows:
        print(f"  {label:<11} {value}")


def logs(client: Any, job_id: str, follow: bool) -> None:
    if not follow:
        jobs_client.job_info(client, job_id, PROG)  # one line if there is no such job
        print(client.get_job_logs(job_id), end="")
        return
    jobs_client.job_info(client, job_id, PROG)
    try:
        info = jobs_client.follow(client, job_id, PROG)
    except KeyboardInterrupt:
        print(f"\n[fmray] stopped following; {job_id} keeps running")
        return
    code = jobs_client.exit_status(info)
    print(f"[fmray] job {job_id} {info.status.value} (exit status {code})")
    raise SystemExit(code)


def stop(client: Any, job_id: str, wait: bool) -> None:
    info = jobs_client.job_info(client, job_id, PROG)
    if info.status.is_terminal():
        print(f"[fmray] {job_id} already ended: {info.status.value}")
        return
    client.stop_job(job_id)
    if not wait:
        print(f"[fmray] asked {job_id} to stop")
        return
    print(f"[fmray] stopping {job_id}", flush=True)
    info = jobs_client.wait_until_done(client, job_id, PROG, timeout_s=120)
    if not info.status.is_terminal():
        raise SystemExit(f"{PROG}: {job_id} is still {info.status.value} after 120 s")
    print(f"[fmray] {job_id} {info.status.value} after {jobs_client.duration(info)}")

"""`fmray submit`: run an fmray command as a job on a Ray cluster, through Ray's job server.

    fmray submit --address http://HEAD_IP:8265 pretrain --config jobs/pretrain/tiny.yaml \\
        run.output_dir=/mnt/shared/runs                      # streams the logs, exits as the job
    fmray submit --address http://HEAD_IP:8265 --no-wait sft --config jobs/sft/tiny.yaml
    fmray submit --dry-run pretrain --config jobs/pretrain/tiny.yaml   # what would be sent
    fmray submit --address http://HEAD_IP:8265 --working-dir . pretrain --config ...  # ship code
    ray job submit --address http://HEAD_IP:8265 --working-dir . -- \\
        fmray pretrain --config jobs/pretrain/tiny.yaml      # the same job through Ray's CLI

The command line is validated here first (a bad key fails before anything is sent). The job's
working_dir holds the config file and every local file or folder the config names by a relative
path (data, a base model, a tune base config), at the same relative paths; absolute paths and
URIs (s3://, gs://) are left for the cluster's nodes to reach. The job runs
`fmray <command> --config FILE [overrides]` on the head node; Ray's token authentication stays
on (the token is found as the `ray` CLI finds it; see fmray.ops.client). Ctrl-C while following
asks whether to stop the job or detach from it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmray.config import ConfigError, merge_layers, read_layers, validate_config
from fmray.ops import client as jobs_client
from fmray.ops.working_dir import (
    check_size,
    folder_bytes,
    human_bytes,
    local_inputs,
    path_bytes,
    relative_inside,
    stage,
)
from fmray.recipes import COMMANDS, Recipe, recipe_config_class

PROG = "fmray submit"
NOT_SUBMITTABLE = ("submit", "jobs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        epilog="Options of `fmray submit` come before the command; what follows it is the "
        "command's own arguments.\nExit status: the job's (0 succeeded, the entrypoint's own "
        f"status if it failed, {jobs_client.EXIT_STOPPED} if it was stopped).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--address", help="job server URL, http://HEAD_IP:8265 (else RAY_API_SERVER_ADDRESS)"
    )
    parser.add_argument(
        "--working-dir",
        help="ship this folder (its .gitignore honoured) instead of the config and its inputs; "
        "fmray code in it is imported before the installed package",
    )
    parser.add_argument("--pip", action="append", default=[], help="pip package (repeatable)")
    parser.add_argument("--requirements", help="requirements.txt to pip-install for the job")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="environment variable of the job (repeatable); KEY alone copies this shell's value",
    )
    parser.add_argument("--job-id", help="submission id (default: <command>-<run name>-<time>)")
    parser.add_argument("--no-wait", action="store_true", help="submit and return at once")
    parser.add_argument(
        "--on-interrupt",
        choices=("ask", "stop", "detach"),
        default="ask",
        help="what Ctrl-C does while following (ask: prompt on a terminal, else detach)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="validate and print the job; submit nothing"
    )
    parser.add_argument("command", help="an fmray command: " + ", ".join(submittable()))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's arguments")
    return parser


def submittable() -> list[str]:
    return [name for name in COMMANDS if name not in NOT_SUBMITTABLE]


@dataclass
class Submission:
    """Everything sent to the job server."""

    entrypoint: str
    submission_id: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    shipped: list[str] = field(default_factory=list)
    """Paths in the working_dir, relative to it (empty: the whole --working-dir folder)."""
    shipped_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    staging: Path | None = None
    """The temporary folder built for the working_dir (removed once submitted)."""


def plan_submission(args: argparse.Namespace, cwd: Path | None = None) -> Submission:
    """Validate the command line and build the job; stages the working_dir when needed."""
    cwd = (cwd or Path.cwd()).resolve()
    command, rest = args.command, list(args.args)
    if command not in COMMANDS or command in NOT_SUBMITTABLE:
        raise ConfigError(
            f"{PROG}: {command!r} is not a command to submit (commands: {', '.join(submittable())})"
        )
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if "--address" in rest or any(a.startswith("--address=") for a in rest):
        raise ConfigError(
            f"{PROG}: put --address before the command (`fmray submit --address "
            f"http://HEAD_IP:8265 {command} ...`); inside a job the command finds its cluster"
        )
    base = Path(args.working_dir).resolve() if args.working_dir else cwd
    if args.working_dir and not base.is_dir():
        raise ConfigError(f"{PROG}: --working-dir={args.working_dir!r} is not a folder")
    config_arg, rest, tree, run_name = parse_command(command, rest)
    notes: list[str] = []
    config_rel = None
    if config_arg is not None:
        config_rel = relative_inside(cwd / config_arg, base if args.working_dir else cwd)
        if config_rel is None:
            if args.working_dir:
                raise ConfigError(
                    f"{PROG}: --config {config_arg} is outside --working-dir {args.working_dir}"
                )
            config_rel = Path(config_arg).name
    inputs = local_inputs(tree, cwd, notes) if tree is not None else {}
    entry = ["fmray", command]
    if config_rel is not None:
        entry += ["--config", str(config_rel)]
    entrypoint = shlex.join(entry + rest)
    runtime_env = build_runtime_env(args, notes)
    submission = Submission(
        entrypoint=entrypoint,
        submission_id=args.job_id or default_job_id(command, run_name),
        runtime_env=runtime_env,
        metadata={"fmray_command": command, "fmray_config": str(config_rel or "")},
        notes=notes,
    )
    if args.working_dir:
        for key, rel in inputs.items():
            if relative_inside(cwd / rel, base) is None:
                raise ConfigError(
                    f"{PROG}: {key}={rel!r} is outside --working-dir {args.working_dir}, so the "
                    "job would not find it; name a path inside it, or one the nodes reach"
                )
        runtime_env["working_dir"] = str(base)
        submission.shipped_bytes = folder_bytes(base)
        return submission
    files = {str(config_rel): cwd / config_arg} if config_arg is not None else {}
    files.update({rel: cwd / rel for rel in inputs.values()})
    if files:
        check_size(files, inputs)
        submission.staging = stage(files)
        runtime_env["working_dir"] = str(submission.staging)
        submission.shipped = sorted(files)
        submission.shipped_bytes = sum(path_bytes(p) for p in files.values())
    return submission


def parse_command(
    command: str, rest: list[str]
) -> tuple[str | None, list[str], dict[str, Any] | None, str | None]:
    """For a recipe: its --config, the other arguments, its validated config as a plain tree
    (defaults included) and its run name. Tools pass their arguments through untouched."""
    recipe = COMMANDS[command]
    if not isinstance(recipe, Recipe):
        return None, rest, None, None
    parser = argparse.ArgumentParser(prog=f"fmray {command}", add_help=False)
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    known, unknown = parser.parse_known_intermixed_args(rest)
    if unknown:
        raise ConfigError(
            f"{PROG}: {command} takes --config FILE and key=value overrides "
            f"(got {' '.join(unknown)})"
        )
    layers = read_layers(known.config, known.overrides)
    config = validate_config(recipe_config_class(command), merge_layers(layers))
    tree = config.model_dump(mode="json")
    run_name = (tree.get("run") or {}).get("name")
    return known.config, list(known.overrides), tree, run_name


def build_runtime_env(args: argparse.Namespace, notes: list[str]) -> dict[str, Any]:
    runtime_env: dict[str, Any] = {}
    pip = list(args.pip)
    if args.requirements:
        path = Path(args.requirements)
        if not path.is_file():
            raise ConfigError(f"{PROG}: --requirements={args.requirements!r} is not a file")
        lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
        pip += [line for line in lines if line]
    if pip:
        runtime_env["pip"] = pip
    env_vars: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not key or not key.replace("_", "").isalnum():
            raise ConfigError(f"{PROG}: --env {item!r} is not KEY=VALUE or KEY")
        if not sep:
            if key not in os.environ:
                raise ConfigError(f"{PROG}: --env {key}: {key} is not set in this shell")
            value = os.environ[key]
        env_vars[key] = value
    if env_vars:
        # fmray's driver passes its own env_vars (worker_env) to ray.init; Ray refuses a key
        # both set unless told that the driver's (here the same values) may win.
        env_vars["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
        runtime_env["env_vars"] = env_vars
    return runtime_env


def default_job_id(command: str, run_name: str | None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in (run_name or command))
    prefix = name if name.startswith(command) else f"{command}-{name}"
    return f"{prefix}-{stamp}-{secrets.token_hex(2)}"


def describe(submission: Submission, address: str | None) -> list[str]:
    shipped = ", ".join(submission.shipped) if submission.shipped else "(nothing)"
    if "working_dir" in submission.runtime_env and not submission.shipped:
        shipped = submission.runtime_env["working_dir"]
    where = f" --address {address}" if address else ""
    lines = [
        f"  entrypoint   {submission.entrypoint}",
        f"  working_dir  {shipped} ({human_bytes(submission.shipped_bytes)})",
    ]
    for key in ("pip", "env_vars"):
        if key in submission.runtime_env:
            value = submission.runtime_env[key]
            shown = sorted(value) if key == "env_vars" else value  # names only, not secrets
            lines.append(f"  {key:<12} {', '.join(shown)}")
    lines += [
        f"  follow       fmray jobs logs --follow {submission.submission_id}{where}",
        f"  stop         fmray jobs stop {submission.submission_id}{where}",
    ]
    return lines + [f"  note         {note}" for note in submission.notes]


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    submission = plan_submission(args)
    try:
        if args.dry_run:
            print(f"[fmray] dry run: would submit {submission.submission_id}")
            print("\n".join(describe(submission, args.address)))
            return
        client = jobs_client.connect(args.address, PROG)
        address = jobs_client.job_server_address(args.address, PROG)
        job_id = client.submit_job(
            entrypoint=submission.entrypoint,
            submission_id=submission.submission_id,
            runtime_env=submission.runtime_env or None,
            metadata=submission.metadata,
        )
    finally:
        if submission.staging is not None:
            shutil.rmtree(submission.staging, ignore_errors=True)
    print(f"[fmray] submitted {job_id} to {address}")
    print("\n".join(describe(submission, address)), flush=True)
    if args.no_wait:
        return
    raise SystemExit(follow_or_interrupt(client, job_id, args.on_interrupt, address))


def follow_or_interrupt(client: Any, job_id: str, on_interrupt: str, address: str) -> int:
    """Stream the logs to the end and return the job's exit status; Ctrl-C stops or detaches."""
    started = time.monotonic()
    try:
        info = jobs_client.follow(client, job_id, PROG)
    except KeyboardInterrupt:
        choice = on_interrupt
        if choice == "ask":
            choice = ask_stop_or_detach(job_id)
        if choice == "detach":
            print(f"\n[fmray] detached; {job_id} keeps running on the cluster")
            print(f"  follow       fmray jobs logs --follow {job_id} --address {address}")
            print(f"  stop         fmray jobs stop {job_id} --address {address}")
            return 0
        print(f"\n[fmray] stopping {job_id}", flush=True)
        client.stop_job(job_id)
        info = jobs_client.wait_until_done(client, job_id, PROG)
    code = jobs_client.exit_status(info)
    status = info.status.value
    took = time.monotonic() - started
    print(f"[fmray] job {job_id} {status} after {took:.0f} s (exit status {code})")
    if status != "SUCCEEDED" and info.message:
        print(f"  message      {info.message.strip().splitlines()[-1]}")
    return code


def ask_stop_or_detach(job_id: str) -> str:
    """On a terminal, ask; otherwise (or on a second Ctrl-C / EOF) detach."""
    if not sys.stdin.isatty():
        return "detach"
    try:
        answer = input(
            f"\n[fmray] stop {job_id} on the cluster, or detach and leave it running? "
            "[s]top / [d]etach (default: detach): "
        )
    except (KeyboardInterrupt, EOFError):
        return "detach"
    return "stop" if answer.strip().lower() in ("s", "stop") else "detach"

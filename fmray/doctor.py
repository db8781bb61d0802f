"""`fmray doctor`: what would break a first run here, and how to fix it.

    fmray doctor                                          # this machine, embedded local Ray
    fmray doctor --address http://HEAD_IP:8265            # ... and a cluster's job server (token)
    fmray doctor --config jobs/pretrain/tiny.yaml         # ... and that config's memory (planner)
    fmray doctor --port 8000 --port 8001 --runs /mnt/runs
    python -m fmray doctor                                # the same as `fmray doctor`

Checks: Python and every installed package against the pins in pyproject.toml (fmray's own
requirements), the torch build (CPU / CUDA) against the GPUs present, DeepSpeed's accelerator and
the JIT extensions cache (TORCH_EXTENSIONS_DIR), Ray (and a cluster's job server with Ray's token
authentication, for --address), free disk for the runs folder, free ports for serving, and a
config's memory per worker through fmray's planner. Each line says ok, warn or FAIL and, when not
ok, how to fix it. Exit status 1 when a check fails (warnings pass), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from fmray.config import ConfigError

GiB = 2**30
MIN_FREE_GIB = 2.0
"""The quickstart's runs take well under 1 GiB; real checkpoints need far more."""
INSTALL_FIX = "make install (or .venv/bin/pip install -e '.[dev]') installs the pinned versions"


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn" or "FAIL"
    detail: str
    fix: str = ""


def ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


# --- Python and packages


def pinned_requirements() -> tuple[str, list[str], list[str]]:
    """(requires-python, core requirements, optional requirements): pyproject.toml of a source
    checkout, else the installed fmray's metadata."""
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text())["project"]
        optional = [r for reqs in project.get("optional-dependencies", {}).values() for r in reqs]
        return project["requires-python"], project["dependencies"], optional
    meta = metadata.metadata("fmray")
    core, optional = [], []
    for req in metadata.requires("fmray") or []:
        (optional if "extra ==" in req else core).append(req.split(";")[0].strip())
    return meta["Requires-Python"] or "", core, optional


def check_python(requires: str) -> Check:
    from packaging.specifiers import SpecifierSet

    version = ".".join(str(v) for v in sys.version_info[:3])
    if requires and not SpecifierSet(requires).contains(version):
        fix = f"use a Python {requires} (e.g. PYTHON=python3.11 make install)"
        return Check("python", "FAIL", f"{version}, fmray needs {requires}", fix)
    return ok("python", f"{version} ({sys.executable})")


def check_packages(core: list[str], optional: list[str]) -> Check:
    """Every pinned package: installed (core ones) at a version its pin allows."""
    from packaging.requirements import Requirement

    problems, checked = [], 0
    for text, required in [(r, True) for r in core] + [(r, False) for r in optional]:
        req = Requirement(text)
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            if required:
                problems.append(f"{req.name} is not installed (pinned {req.specifier})")
            continue
        checked += 1
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name} {version} installed, fmray pins {req.specifier}")
    if problems:
        return Check("packages", "FAIL", "; ".join(problems), INSTALL_FIX)
    return ok("packages", f"{checked} pinned packages at their pinned versions")


# --- torch, GPUs, DeepSpeed


def gpus_present() -> int:
    """NVIDIA GPUs this machine has, from the driver (whatever torch was built for)."""
    return len(list(Path("/dev").glob("nvidia[0-9]*")))


def check_torch(num_gpus: int) -> Check:
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
    detail = f"torch {torch.__version__} ({build} build), {num_gpus} NVIDIA GPU(s) present"
    if num_gpus and not torch.version.cuda:
        fix = "install a CUDA build: pip install torch==2.13.0 --index-url "
        fix += "https://download.pytorch.org/whl/cu128"
        return Check("torch", "FAIL", detail + ": GPUs would go unused", fix)
    if num_gpus and not torch.cuda.is_available():
        fix = "check the NVIDIA driver (nvidia-smi) against torch's CUDA version"
        return Check("torch", "FAIL", detail + ", but torch.cuda.is_available() is False", fix)
    if torch.version.cuda and not num_gpus:
        return Check("torch", "warn", detail + ": runs use the CPU", "a CPU build is 10x smaller")
    return ok("torch", detail)


def check_deepspeed() -> Check:
    import torch

    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except Exception as err:  # noqa: BLE001 - any import failure is the finding
        return Check("deepspeed", "FAIL", f"import deepspeed failed: {err}", INSTALL_FIX)
    accelerator = get_accelerator().device_name()
    detail = f"deepspeed {deepspeed.__version__}, accelerator {accelerator}"
    if torch.cuda.is_available() and accelerator != "cuda":
        fix = "unset DS_ACCELERATOR (or set it to cuda)"
        return Check("deepspeed", "FAIL", detail + " although CUDA is available", fix)
    if accelerator == "cuda" and shutil.which("ninja") is None:
        fix = "pip install ninja (FusedAdam compiles on first use)"
        return Check("deepspeed", "FAIL", detail + "; ninja is missing for its JIT ops", fix)
    note = "CPU runs use torch's AdamW: no op to compile" if accelerator == "cpu" else ""
    return ok("deepspeed", f"{detail}{'; ' + note if note else ''}")


def check_extensions_cache() -> Check:
    """TORCH_EXTENSIONS_DIR: where DeepSpeed's JIT ops (FusedAdam, cpu_adam) are built once."""
    value = os.environ.get("TORCH_EXTENSIONS_DIR")
    name = "extensions cache"
    if not value:
        default = Path.home() / ".cache" / "torch_extensions"
        detail = f"TORCH_EXTENSIONS_DIR unset: ops would be built in torch's default {default}"
        fix = "export TORCH_EXTENSIONS_DIR=$HOME/.cache/fmray/torch_extensions (as make does)"
        return Check(name, "warn", detail, fix)
    path = Path(value)
    if path.exists() and not path.is_dir():
        return Check(name, "FAIL", f"TORCH_EXTENSIONS_DIR={value} is a file", f"rm {value}")
    if not path.exists():
        detail = f"TORCH_EXTENSIONS_DIR={value} does not exist: no op is cached, so each "
        detail += "JIT op compiles on first use (about 50 s each)"
        return Check(name, "warn", detail, f"mkdir -p {value}")
    if not os.access(path, os.W_OK | os.X_OK):
        detail = f"TORCH_EXTENSIONS_DIR={value} is not writable: JIT ops cannot be built"
        return Check(name, "FAIL", detail, f"chmod u+rwx {value} or point it elsewhere")
    cached = sorted(p.name for p in path.rglob("*") if p.suffix == ".so")
    return ok(name, f"{value} ({', '.join(cached) or 'no op built yet'})")


# --- Ray


def check_ray(address: str | None) -> Check:
    """Ray importable; with an address, its job server answers (and accepts our token)."""
    import ray

    if address is None:
        return ok("ray", f"ray {ray.__version__}; runs start an embedded local instance")
    from fmray.ops.client import auth_token, connect

    try:
        token = "with a token" if auth_token() else "without a token"
        client = connect(address, "fmray doctor")
        version = client.get_version()
    except (SystemExit, ConfigError) as err:
        fix = "start the cluster (ray start --head), open port 8265, set RAY_AUTH_TOKEN"
        return Check("ray", "FAIL", str(err).removeprefix("fmray doctor: "), fix)
    except Exception as err:  # noqa: BLE001 - whatever the server answered is the finding
        fix = "check --address (http://HEAD_IP:8265) and RAY_AUTH_TOKEN"
        return Check("ray", "FAIL", f"{address}: {type(err).__name__}: {err}", fix)
    return ok("ray", f"job server {address} answers ({token}), version {version}")


# --- disk, ports, memory


def check_disk(runs: Path, min_free_gib: float) -> Check:
    existing = runs.resolve()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free / GiB
    detail = f"{free:.1f} GiB free for {runs} (on {existing})"
    if free < min_free_gib:
        fix = f"free space there or set run.output_dir to a disk with >= {min_free_gib:g} GiB"
        return Check("disk", "FAIL", f"{detail}, below {min_free_gib:g} GiB", fix)
    return ok("disk", detail)


def check_ports(ports: list[int]) -> Check:
    busy = []
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    listed = ", ".join(str(p) for p in ports)
    if busy:
        taken = ", ".join(str(p) for p in busy)
        fix = f"stop what listens there (lsof -i :{busy[0]}) or serve with serve.port=<free port>"
        return Check("ports", "FAIL", f"port {taken} in use", fix)
    return ok("ports", f"{listed} free for serving")


def check_memory(config_file: str, recipe: str | None, overrides: list[str]) -> Check:
    """The config's per-worker memory against its devices, through fmray's planner."""
    from fmray.config import load_config
    from fmray.recipes import recipe_config_class

    try:
        from fmray.distributed.planner import gib, plan_config, suggestion_text
    except ImportError:
        return Check("memory", "warn", "this fmray has no memory planner", "")
    recipe = recipe or Path(config_file).resolve().parent.name
    try:
        config = load_config(recipe_config_class(recipe), config_file, overrides)
    except (KeyError, ConfigError) as err:
        fix = "name the recipe with --recipe" if isinstance(err, KeyError) else "fix the config"
        return Check("memory", "FAIL", f"{config_file}: {err}", fix)
    plan = plan_config(recipe, config)
    where = f"{recipe} {config_file}: {gib(plan.total)} per worker, {plan.budget_source}"
    if plan.fits is False:
        detail = f"{where} gives {gib(plan.budget or 0)}"
        return Check("memory", "FAIL", detail, suggestion_text(plan))
    if plan.fits is None:
        return Check("memory", "warn", where, "set scaling.device_memory (e.g. 80GiB)")
    return ok("memory", f"{where} gives {gib(plan.budget or 0)}: fits")


# --- the command


def run_checks(args: argparse.Namespace) -> list[Check]:
    requires, core, optional = pinned_requirements()
    checks: list[Callable[[], Check]] = [
        lambda: check_python(requires),
        lambda: check_packages(core, optional),
        lambda: check_torch(gpus_present()),
        check_deepspeed,
        check_extensions_cache,
        lambda: check_ray(args.address or os.environ.get("RAY_ADDRESS")),
        lambda: check_disk(Path(args.runs), args.min_free_gib),
        lambda: check_ports(args.port or [8000]),
    ]
    if args.config:
        checks.append(lambda: check_memory(args.config, args.recipe, args.overrides))
    results = []
    for check in checks:
        result = check()
        print_check(result)
        results.append(result)
    return results


def print_check(check: Check) -> None:
    print(f"  {check.status:<5} {check.name:<17} {check.detail}", flush=True)
    if check.fix:
        print(f"  {'':<5} {'':<17} fix: {check.fix}", flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="fmray doctor", description="Check this environment for what breaks a first run."
    )
    parser.add_argument("--address", help="a Ray cluster's job server, http://HEAD_IP:8265")
    parser.add_argument("--runs", default="runs", help="the runs folder (free disk)")
    parser.add_argument("--min-free-gib", type=float, default=MIN_FREE_GIB)
    parser.add_argument("--port", type=int, action="append", help="a serving port (default 8000)")
    parser.add_argument("--config", help="a training config whose memory to plan")
    parser.add_argument("--recipe", help="its recipe (default: the jobs/<recipe>/ folder)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of --config")
    args = parser.parse_intermixed_args(argv)
    print("[fmray] doctor")
    results = run_checks(args)
    failed = [c.name for c in results if c.status == "FAIL"]
    warned = [c.name for c in results if c.status == "warn"]
    if failed:
        print(f"[fmray] doctor: {len(failed)} check(s) failed: {', '.join(failed)}")
        raise SystemExit(1)
    extra = f" ({len(warned)} warning(s): {', '.join(warned)})" if warned else ""
    print(f"[fmray] doctor: all {len(results)} checks passed{extra}")

"""Ray's own footprint on an embedded local instance: processes and idle CPU, fmray's trimmed
start (no dashboard, no metrics collection, no usage stats) against Ray's full one.

    .venv/bin/python bench/ray_footprint.py              # both, one after the other, ~1 minute

Each variant starts Ray through fmray's `init_ray` (FMRAY_RAY_DASHBOARD=1 for the full one) in
a fresh process, runs one task, waits 3 s, then counts the processes under the driver and the
CPU they use over 10 idle seconds: what a training worker competes with on a small machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
IDLE_S = 10.0


def measure_here() -> dict:
    import psutil
    import ray

    sys.path.insert(0, str(REPO_ROOT))
    from fmray.distributed.runtime import init_ray

    start = time.perf_counter()
    init_ray(None, 1)
    ray.get(ray.remote(lambda: 1).remote())
    started = time.perf_counter() - start
    time.sleep(3)
    children = psutil.Process().children(recursive=True)
    before = {}
    for child in children:
        try:
            before[child.pid] = sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    time.sleep(IDLE_S)
    used = 0.0
    for child in children:
        try:
            used += sum(child.cpu_times()[:2]) - before.get(child.pid, 0.0)
        except psutil.Error:
            pass
    ray.shutdown()
    return {"processes": len(children), "idle_cores": used / IDLE_S, "start_s": started}


def main() -> None:
    if sys.argv[1:] == ["--child"]:
        print(json.dumps(measure_here()))
        return
    results = {}
    for name, full in (("fmray (trimmed)", False), ("full Ray", True)):
        env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
        if full:
            env["FMRAY_RAY_DASHBOARD"] = "1"
        done = subprocess.run(
            [sys.executable, __file__, "--child"], env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    for name, r in results.items():
        print(
            f"{name:<16} {r['processes']:3d} processes, idle CPU {r['idle_cores']:.3f} cores, "
            f"ray.init + first task {r['start_s']:.1f} s"
        )
    trimmed, full = results["fmray (trimmed)"], results["full Ray"]
    print(f"idle CPU ratio trimmed / full: {trimmed['idle_cores'] / full['idle_cores']:.2f}")


if __name__ == "__main__":
    main()

"""Reliability in one table: training and serving faults survived, hostile input refused, load held.

    python bench/reliability.py                       # tiny presets, CPU, ~40 minutes
    python bench/reliability.py --skip-fault-tests    # serving only, ~5 minutes
    python bench/reliability.py --load-seconds 20 --fuzz-examples 60    # a shorter run

Fault rows come from the fault tests themselves (pytest, the `faults` marker and the suite's
kill tests), run here and read back from their JUnit report: ten random worker kills and a
driver kill against the uninterrupted run, a damaged checkpoint and its fallback, disk full,
2 -> 1 -> 2 workers for ZeRO 0/2/3, PPO / GRPO / diffusion worker kills, a Tune driver kill and
a model replica killed under load; each row carries the figures the test recorded.

In-process (the same ASGI app as on Serve, real HTTP, the tiny model's engine): schemathesis
cases from the API's OpenAPI schema, and the hand-written hostile cases of
tests/unit/test_hostile_serve.py, each followed by a normal request. On a local Ray Serve app:
16 closed-loop clients for --load-seconds (streaming or not, 1-48 new tokens, greedy or
sampled) with latency percentiles; a burst far beyond max_ongoing + max_queued (how fast the
refusals come and whether they carry Retry-After); and 100 streams dropped after their first
chunk (how long until the replica's batch is empty, and the tokens generated meanwhile).
Failures are printed in the table and make the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

API_KEY = "sk-fmray-bench"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PORT = 8791


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--fuzz-examples", type=int, default=220, help="per operation and mode")
    parser.add_argument("--streams", type=int, default=100, help="streams dropped mid-way")
    parser.add_argument("--skip-fault-tests", action="store_true", help="serving rows only")
    return parser.parse_args()


def tiny_model(folder: Path) -> Path:
    """The tiny preset (seed 0) with a BPE tokenizer trained on the synthetic corpus."""
    import torch

    from fmray.data.corpus import generate_corpus
    from fmray.data.tokenizer import load_tokenizer, train_tokenizer
    from fmray.models.registry import build_causal_lm

    train_tokenizer(generate_corpus(1000, seed=0), 512, folder / "tokenizer")
    tokenizer = load_tokenizer(folder / "tokenizer")
    torch.manual_seed(0)
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    model = build_causal_lm("tiny", None, vocab_size=len(tokenizer), special_tokens=special)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return folder / "model"


def in_process_rows(model_dir: Path, fuzz_examples: int) -> list[tuple[str, str, bool]]:
    from fmray.config import validate_config
    from fmray.serve.app import InProcessAPI, ServeConfig
    from tests.unit.test_hostile_fuzz import fuzz_api
    from tests.unit.test_hostile_serve import HOSTILE

    config = {
        "models": {"tiny": {"path": str(model_dir)}},
        "engine": {"max_model_len": 64},
        "serve": {"api_key": API_KEY},
    }
    api = InProcessAPI(validate_config(ServeConfig, config))
    rows = []
    with api.http_server() as base, httpx.Client(base_url=base, headers=AUTH, timeout=60) as http:
        start = time.monotonic()
        report = fuzz_api(base, AUTH, ["tiny"], fuzz_examples)
        seconds = time.monotonic() - start
        rows.append(
            (
                "fuzzed requests (schemathesis)",
                f"{report.line()}, {seconds:.0f}s",
                not report.failures,
            )
        )
        wrong, unhealthy = [], 0
        for what, args, status, code, *_ in HOSTILE:
            args = dict(args)
            method, url = args.pop("method", "POST"), args.pop("url", "/v1/completions")
            response = http.request(method, url, **args)
            error = response.json().get("error", {}) if response.status_code >= 400 else {}
            if (response.status_code, error.get("code")) != (status, code):
                wrong.append(f"{what}: {response.status_code}")
            ok = {"model": "tiny", "prompt": "Anton", "max_tokens": 2}
            unhealthy += http.post("/v1/completions", json=ok).status_code != 200
        detail = f"{len(HOSTILE)} cases, {len(HOSTILE) - len(wrong)} with the expected 4xx"
        detail += f", {unhealthy} following requests failed" + (f" ({wrong})" if wrong else "")
        rows.append(("hostile requests, then a normal one", detail, not wrong and not unhealthy))
    api.close()
    return rows


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def load_row(base: str, clients: int, seconds: float) -> tuple[str, str, bool]:
    """Closed-loop clients, each with its own mix of streaming, lengths and sampling."""
    latencies, failures = [], []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(base_url=base, headers=AUTH, timeout=120) as http:
            while time.monotonic() < stop_at:
                body = {
                    "model": "tiny",
                    "prompt": rng.choice(
                        ["Anton", "Hugo lives in Rome. Hugo has a", "30 minus 8 is"]
                    ),
                    "max_tokens": rng.randint(1, 48),
                    "temperature": rng.choice([0.0, 0.7, 1.0]),
                    "stream": rng.random() < 0.5,
                }
                start = time.monotonic()
                response = http.post("/v1/completions", json=body)
                ok = response.status_code == 200 and (
                    not body["stream"] or response.text.rstrip().endswith("data: [DONE]")
                )
                with lock:
                    (latencies if ok else failures).append(time.monotonic() - start)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    p = [percentile(latencies, q) * 1000 for q in (0.5, 0.9, 0.99)] if latencies else [0, 0, 0]
    detail = (
        f"{clients} clients x {seconds:.0f}s: {len(latencies)} ok, {len(failures)} failed; "
        f"latency p50 {p[0]:.0f} ms, p90 {p[1]:.0f} ms, p99 {p[2]:.0f} ms"
    )
    return ("load (mixed streaming, lengths, sampling)", detail, not failures and bool(latencies))


def overload_row(base: str) -> tuple[str, str, bool]:
    body = {"model": "tiny", "prompt": "Emma", "max_tokens": 90}

    def post(_: int) -> tuple[int, float, str | None]:
        start = time.monotonic()
        response = httpx.post(f"{base}/v1/completions", json=body, headers=AUTH, timeout=300)
        return response.status_code, time.monotonic() - start, response.headers.get("Retry-After")

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(post, range(64)))
    refused = [a for a in answers if a[0] in (429, 503)]
    other = [a for a in answers if a[0] not in (200, 429, 503)]
    slowest = max((s for _, s, _ in refused), default=0.0)
    with_retry = sum(r is not None for *_, r in refused)
    detail = (
        f"64 at once (16 ongoing + 16 queued allowed): {len(answers) - len(refused)} served, "
        f"{len(refused)} refused ({with_retry} with Retry-After), slowest refusal {slowest:.2f}s, "
        f"{len(other)} other"
    )
    return (
        "overload beyond max_queued_requests",
        detail,
        bool(refused) and not other and slowest < 5,  # as tests/ray/test_hostile_serve.py
    )


def disconnect_row(base: str, streams: int) -> tuple[str, str, bool]:
    def health() -> dict:
        return httpx.get(f"{base}/health", timeout=30).json()["models"]["tiny"]

    before = health()["generated_tokens"]
    body = {"model": "tiny", "prompt": "Emma", "max_tokens": 80, "stream": True}

    def open_and_drop(_: int) -> bool:
        try:
            with httpx.stream(
                "POST", f"{base}/v1/completions", json=body, headers=AUTH, timeout=120
            ) as response:
                if response.status_code != 200:
                    return False
                return any(line.startswith("data: ") for line in response.iter_lines())
        except httpx.HTTPError:
            return False

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:  # 8 at a time, below the replica's max_ongoing_requests
        opened = sum(pool.map(open_and_drop, range(streams)))
    dropped_at = time.monotonic()
    while health()["live"] > 0 and time.monotonic() - dropped_at < 60:
        time.sleep(0.1)
    empty_after = time.monotonic() - dropped_at
    generated = health()["generated_tokens"] - before
    detail = (
        f"{opened} of {streams} streams dropped after their first chunk "
        f"in {dropped_at - start:.1f}s; "
        f"batch empty {empty_after:.1f}s later; {generated} of {streams * 80} tokens generated"
    )
    ok = opened == streams and health()["live"] == 0 and generated < streams * 80 / 2
    return ("client disconnects mid-stream", detail, ok)


def serve_rows(model_dir: Path, args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance
    import ray
    from ray import serve

    from fmray.config import validate_config
    from fmray.serve.app import ServeConfig, build_application

    config = validate_config(
        ServeConfig,
        {
            "models": {"tiny": {"path": str(model_dir)}},
            # Room for the load row's 16 clients (16 ongoing, one batch of 8 and 8 waiting; Serve
            # counts requests still being assigned to the replica as queued, so the queue is not
            # tiny); the 64-request burst is well beyond 16 + 16.
            "engine": {"max_batch_size": 8, "max_waiting": 8},
            "deployment": {"num_cpus": 1, "max_ongoing_requests": 16, "max_queued_requests": 16},
            "serve": {"port": PORT, "api_key": API_KEY},
        },
    )
    ray.init(num_cpus=3, configure_logging=False, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_application(config), name="fmray-reliability", route_prefix="/")
    base = f"http://127.0.0.1:{PORT}"
    try:
        return [
            load_row(base, args.clients, args.load_seconds),
            overload_row(base),
            disconnect_row(base, args.streams),
        ]
    finally:
        serve.shutdown()
        ray.shutdown()


# (row, pytest node id): the fault tests whose outcome and recorded figures make a row each.
FAULT_TESTS = [
    (
        "10 random worker kills + driver kill (pretrain)",
        "tests/ray/test_pretrain.py::"
        "test_ten_random_kills_and_a_killed_driver_equal_the_uninterrupted_run",
    ),
    (
        "damaged checkpoint, fallback, worker kill (pretrain)",
        "tests/ray/test_pretrain.py::test_cli_resume_and_killed_worker_equal_the_uninterrupted_run",
    ),
    *(
        (
            f"2 -> 1 -> 2 workers, ZeRO-{stage}",
            f"tests/ray/test_pretrain.py::test_worker_count_changes_2_1_2[{stage}]",
        )
        for stage in (0, 2, 3)
    ),
    (
        "disk full while checkpointing",
        "tests/unit/test_training_faults.py::"
        "test_disk_full_stops_the_save_and_keeps_the_previous_checkpoint",
    ),
    (
        "damaged / partial checkpoint files named",
        "tests/unit/test_training_faults.py::test_a_truncated_or_corrupted_file_is_named_never_loaded",
    ),
    (
        "PPO worker kill",
        "tests/ray/test_rl.py::test_ppo_with_reward_model_zero3_survives_a_killed_worker",
    ),
    (
        "GRPO worker kill vs uninterrupted",
        "tests/ray/test_rl.py::test_grpo_killed_worker_group_resumes_as_the_uninterrupted_run",
    ),
    (
        "diffusion worker kill vs uninterrupted",
        "tests/ray/test_diffusion_faults.py::"
        "test_killed_worker_group_resumes_as_the_uninterrupted_run",
    ),
    (
        "Tune driver killed mid-search",
        "tests/ray/test_tune_plumbing.py::"
        "test_search_whose_driver_is_killed_resumes_with_the_same_command",
    ),
    (
        "model replica killed under load (16 OpenAI clients)",
        "tests/ray/test_serve_faults.py::test_a_killed_replica_under_load_loses_under_one_percent",
    ),
]


def fault_test_rows() -> list[tuple[str, str, bool]]:
    """Runs the fault tests in one pytest session and reads their outcomes and figures back."""
    import subprocess
    import xml.etree.ElementTree as ET

    with tempfile.TemporaryDirectory(prefix="fmray-faults-") as folder:
        report = Path(folder) / "faults.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        command += ["-m", "faults or not faults", f"--junitxml={report}"]
        command += [node for _, node in FAULT_TESTS]
        print(f"[bench] running {len(FAULT_TESTS)} fault tests (tens of minutes) ...", flush=True)
        subprocess.run(command, cwd=REPO_ROOT, check=False)
        cases = {}
        if report.exists():
            for case in ET.parse(report).getroot().iter("testcase"):
                module = case.get("classname", "").replace(".", "/") + ".py"
                cases[f"{module}::{case.get('name')}"] = case
    rows = []
    for name, node in FAULT_TESTS:
        case = cases.get(node)
        if case is None:
            rows.append((name, "did not run", False))
            continue
        failure = case.find("failure")
        if failure is None:  # an Element without children is falsy: compare with None
            failure = case.find("error")
        skipped = case.find("skipped")
        figures = "; ".join(p.get("value", "") for p in case.iter("property"))
        seconds = float(case.get("time", 0))
        if failure is not None:
            detail = f"FAILED: {failure.get('message', '')[:160]}"
        elif skipped is not None:
            detail = f"skipped: {skipped.get('message', '')[:160]}"
        else:
            detail = f"{figures or 'passed'} ({seconds:.0f} s)"
        rows.append((name, detail, failure is None and skipped is None))
    return rows


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fmray-reliability-") as folder:
        model_dir = tiny_model(Path(folder))
        rows = in_process_rows(model_dir, args.fuzz_examples) + serve_rows(model_dir, args)
    if not args.skip_fault_tests:
        rows += fault_test_rows()
    print("\n| check | result | ok |\n| --- | --- | --- |")
    for name, detail, ok in rows:
        print(f"| {name} | {detail} | {'yes' if ok else 'NO'} |")
    print(json.dumps({"failed": [name for name, _, ok in rows if not ok]}))
    raise SystemExit(0 if all(ok for *_, ok in rows) else 1)


if __name__ == "__main__":
    main()

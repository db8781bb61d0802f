"""LLM serving: fmray's engine vs per-request `generate` vs transformers' continuous batching.

    python bench/serve_llm.py                          # tiny preset, CPU, ~3 minutes
    python bench/serve_llm.py --preset small --max-tokens 64 --threads 2
    python bench/serve_llm.py --model exported/my-model --skip-http

One process, one model directory, one workload: closed-loop clients at concurrency 1, 4 and 16,
each sending greedy requests (prompts of 8-96 tokens, exactly --max-tokens new tokens, EOS
ignored) back to back. Per engine and concurrency: generated tokens/s, p50/p99 latency and time
to first token. (a) `generate` serves one request at a time (a request waits for the ones before
it); (b) transformers' ContinuousBatchingManager gets the same requests as they arrive.
Then the HTTP overhead: p50 latency of the same small request through Ray Serve (proxy ->
ingress -> model replica) minus the in-process `LLMServer` call. Targets: >= 8x (a) at 16,
ahead of (b), HTTP overhead p50 <= 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# One request: (prompt ids) -> awaitable (time of the first token, generated token ids)
Runner = Callable[[list[int]], Awaitable[tuple[float, list[int]]]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="random-init preset (tiny, small)")
    parser.add_argument("--model", help="an HF model directory instead of a preset")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, all engines")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (HTTP part: CPU only)")
    parser.add_argument("--http-requests", type=int, default=40)
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--port", type=int, default=8799)
    return parser.parse_args()


def build_model_dir(preset: str, out: Path) -> Path:
    """A random-init preset with fmray's BPE tokenizer, saved as an HF directory."""
    from fmray.data.corpus import generate_corpus
    from fmray.data.tokenizer import train_tokenizer
    from fmray.models.registry import build_causal_lm

    tokenizer = train_tokenizer(generate_corpus(1000, seed=0), 512, out)
    torch.manual_seed(0)
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    build_causal_lm(preset, None, len(tokenizer), special).save_pretrained(out)
    return out


def make_prompts(model_dir: Path, num: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from fmray.data.corpus import generate_corpus

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = generate_corpus(num, seed=1)
    return [tokenizer(t)["input_ids"][: 8 + (i * 37) % 89] for i, t in enumerate(texts)]


def load(model_dir: Path, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.to(device).eval()


@dataclass
class Level:
    concurrency: int
    tokens_per_s: float
    latency: list[float]
    ttft: list[float]
    outputs: dict[int, list[int]]
    """Generated ids by prompt index, to check that the engines agree."""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def closed_loop(run: Runner, prompts: list[list[int]], concurrency: int, per: int) -> Level:
    """`concurrency` clients, each sending `per` requests back to back."""
    latency, ttft, outputs = [], [], {}

    async def client(c: int) -> None:
        for k in range(per):
            index = (c * per + k) % len(prompts)
            start = time.perf_counter()
            first, out = await run(prompts[index])
            latency.append(time.perf_counter() - start)
            ttft.append(first - start)
            outputs[index] = out

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    tokens = sum(len(out) for out in outputs.values())
    return Level(concurrency, tokens / (time.perf_counter() - start), latency, ttft, outputs)


def fmray_runner(model: torch.nn.Module, max_tokens: int, context_len: int):
    from fmray.generation.engine import LLMEngine
    from fmray.generation.sampling import SamplingParams

    engine = LLMEngine(model, context_len, max_batch_size=16)
    engine.start()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    async def run(ids: list[int]) -> tuple[float, list[int]]:
        first, out = 0.0, []
        async for event in engine.generate(ids, params):
            first = first or time.perf_counter()
            out.append(event.token_id)
        return first, out

    return run, engine.shutdown


def generate_runner(model: torch.nn.Module, max_tokens: int):
    """One worker thread running `generate` per request, first come first served."""
    lock = threading.Lock()

    class FirstToken:
        def __init__(self) -> None:
            self.calls, self.time = 0, 0.0

        def put(self, _: torch.Tensor) -> None:  # first call: the prompt; second: token 1
            self.calls += 1
            if self.calls == 2:
                self.time = time.perf_counter()

        def end(self) -> None:
            pass

    def generate(ids: list[int]) -> tuple[float, list[int]]:
        streamer = FirstToken()
        with lock, torch.inference_mode():
            out = model.generate(
                torch.tensor([ids], device=model.device),
                max_new_tokens=max_tokens,
                eos_token_id=None,  # like the others: exactly max_tokens, EOS is a token
                do_sample=False,
                streamer=streamer,
            )
        return streamer.time, out[0, len(ids) :].tolist()

    async def run(ids: list[int]) -> tuple[float, list[int]]:
        return await asyncio.to_thread(generate, ids)

    return run, lambda: None


def transformers_cb_runner(model: torch.nn.Module, max_tokens: int, max_prompt: int):
    """transformers' ContinuousBatchingManager, sized for this workload (its CPU auto-sizing
    allocates most of RAM for the paged cache and takes seconds per start)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page = 64
    blocks_per_request = -(-(max_prompt + max_tokens) // page)
    cb_config = ContinuousBatchingConfig(
        page_size=page,
        num_blocks=16 * blocks_per_request + 8,
        max_batch_tokens=1024,
        max_requests_per_batch=16,
        use_async_batching=False,
        allow_block_sharing=False,
    )
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1)
    manager = model.init_continuous_batching(config, cb_config)
    manager.start()
    counter = iter(range(10**9))

    async def run(ids: list[int]) -> tuple[float, list[int]]:
        done, state = asyncio.Event(), {"first": 0.0, "out": []}
        request_id = f"req{next(counter)}"

        def on_output(output) -> None:
            state["first"] = state["first"] or time.perf_counter()
            if output.is_finished():
                state["out"] = list(output.generated_tokens)
                done.set()

        manager.register_result_handler(request_id, on_output)
        manager.add_request(ids, request_id, max_tokens, streaming=True)
        await done.wait()
        return state["first"], state["out"]

    return run, lambda: manager.stop(block=True, timeout=10)


def measure(name: str, make: Callable, prompts, levels: list[int], per: int) -> list[Level]:
    run, close = make()
    results = []
    try:
        # Warm-up at the largest batch and alone: first runs pay allocator growth, page faults
        # and clock ramp-up, which would otherwise land on whichever engine is measured first.
        asyncio.run(closed_loop(run, prompts, max(levels), 1))
        asyncio.run(closed_loop(run, prompts, 1, 2))
        for c in levels:
            level = asyncio.run(closed_loop(run, prompts, c, per))
            results.append(level)
            print(
                f"[bench] {name:<16} c={c:<3} {level.tokens_per_s:8.0f} tok/s  "
                f"p50 {pct(level.latency, 0.5) * 1e3:7.1f} ms  "
                f"ttft p50 {pct(level.ttft, 0.5) * 1e3:7.1f} ms",
                flush=True,
            )
    finally:
        close()
    return results


def http_overhead(model_dir: Path, num: int, port: int) -> dict[str, float]:
    """p50 latency (ms) of one small greedy completion in-process and through Ray Serve, and of
    empty Serve apps (1 and 2 hops) as the floor Serve itself sets, all in this run."""
    import httpx

    from fmray.serve.llm import LLMServer
    from fmray.serve.schemas import CompletionRequest

    body = {"model": "bench", "prompt": "Anton has a purple dog.", "max_tokens": 8}
    body["temperature"] = 0.0
    base = start_serve(model_dir, port)
    server = LLMServer.load("bench", str(model_dir)).start()

    async def in_process() -> list[float]:
        times = []
        for _ in range(num):
            start = time.perf_counter()
            await server.completion(CompletionRequest.model_validate(body))
            times.append(time.perf_counter() - start)
        return times

    p50 = {"in-process": pct(asyncio.run(in_process()), 0.5)}
    server.shutdown()
    calls = {"fmray": "/v1/completions", "empty 1 hop": "/null/one", "empty 2 hops": "/null/two"}
    times: dict[str, list[float]] = {name: [] for name in calls}
    with httpx.Client(base_url=base, timeout=60) as http:
        for i in range(num + 5):  # interleaved, so load changes hit all three alike
            for name, path in calls.items():
                start = time.perf_counter()
                http.post(path, json=body).raise_for_status()
                if i >= 5:  # the first rounds warm up
                    times[name].append(time.perf_counter() - start)
    p50.update({name: pct(values, 0.5) for name, values in times.items()})
    return {name: value * 1e3 for name, value in p50.items()}


def start_serve(model_dir: Path, port: int) -> str:
    """fmray's app at / and an empty two-deployment FastAPI app at /null."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from fastapi import FastAPI
    from ray import serve

    from fmray.config import validate_config
    from fmray.serve.app import ServeConfig, build_application

    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    config = validate_config(
        ServeConfig, {"models": {"bench": {"path": str(model_dir)}}, "serve": {"port": port}}
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_application(config), name="bench", route_prefix="/")
    null = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Leaf:
        async def __call__(self, body: dict) -> dict:
            return {"ok": True}

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    @serve.ingress(null)
    class Front:
        def __init__(self, leaf) -> None:
            self.leaf = leaf

        @null.post("/one")
        async def one(self, body: dict) -> dict:
            return {"ok": bool(body)}

        @null.post("/two")
        async def two(self, body: dict) -> dict:
            return await self.leaf.remote(body)

    serve.run(Front.bind(Leaf.bind()), name="null", route_prefix="/null")
    return f"http://127.0.0.1:{port}"


def agreement(levels: list[Level], reference: list[Level]) -> str:
    """How many requests produced exactly the reference's greedy tokens."""
    same = total = 0
    for level, ref in zip(levels, reference, strict=True):
        for index, out in level.outputs.items():
            total += 1
            same += out == ref.outputs[index]
    return f"{same}/{total}"


def report(results: dict[str, list[Level]], http: dict[str, float] | None) -> None:
    ours, seq, cb = results["fmray engine"], results["generate (a)"], results["transformers CB (b)"]
    print(
        f"\n[bench] greedy outputs equal to generate's: fmray {agreement(ours, seq)}, "
        f"transformers CB {agreement(cb, seq)}"
    )
    print("[bench] summary (generated tok/s; latency and TTFT p50 / p99 in ms)")
    for name, levels in results.items():
        for lv in levels:
            print(
                f"  {name:<20} c={lv.concurrency:<3} {lv.tokens_per_s:8.0f} tok/s  "
                f"lat {pct(lv.latency, 0.5) * 1e3:7.1f} / {pct(lv.latency, 0.99) * 1e3:7.1f}  "
                f"ttft {pct(lv.ttft, 0.5) * 1e3:7.1f} / {pct(lv.ttft, 0.99) * 1e3:7.1f}"
            )
    for a, s, b in zip(ours, seq, cb, strict=True):
        print(
            f"  c={a.concurrency:<3} fmray / generate = {a.tokens_per_s / s.tokens_per_s:5.2f}x   "
            f"fmray / transformers CB = {a.tokens_per_s / b.tokens_per_s:5.2f}x"
        )
    if http is not None:
        overhead = http["fmray"] - http["in-process"]
        print(
            f"  HTTP overhead p50 = {overhead:.1f} ms (Ray Serve {http['fmray']:.1f} ms vs "
            f"in-process {http['in-process']:.1f} ms); Serve's own floor in this run: empty "
            f"app {http['empty 1 hop']:.1f} ms (1 hop), {http['empty 2 hops']:.1f} ms (2 hops)"
        )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_model_dir(args.preset, Path(tmp))
        name = args.model or f"{args.preset} preset"
        print(f"[bench] model {name}, {args.device}, torch threads {args.threads}")
        prompts = make_prompts(model_dir, 64)
        model = load(model_dir, args.device)
        context = model.config.max_position_embeddings
        per, max_tokens = args.requests_per_client, args.max_tokens
        results = {
            "fmray engine": measure(
                "fmray engine",
                lambda: fmray_runner(model, max_tokens, context),
                prompts,
                levels,
                per,
            ),
            "generate (a)": measure(
                "generate (a)", lambda: generate_runner(model, max_tokens), prompts, levels, per
            ),
            "transformers CB (b)": measure(
                "transformers CB",
                lambda: transformers_cb_runner(load(model_dir, args.device), max_tokens, 96),
                prompts,
                levels,
                per,
            ),
        }
        http = None
        if not args.skip_http:
            http = http_overhead(model_dir, args.http_requests, args.port)
        report(results, http)


if __name__ == "__main__":
    main()

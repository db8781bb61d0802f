"""RL rollouts: fmray's batched KV-cache generation vs batched HF `generate` vs no KV cache.

    python bench/rollout.py                            # tiny preset, CPU, about 2 minutes
    python bench/rollout.py --preset small --threads 2
    python bench/rollout.py --device cuda --preset llama-125m --prompts 64 --max-new-tokens 256

One process, one model, one workload shaped like a GRPO step: --prompts instructions of the
built-in task's train split, rendered with the chat template, each sampled --samples times
(temperature 1.0, top-p 1.0, one seed per sequence) for up to --max-new-tokens tokens. The model
is a preset (random init, torch seed 0) saved with save_pretrained and reloaded, as a user's
model is; nothing is downloaded. Three methods generate the same rows:

  fmray      LLMEngine.generate_batch, what RL rollouts call (all rows in one batch by default)
  generate   HF model.generate over the whole batch: left-padded, attention mask, KV cache
  no cache   a batched loop that re-runs the full forward over the growing rows for each token

Two variants: "stop" ends a row at EOS or <|im_end|> (its tokens count up to and including the
stop; generate's padding after a stop does not count, its time does), and "fixed" has no stop
tokens, so every row generates exactly --max-new-tokens on every method (an untrained model
rarely emits its stop token, so this is the like-for-like figure). Each method is warmed up
once and a greedy pass checks that the three compute the same tokens; then, per variant, the
methods take turns for --repeats timed runs (same seeds each time, so the same tokens), and the
median time counts. Goals: fmray ahead of batched generate, and >= 5x no cache.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# rows of generated token ids, each cut after its first stop token
Method = Callable[[bool, float], list[list[int]]]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="random-init preset (tiny, small, ...)")
    parser.add_argument("--prompts", type=int, default=16, help="distinct prompts per step")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (GRPO's G)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
    parser.add_argument("--max-batch-size", type=int, default=0, help="fmray's (0: all rows)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--json", help="also write the results to this file")
    return parser.parse_args()


def build_tokenizer(out: Path):
    """fmray's 512-token BPE on the synthetic corpus, as the tests build it."""
    from fmray.data.corpus import generate_corpus

    texts = generate_corpus(1000, seed=0)
    try:
        from fmray.data.tokenizer import train_tokenizer
    except ModuleNotFoundError:  # fmray.config needs pydantic: absent where only torch is
        return train_bare_tokenizer(texts, 512, out)
    return train_tokenizer(texts, 512, out)


def train_bare_tokenizer(texts: list[str], vocab_size: int, out: Path):
    """The same byte-level BPE and special tokens as fmray.data.tokenizer, without fmray.config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    tokenizer.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=specials[0], pad_token=specials[1]
    )
    wrapped.save_pretrained(str(out))
    return wrapped


def build_model_dir(preset: str, out: Path) -> Path:
    """A random-init preset (torch seed 0) and its tokenizer, saved as an HF directory."""
    from fmray.models.registry import build_causal_lm

    tokenizer = build_tokenizer(out)
    torch.manual_seed(0)
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    build_causal_lm(preset, None, len(tokenizer), special).save_pretrained(out)
    return out


def make_prompts(tokenizer, num_prompts: int, num_samples: int) -> list[list[int]]:
    """The first prompts of the instruction task's train split, each repeated per sample."""
    from fmray.data.chat_template import render_chat
    from fmray.data.instructions import build_task

    examples = build_task().train
    if num_prompts > len(examples):
        raise SystemExit(f"--prompts {num_prompts}: the task has {len(examples)} train prompts")
    examples = examples[:num_prompts]
    texts = [render_chat(tokenizer, [{"role": "user", "content": e.prompt}]) for e in examples]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [row for row in ids for _ in range(num_samples)]


def cut_at_stop(rows: list[list[int]], stops: set[int]) -> list[list[int]]:
    """Each row up to and including its first stop token (what a rollout keeps and counts)."""
    out = []
    for row in rows:
        end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        out.append(row[:end])
    return out


def left_padded(prompts: list[list[int]], pad: int, device: str):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def fmray_method(model, prompts, max_new: int, stops: list[int], max_batch: int) -> Method:
    from fmray.generation.engine import LLMEngine
    from fmray.generation.sampling import SamplingParams

    engine = LLMEngine(model, model.config.max_position_embeddings, max_batch or len(prompts))

    def run(use_stops: bool, temperature: float) -> list[list[int]]:
        params = [
            SamplingParams(
                max_tokens=max_new,
                temperature=temperature,
                seed=1000 + i,
                stop_token_ids=tuple(stops) if use_stops else (),
            )
            for i in range(len(prompts))
        ]
        results = engine.generate_batch(prompts, params)
        return [[event.token_id for event in events] for events in results]

    return run


def generate_method(model, prompts, max_new: int, stops: list[int], pad: int) -> Method:
    ids, mask = left_padded(prompts, pad, str(model.device))

    def run(use_stops: bool, temperature: float) -> list[list[int]]:
        torch.manual_seed(1000)  # generate draws from the global generator: one seed per batch
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new,
                eos_token_id=stops if use_stops else None,
                pad_token_id=pad,
                use_cache=True,
                **(sampling if temperature > 0 else {"do_sample": False}),
            )
        return cut_at_stop(out[:, ids.shape[1] :].tolist(), set(stops) if use_stops else set())

    return run


def no_cache_method(model, prompts, max_new: int, stops: list[int], pad: int) -> Method:
    ids, mask = left_padded(prompts, pad, str(model.device))
    stop_ids = torch.tensor(stops, device=model.device)

    @torch.inference_mode()
    def run(use_stops: bool, temperature: float) -> list[list[int]]:
        generator = torch.Generator(device=model.device).manual_seed(1000)
        tokens, attention = ids, mask
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=model.device)
        for _ in range(max_new):
            # the whole sequence again every token: what a decoder without a KV cache costs
            logits = model(
                input_ids=tokens,
                attention_mask=attention,
                position_ids=positions,
                use_cache=False,
                logits_to_keep=1,
            ).logits[:, -1]
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                next_ids = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                next_ids = logits.argmax(-1)
            next_ids = torch.where(done, pad, next_ids)
            tokens = torch.cat([tokens, next_ids[:, None]], 1)
            attention = torch.cat([attention, attention.new_ones(len(prompts), 1)], 1)
            positions = torch.cat([positions, positions[:, -1:] + 1], 1)
            if use_stops:
                done |= torch.isin(next_ids, stop_ids)
                if bool(done.all()):
                    break
        rows = tokens[:, ids.shape[1] :].tolist()
        return cut_at_stop(rows, set(stops) if use_stops else set())

    return run


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Row:
    variant: str
    method: str
    sequences: int
    generated_tokens: int
    seconds: float
    """Median over the repeats."""
    tokens_per_s: float
    vs_generate: float = 0.0
    vs_no_cache: float = 0.0


def measure(methods: dict[str, Method], variant: str, args: argparse.Namespace) -> list[Row]:
    use_stops = variant == "stop"
    times: dict[str, list[float]] = {name: [] for name in methods}
    counts: dict[str, set[tuple[int, int]]] = {name: set() for name in methods}
    for _ in range(args.repeats):  # methods take turns, so drift hits all of them alike
        for name, run in methods.items():
            synchronize(args.device)
            start = time.perf_counter()
            rows = run(use_stops, 1.0)
            synchronize(args.device)
            times[name].append(time.perf_counter() - start)
            counts[name].add((len(rows), sum(len(r) for r in rows)))
            if not use_stops and any(len(r) != args.max_new_tokens for r in rows):
                raise SystemExit(f"{name}: a fixed-length row did not get every token")
    results = []
    for name in methods:
        ((num_rows, tokens),) = counts[name]  # same seeds every repeat: same tokens
        seconds = statistics.median(times[name])
        results.append(Row(variant, name, num_rows, tokens, seconds, tokens / seconds))
        print(f"[bench] {variant:<5} {name:<9} {tokens:6d} tokens  {seconds:7.3f} s", flush=True)
    by_name = {r.method: r for r in results}
    for r in results:
        r.vs_generate = r.tokens_per_s / by_name["generate"].tokens_per_s
        r.vs_no_cache = r.tokens_per_s / by_name["no cache"].tokens_per_s
    return results


def greedy_agreement(methods: dict[str, Method]) -> str:
    """Rows whose greedy tokens (fixed length) equal generate's: the three compute one model."""
    outputs = {name: run(False, 0.0) for name, run in methods.items()}
    reference = outputs["generate"]
    parts = []
    for name in ("fmray", "no cache"):
        same = sum(a == b for a, b in zip(outputs[name], reference, strict=True))
        parts.append(f"{name} {same}/{len(reference)}")
    return ", ".join(parts)


def print_table(rows: list[Row]) -> None:
    print(
        f"\n{'variant':<8}{'method':<10}{'sequences':>10}{'gen tokens':>12}{'seconds':>10}"
        f"{'tokens/s':>11}{'vs generate':>13}{'vs no cache':>13}"
    )
    for r in rows:
        print(
            f"{r.variant:<8}{r.method:<10}{r.sequences:>10}{r.generated_tokens:>12}"
            f"{r.seconds:>10.3f}{r.tokens_per_s:>11.0f}{r.vs_generate:>12.2f}x"
            f"{r.vs_no_cache:>12.2f}x"
        )


def main() -> None:
    args = parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from fmray.data.chat_template import stop_token_ids

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="fmray-bench-") as tmp:
        model_dir = build_model_dir(args.preset, Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[args.dtype])
    model = model.to(args.device).eval()
    if "cache" not in inspect.signature(model.forward).parameters:
        import transformers

        raise SystemExit(
            f"transformers {transformers.__version__} names the model's cache argument "
            "past_key_values; fmray's engine passes cache= (install the version pyproject pins)"
        )
    stops = stop_token_ids(tokenizer, model.generation_config)
    prompts = make_prompts(tokenizer, args.prompts, args.samples)
    lengths = [len(p) for p in prompts]
    print(
        f"[bench] preset {args.preset}, {args.device} {args.dtype}, torch threads "
        f"{torch.get_num_threads()}; {args.prompts} prompts x {args.samples} samples, prompt "
        f"tokens {min(lengths)}-{max(lengths)}, up to {args.max_new_tokens} new tokens, "
        f"temperature 1.0, stop tokens {stops}",
        flush=True,
    )
    pad, new = tokenizer.pad_token_id, args.max_new_tokens
    methods: dict[str, Method] = {
        "fmray": fmray_method(model, prompts, new, stops, args.max_batch_size),
        "generate": generate_method(model, prompts, new, stops, pad),
        "no cache": no_cache_method(model, prompts, new, stops, pad),
    }
    for run in methods.values():  # warm-up, once: allocator growth, first-call paths
        run(False, 1.0)
    agreement = greedy_agreement(methods)
    print(f"[bench] greedy rows equal to generate's: {agreement}", flush=True)
    rows = measure(methods, "stop", args) + measure(methods, "fixed", args)
    print_table(rows)
    ours = {r.variant: r for r in rows if r.method == "fmray"}
    for variant, r in ours.items():
        print(
            f"[bench] {variant}: fmray / generate = {r.vs_generate:.2f}x (goal > 1), "
            f"fmray / no cache = {r.vs_no_cache:.2f}x (goal >= 5)"
        )
    if args.json:
        record = {"args": vars(args), "greedy_agreement": agreement}
        record["rows"] = [asdict(r) for r in rows]
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"[bench] results written to {args.json}")


if __name__ == "__main__":
    main()

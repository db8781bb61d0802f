"""The whole lifecycle in one command, on an embedded local Ray with the built-in data.

    make quickstart                              # creates .venv, installs, then the line below
    fmray quickstart                             # every stage into runs/quickstart/
    fmray quickstart --keep-serving              # ... and leave the endpoint up (Ctrl-C stops it)
    fmray quickstart --out /tmp/qs --port 8001
    fmray quickstart --verbose                   # Ray's own log lines on the console too
    python -m fmray quickstart                   # the same as `fmray quickstart`

Stages, each a recipe run from its tiny preset in jobs/ with a few overrides (fewer steps):
tokenizer -> pretrain (2 workers) -> SFT -> reward model -> DPO -> GRPO (from the DPO model,
rewarded by the exact-match rule) -> a small Tune search (DPO's beta and lr) -> diffusion
(captioned shapes) -> serve the GRPO model, and the diffusion model where `fmray serve` serves
images, behind one endpoint -> real requests to both -> a summary table, `fmray report` of every
stage and an index page (<out>/index.html).

Re-running reuses what is done: a stage whose newest checkpoint reached its last step is not run
again, and an interrupted one resumes from its newest checkpoint (`checkpoint.resume=auto`).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import socket
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fmray.config import ConfigError, deep_merge, parse_overrides, read_yaml
from fmray.report import Report, Series, checkpoints, write_index, write_report

CHAT_MODEL = "tiny-chat"
IMAGE_MODEL = "shapes"
IMAGE_PROMPT = "a red circle on the left"


@dataclass(frozen=True)
class Stage:
    """One recipe run of the lifecycle: preset + overrides, into <out>/<name>."""

    name: str
    command: str
    preset: str
    """The preset under jobs/ that the stage starts from."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides on the preset (run.output_dir and run.name are added)."""
    about: str = ""


@dataclass
class StageResult:
    stage: Stage
    run_dir: Path
    seconds: float
    reused: bool
    report: Report | None = None


def jobs_dir() -> Path:
    """The presets: ./jobs, else the jobs/ beside the fmray package (a source checkout)."""
    for candidate in (Path("jobs"), Path(__file__).resolve().parents[1] / "jobs"):
        if (candidate / "pretrain" / "tiny.yaml").is_file():
            return candidate
    raise ConfigError("fmray quickstart: no jobs/ presets here; run it from fmray's checkout")


def build_stages(out: Path, verbose: bool = False) -> list[Stage]:
    """The lifecycle's stages, each reading what the one before it wrote; `verbose` sets every
    Ray stage's logging.verbose (Ray's own log lines on the console too)."""
    o = out.resolve()
    stages = [
        Stage("tokenizer", "tokenizer", "", ["data.num_documents=3000", "data.vocab_size=512"],
              "byte-level BPE on the built-in corpus"),
        Stage("pretrain", "pretrain", "pretrain/tiny.yaml",
              [f"data.tokenizer={o}/tokenizer/tokenizer"], "tiny Llama, 2 workers, ZeRO-2"),
        Stage("sft", "sft", "sft/tiny.yaml", [f"model.path={o}/pretrain"],
              "instruction fine-tuning, 150 steps"),
        Stage("reward", "reward", "reward/tiny.yaml",
              [f"model.path={o}/sft", "train.max_steps=60", "train.eval_every=30",
               "checkpoint.every_steps=60"], "reward model on preference pairs"),
        Stage("dpo", "dpo", "dpo/tiny.yaml",
              [f"model.path={o}/sft", "train.max_steps=60", "train.eval_every=30",
               "checkpoint.every_steps=60", "eval.num_examples=64"], "DPO of the SFT model"),
        Stage("grpo", "grpo", "grpo/tiny.yaml",
              [f"model.path={o}/dpo", "train.max_steps=20", "checkpoint.every_steps=20",
               "eval.num_examples=64"], "GRPO of the DPO model, exact-match reward"),
        Stage("tune", "tune", "tune/dpo_tiny.yaml",
              ["num_samples=2", "scheduler.grace_period=10"],
              "ASHA over DPO's beta and lr, 2 trials"),
        Stage("diffusion", "diffusion", "diffusion/tiny.yaml",
              ["train.max_steps=200", "checkpoint.every_steps=100"],
              "text-to-image UNet on captioned shapes"),
    ]  # fmt: skip
    if not verbose:
        return stages
    return [
        stage
        if stage.command == "tokenizer"
        else replace(stage, overrides=[*stage.overrides, "logging.verbose=true"])
        for stage in stages
    ]


def stage_tree(stage: Stage, out: Path) -> dict[str, Any]:
    """The stage's config values: its preset, its overrides, its place under `out`."""
    tree = read_yaml(jobs_dir() / stage.preset) if stage.preset else {}
    where = [f"run.output_dir={out.resolve()}", f"run.name={stage.name}"]
    tree = deep_merge(tree, parse_overrides(where + stage.overrides))
    if stage.command == "tune":  # its trials' overrides are one level down, as dotted keys
        sft_dir = out.resolve() / "sft"
        tree["base"] = str((jobs_dir() / tree["base"].removeprefix("jobs/")).resolve())
        tree["overrides"] = {
            **tree.get("overrides", {}),
            "model.path": str(sft_dir),
            "train.max_steps": 20,
            "train.eval_every": 10,
            "checkpoint.every_steps": 0,
            "eval.num_examples": 32,
        }
    return tree


def is_done(stage: Stage, run_dir: Path, tree: dict[str, Any]) -> bool:
    """Whether an earlier quickstart finished this stage (its results are all on disk)."""
    if stage.command == "tokenizer":
        return (run_dir / "tokenizer" / "tokenizer.json").is_file()
    if stage.command == "tune":
        return (run_dir / "best.json").is_file()
    found = checkpoints(run_dir)
    max_steps = (tree.get("train") or {}).get("max_steps")
    return bool(found) and max_steps is not None and found[-1][0] >= int(max_steps)


def run_recipe(stage: Stage, tree: dict[str, Any]) -> None:
    """The stage's recipe, in this process (one embedded Ray instance for every stage)."""
    from fmray.config import validate_config
    from fmray.recipes import recipe_config_class, recipe_module

    config = validate_config(recipe_config_class(stage.command), tree)
    recipe_module(stage.command).run(config)


def run_stages(
    stages: list[Stage],
    out: Path,
    run: Callable[[Stage, dict[str, Any]], None] = run_recipe,
) -> list[StageResult]:
    """Each stage in order (skipped when done), then its report; one progress line each."""
    results = []
    total = len(stages) + 1  # + serving
    for number, stage in enumerate(stages, start=1):
        run_dir = out / stage.name
        tree = stage_tree(stage, out)
        start = time.perf_counter()
        if is_done(stage, run_dir, tree):
            progress(f"{number}/{total} {stage.name}: done before, reusing {run_dir}")
            reused = True
        else:
            progress(f"{number}/{total} {stage.name}: {stage.about} -> {run_dir}")
            run(stage, tree)
            reused = False
        result = StageResult(stage, run_dir, time.perf_counter() - start, reused)
        if stage.command != "tokenizer":
            result.report = write_report(run_dir)
        headline = key_metric(result, results)
        progress(f"{number}/{total} {stage.name}: finished in {result.seconds:.0f} s | {headline}")
        results.append(result)
    return results


def progress(text: str) -> None:
    print(f"[fmray] quickstart {text}", flush=True)


# --- the summary


def last(series: dict[str, Series], key: str) -> float | None:
    return series[key].last()[1] if key in series else None


def key_metric(result: StageResult, before: list[StageResult]) -> str:
    """The metric that says how the stage did (exact match before -> after an alignment)."""
    if result.report is None:
        return "tokenizer.json written"
    metrics = result.report.key_metrics
    command = result.stage.command

    def shown(key: str, label: str) -> str:
        value = last(metrics, key)
        return f"{label} {value:.3f}" if value is not None else f"{label} -"

    if command == "pretrain":
        return shown("val_loss", "held-out loss")
    if command == "sft":
        return f"{shown('val_exact_match', 'exact match')}, {shown('val_loss', 'held-out loss')}"
    if command == "reward":
        return f"{shown('val_accuracy', 'RM accuracy')}, {shown('val_margin', 'margin')}"
    if command in ("dpo", "grpo"):
        previous = exact_match_before(result, before)
        after = last(metrics, "val_exact_match")
        change = f"exact match {fmt(previous)} -> {fmt(after)}"
        extra = shown("val_accuracy", "pair accuracy") if command == "dpo" else ""
        if command == "grpo":
            extra = f"held-out reward {fmt(first_value(metrics, 'val_reward'))} -> "
            extra += fmt(last(metrics, "val_reward"))
        return f"{change}, {extra}"
    if command == "tune":
        best = next(iter(metrics.items()), None)
        return f"{best[0]} {best[1].last()[1]:.3f}" if best else "no finished trial"
    if command == "diffusion":
        parts = [shown(k, k.removesuffix("_acc")) for k in ("colour_acc", "shape_acc")]
        return "adherence " + ", ".join(parts + [shown("position_acc", "position")])
    return ""


def first_value(series: dict[str, Series], key: str) -> float | None:
    return series[key].first()[1] if key in series else None


def exact_match_before(result: StageResult, before: list[StageResult]) -> float | None:
    """GRPO evaluates its starting policy (step 0); DPO's starting point is SFT's last eval."""
    if result.report is not None and result.stage.command == "grpo":
        start = result.report.key_metrics.get("val_exact_match")
        if start is not None and start.first()[0] == 0:
            return start.first()[1]
    for earlier in reversed(before):
        if earlier.stage.command in ("sft", "dpo") and earlier.report is not None:
            return last(earlier.report.key_metrics, "val_exact_match")
    return None


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def summary_rows(results: list[StageResult]) -> list[list[str]]:
    rows = [["stage", "key metric", "checkpoint", "time"]]
    for i, result in enumerate(results):
        report = result.report
        if result.stage.command == "tokenizer":
            where = str(result.run_dir / "tokenizer")
        else:
            where = (report.checkpoint if report else None) or "-"
        took = "reused" if result.reused else f"{result.seconds:.0f} s"
        rows.append([result.stage.name, key_metric(result, results[:i]), where, took])
    return rows


def format_rows(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


# --- serving


@dataclass
class Served:
    url: str
    question: str
    reference: str
    answer: str
    image_path: Path | None
    seconds: float = 0.0


def image_models_field() -> str | None:
    """ServeConfig's mapping of image models, where `fmray serve` serves images."""
    from fmray.config import mapping_section
    from fmray.serve.app import ServeConfig

    for name, info in ServeConfig.model_fields.items():
        entry = mapping_section(info.annotation)
        if entry is not None and entry.__name__ == "ImageModelEntry":
            return name
    return None


def check_port_free(port: int) -> None:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise ConfigError(
                f"fmray quickstart: port {port} is in use; pass --port with a free one"
            ) from None


def serve_config(out: Path, port: int) -> Any:
    from fmray.config import validate_config
    from fmray.serve.app import ServeConfig, check_model_paths

    single = {"min_replicas": 1, "max_replicas": 1}
    data: dict[str, Any] = {
        "models": {CHAT_MODEL: {"path": str(out / "grpo")}},
        "serve": {"host": "127.0.0.1", "port": port, "app_name": "fmray-quickstart"},
        "deployment": {"num_cpus": 0.5},
        "autoscaling": single,
    }
    images = image_models_field()
    if images is not None:
        data[images] = {IMAGE_MODEL: {"path": str(out / "diffusion")}}
    return check_model_paths(validate_config(ServeConfig, data))


def post_json(url: str, body: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def ask_models(base: str, out: Path, with_images: bool) -> Served:
    """One chat completion from the aligned LLM (a held-out question) and, with images served,
    one generated image written to <out>/quickstart_image.png."""
    from fmray.data.instructions import build_task

    example = build_task(0).heldout[0]
    reply = post_json(
        f"{base}/v1/chat/completions",
        {
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": example.prompt}],
            "max_tokens": 24,
            "temperature": 0.0,
        },
    )
    answer = reply["choices"][0]["message"]["content"]
    image_path = None
    if with_images:
        body = {"model": IMAGE_MODEL, "prompt": IMAGE_PROMPT, "n": 1}
        reply = post_json(f"{base}/v1/images/generations", body | {"response_format": "b64_json"})
        image_path = out / "quickstart_image.png"
        image_path.write_bytes(base64.b64decode(reply["data"][0]["b64_json"]))
    return Served(base, example.prompt, example.response, answer, image_path)


def serve_and_ask(out: Path, port: int, keep_serving: bool, verbose: bool = False) -> Served:
    """Deploy the aligned LLM (and the image model), send the requests, stop unless asked not to."""
    from ray import serve

    from fmray.distributed.runtime import init_ray
    from fmray.serve.app import build_application, required_cpus

    check_port_free(port)
    if not verbose:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's INFO lines: Ray's log
    config = serve_config(out, port)
    with_images = image_models_field() is not None
    init_ray(None, required_cpus(config), verbose)
    serve.start(http_options={"host": config.serve.host, "port": port})
    serve.run(build_application(config), name=config.serve.app_name, route_prefix="/")
    try:
        served = ask_models(f"http://localhost:{port}", out, with_images)
    except BaseException:
        serve.shutdown()
        raise
    if not keep_serving:
        serve.shutdown()
    return served


def wait_until_interrupted() -> None:
    from ray import serve

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\n[fmray] stopping the endpoint")
    serve.shutdown()


# --- the command


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="fmray quickstart",
        description="tokenizer -> pretrain -> SFT -> reward model -> DPO -> GRPO -> Tune -> "
        "diffusion -> serving, with reports; re-running reuses finished stages.",
    )
    parser.add_argument("--out", default="runs/quickstart", help="folder of every stage's run")
    parser.add_argument("--port", type=int, default=8000, help="the endpoint's port")
    parser.add_argument(
        "--keep-serving", action="store_true", help="leave the endpoint up (Ctrl-C stops it)"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own log lines on the console too (logging.verbose=true for every stage)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check_port_free(args.port)
    start = time.perf_counter()
    results = run_stages(build_stages(out, args.verbose), out, run=run_recipe)
    total = len(results) + 1
    with_images = image_models_field() is not None
    what = "the GRPO model and the diffusion model" if with_images else "the GRPO model"
    progress(f"{total}/{total} serve: {what} behind one endpoint on port {args.port}")
    serve_start = time.perf_counter()
    served = serve_and_ask(out.resolve(), args.port, args.keep_serving, args.verbose)
    served.seconds = time.perf_counter() - serve_start
    progress(f"{total}/{total} serve: answered in {served.seconds:.0f} s")
    print_summary(results, served, out, time.perf_counter() - start, with_images)
    if args.keep_serving:
        print(f"[fmray] serving at {served.url}/v1 (Ctrl-C stops it)")
        wait_until_interrupted()


def print_summary(
    results: list[StageResult], served: Served, out: Path, seconds: float, with_images: bool
) -> None:
    rows = summary_rows(results)
    rows.append(["serve", f"endpoint {served.url}/v1", "-", f"{served.seconds:.0f} s"])
    answer = [["question", served.question, "answer", served.answer]]
    index = write_index(
        [r.report for r in results if r.report is not None],
        out / "index.html",
        rows + answer,
        [served.image_path] if served.image_path else [],
    )
    image = str(served.image_path) if served.image_path else "-"
    if not with_images:
        image += " (this fmray serve has no image models)"
    lines = [
        f"[fmray] quickstart done in {seconds:.0f} s.",
        format_rows(rows),
        f"  endpoint   {served.url}/v1  (models: {CHAT_MODEL}"
        + (f", {IMAGE_MODEL})" if with_images else ")"),
        f"  question   {served.question}",
        f"  answer     {served.answer!r} (reference: {served.reference!r})",
        f"  image      {image}" + (f" for {IMAGE_PROMPT!r}" if served.image_path else ""),
        f"  reports    {index}",
    ]
    text = "\n".join(lines)
    (out / "summary.txt").write_text(text + "\n")
    print(text)

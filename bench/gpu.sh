#!/usr/bin/env bash
# GPU benchmark in one prepared run: checks every prerequisite, then bench/gpu_bench.py writes one
# JSON (pretraining tokens/s, MFU and peak memory against the planner for llama-1b in bf16;
# serving tokens/s at 1/16/64 concurrent requests against batched HF generate). Under 8 minutes
# on one H100/H200; each failure stops it with one line naming what is missing.
#
#   bash bench/gpu.sh                    # on the GPU machine: $OUT/bench-gpu.json (./ without $OUT)
#   bash bench/gpu.sh --cpu-smoke        # the same steps on tiny sizes, CPU (tests/unit runs it)
#   make gpu-wheels                      # here, first: wheels of what the GPU machine lacks
#
# Needs: Python 3.10+ with torch, transformers; fmray's own pure-Python dependencies (pydantic,
# PyYAML) come from bench/wheels/ when the machine lacks them. No Ray, DeepSpeed or network.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MODE=gpu
if [[ "${1:-}" == "--cpu-smoke" ]]; then MODE=cpu-smoke; fi
OUT_DIR=${OUT:-.}
RESULT="$OUT_DIR/bench-gpu.json"
[[ "$MODE" == cpu-smoke ]] && RESULT="$OUT_DIR/bench-gpu-smoke.json"
WHEELS=${FMRAY_BENCH_WHEELS:-bench/wheels}
SITE=${FMRAY_BENCH_SITE:-$OUT_DIR/.gpu-bench-site}
# Modules the benchmark imports; FMRAY_BENCH_EXTRA_MODULES adds more (tests use it).
REQUIRED="torch transformers pydantic yaml ${FMRAY_BENCH_EXTRA_MODULES:-}"

step() { echo "[gpu.sh] $*" >&2; }
fail() { echo "[gpu.sh] FAILED: $*" >&2; exit 1; }

missing_modules() {
    PYTHONPATH="$SITE:.${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c '
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
' $REQUIRED
}

step "1/5 python: $("$PYTHON" --version 2>&1) ($MODE)"
command -v "$PYTHON" >/dev/null || fail "no $PYTHON on PATH (set PYTHON=...)"

step "2/5 packages: $REQUIRED"
missing=$(missing_modules)
if [[ -n "$missing" ]]; then
    ls "$WHEELS"/*.whl >/dev/null 2>&1 \
        || fail "missing Python modules: $missing, and no wheels in $WHEELS (run 'make gpu-wheels' where a package registry is reachable, then carry $WHEELS)"
    step "installing from $WHEELS into $SITE: $missing"
    "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" --target "$SITE" \
        $(ls "$WHEELS"/*.whl) \
        || fail "pip could not install the wheels in $WHEELS for $("$PYTHON" --version 2>&1)"
    missing=$(missing_modules)
    [[ -z "$missing" ]] || fail "still missing after installing $WHEELS: $missing"
fi
export PYTHONPATH="$SITE:.${PYTHONPATH:+:$PYTHONPATH}"

step "3/5 device"
if [[ "$MODE" == gpu ]]; then
    "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
        || fail "torch $("$PYTHON" -c 'import torch; print(torch.__version__)') sees no CUDA device"
    "$PYTHON" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"[gpu.sh]   {p.name}, {p.total_memory / 2**30:.0f} GiB")' >&2
fi

step "4/5 fmray's benchmark imports, without Ray or DeepSpeed"
"$PYTHON" -c '
import sys
import fmray.distributed.planner, fmray.distributed.workload, fmray.generation.engine, fmray.models.registry
heavy = [m for m in ("ray", "deepspeed", "diffusers") if m in sys.modules]
sys.exit(f"imported {heavy}: the GPU machine has none of them" if heavy else 0)
' || fail "fmray's benchmark modules do not import here (see the error above)"

step "5/5 benchmark -> $RESULT"
mkdir -p "$OUT_DIR"
rm -f "$RESULT"
LIMIT=${FMRAY_BENCH_TIMEOUT_S:-470}
SMOKE=()
[[ "$MODE" == cpu-smoke ]] && SMOKE=(--cpu-smoke)
# FMRAY_BENCH_ARGS: extra gpu_bench.py arguments (e.g. "--steps 20 --concurrency 1,16,64").
# shellcheck disable=SC2086
timeout "$LIMIT" "$PYTHON" bench/gpu_bench.py --out "$RESULT" "${SMOKE[@]}" ${FMRAY_BENCH_ARGS:-} \
    || fail "bench/gpu_bench.py failed or ran past ${LIMIT}s (exit $?)"
"$PYTHON" - "$RESULT" "$MODE" <<'EOF' || fail "$RESULT is incomplete"
import json, sys
report = json.load(open(sys.argv[1]))
gpu = sys.argv[2] == "gpu"
need = ["tokens_per_s", "step_s", "planner"] + (["mfu", "peak_allocated_gib", "peak_vs_planner"] if gpu else [])
for variant in report["pretrain"]:
    absent = [k for k in need if variant.get(k) is None]
    if absent:
        sys.exit(f"pretrain {variant['variant']}: no {', '.join(absent)}")
if not report["serving"] or any(level["ratio"] is None for level in report["serving"]):
    sys.exit("serving: no figures")
print(json.dumps({"pretrain": [(v["variant"], v["tokens_per_s"], v["mfu"], v.get("peak_vs_planner")) for v in report["pretrain"]],
                  "serving": [(s["concurrency"], s["ratio"]) for s in report["serving"]],
                  "elapsed_s": report["elapsed_s"]}))
EOF
step "done: $RESULT"

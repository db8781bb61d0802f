# fmray: `make quickstart` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_VERSION := 2.13.0

export HF_HUB_OFFLINE := 1
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/fmray/torch_extensions

.PHONY: install quickstart test test-faults test-unit test-ray lint format bench bench-train bench-serve bench-serve-diffusion bench-tune bench-reliability bench-rollout bench-zero bench-gpu-smoke gpu-wheels clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# DeepSpeed's CPU comm op, compiled once into TORCH_EXTENSIONS_DIR (40 s) instead of in the first fit.
	$(BIN)/python -m fmray.distributed.build_ops
	touch $(STAMP)

install: $(STAMP)

# The lifecycle on built-in data: tokenizer, pretrain, SFT, reward model, DPO, GRPO, Tune,
# diffusion, serving with real requests, reports (runs/quickstart/index.html); re-running reuses
# finished stages. QUICKSTART_ARGS=--keep-serving leaves the endpoint up.
quickstart: $(STAMP)
	$(BIN)/fmray quickstart $(QUICKSTART_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -q -x --durations=15 tests

# The long fault and fuzz runs (pytest marker `faults`), e.g. >= 1,000 fuzzed API requests.
test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -m faults --durations=15 tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

test-ray: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15 tests/ray

bench: bench-train bench-serve bench-serve-diffusion bench-tune bench-reliability bench-rollout

bench-train: $(STAMP)
	$(BIN)/python bench/train_overhead.py

bench-serve: $(STAMP)
	$(BIN)/python bench/serve_llm.py

bench-serve-diffusion: $(STAMP)
	$(BIN)/python bench/serve_diffusion.py

bench-rollout: $(STAMP)
	$(BIN)/python bench/rollout.py

bench-reliability: $(STAMP)
	$(BIN)/python bench/reliability.py

# The memory planner against DeepSpeed's own partitions (ZeRO 0-3, 2 CPU ranks).
bench-zero: $(STAMP)
	$(BIN)/python bench/zero_memory.py

# bench/gpu.sh on tiny sizes on CPU: every step the GPU run takes.
bench-gpu-smoke: $(STAMP)
	PYTHON=$(BIN)/python bash bench/gpu.sh --cpu-smoke

# Wheels of fmray's pure-Python dependencies for a GPU machine with Python 3.12 and no registry
# (bench/gpu.sh installs them from bench/wheels when they are missing there).
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download --quiet --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux2014_x86_64 --dest bench/wheels \
		pydantic==2.14.3 pyyaml==6.0.3

# Searches start from the quickstart's pretrained tiny model.
bench-tune: quickstart
	$(BIN)/python bench/tune_efficiency.py --model runs/quickstart/pretrain

clean:
	rm -rf runs .pytest_cache .ruff_cache

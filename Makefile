# Two entry points for a newcomer: `make demo` (the main job) and `make test`. Both set up .venv first.
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= saap/configs/smollm2-135m.yaml

.PHONY: setup test lint demo bench bench-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh scripts/install-llama-cpp.sh scripts/install-llama-converter.sh \
		saap/runtime/llama_build.py
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint bench-check
	$(BIN)/python -m pytest -q

# Throughput regression check (~2-3 min on 2 cores): SmolLM2-135M dense vs SAAP 20 % on torch, interleaved,
# against benchmarks/baselines/; --self-test also proves that a 2x slowdown of the pruned model fails it.
bench-check: setup
	$(BIN)/python benchmarks/check_regression.py --self-test

demo: setup
	$(BIN)/saap run $(CONFIG)

# The committed quality table was made on a GPU: QUALITY_ARGS="--device cuda --batch-size 16" reuses its cells;
# other settings recompute every cell (~13 min each on 2 CPU cores).
QUALITY_ARGS ?=
bench: setup
	$(BIN)/python benchmarks/prune_cost.py
	$(BIN)/python benchmarks/quality.py $(QUALITY_ARGS)
	$(BIN)/python benchmarks/saap_ablation.py --ppl-windows 256
	$(BIN)/python benchmarks/throughput.py

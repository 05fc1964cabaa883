# Two entry points for a newcomer: `make demo` (the main job) and `make test`. Both set up .venv first.
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/smollm2-135m.yaml

.PHONY: setup test lint demo bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/saap run $(CONFIG)

bench: setup
	$(BIN)/python benchmarks/prune_cost.py
	$(BIN)/python benchmarks/prune_quality.py

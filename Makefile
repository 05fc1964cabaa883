# Two entry points for a newcomer: `make demo` (the main job) and `make test`. Both set up .venv first.
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= artifacts/smol-p20

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
	$(BIN)/saap prune --model smollm2-135m --ratio 0.2 --method llm-pruner --out $(RUN) --overwrite
	$(BIN)/saap generate --model $(RUN) --prompt "The capital of France is" --max-new-tokens 20
	$(BIN)/saap eval --model $(RUN) --ppl wikitext2 ptb --out $(RUN)/eval.json

bench: setup
	$(BIN)/python benchmarks/prune_cost.py
	$(BIN)/python benchmarks/quality.py

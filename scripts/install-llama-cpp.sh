#!/usr/bin/env bash
# Compile llama-cpp-python for this machine without kernels it cannot run, and install it into VENV.
#
#   bash scripts/install-llama-cpp.sh [VENV]     (LLAMA_CPP_SPEC=... to pick another version)
#
# The flags and the keyed wheel cache are saap/runtime/llama_build.py's (why: see there). The venv records
# the key it was installed with, and is reinstalled whenever that differs from this machine's.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${VENV:-.venv}}
PY="$VENV/bin/python"
SPEC=${LLAMA_CPP_SPEC:-$("$PY" saap/runtime/llama_build.py spec)}
KEY=$("$PY" saap/runtime/llama_build.py key "$SPEC")
MARK="$VENV/.llama-cpp-build"

if [ "$(cat "$MARK" 2>/dev/null)" = "$KEY" ] && "$PY" -c "import llama_cpp" 2>/dev/null; then
  exit 0
fi
WHEEL=$("$PY" saap/runtime/llama_build.py wheel "$SPEC")  # compiled (~7 min) unless cached
"$PY" -m pip install --quiet --force-reinstall --no-deps "$WHEEL"
"$PY" -m pip install --quiet "$WHEEL"  # llama-cpp-python's own dependencies (numpy, jinja2, diskcache, ...)
echo "$KEY" > "$MARK"

#!/usr/bin/env bash
# Compile llama-cpp-python for this machine without kernels it cannot run, and install it into VENV.
#
#   bash scripts/install-llama-cpp.sh [VENV]     (LLAMA_CPP_SPEC=... to pick another version)
#
# The flags come from runtime/llama_build.py (why: see there). pip's own wheel cache is keyed by the
# source only, so a wheel built with other flags or on another CPU would come back silently: we
# build with --no-cache-dir into a cache of our own keyed by spec + flags + CPU + compiler + Python,
# and reinstall whenever the venv's recorded key differs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${VENV:-.venv}}
PY="$VENV/bin/python"
SPEC=${LLAMA_CPP_SPEC:-$("$PY" runtime/llama_build.py spec)}
ARGS=$("$PY" runtime/llama_build.py cmake-args)
KEY=$("$PY" runtime/llama_build.py key "$SPEC")
CACHE=${SAAP_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/saap/wheels}/$KEY
MARK="$VENV/.llama-cpp-build"

if [ "$(cat "$MARK" 2>/dev/null)" = "$KEY" ] && "$PY" -c "import llama_cpp" 2>/dev/null; then
  exit 0
fi
if ! ls "$CACHE"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "compiling $SPEC with CMAKE_ARGS='$ARGS' (~7 min on 2 cores; cached in $CACHE)"
  mkdir -p "$(dirname "$CACHE")"
  TMP=$(mktemp -d "$CACHE.tmp-XXXXXX")
  trap 'rm -rf "$TMP"' EXIT  # a failed or interrupted build leaves nothing under the cache
  CMAKE_ARGS="$ARGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)} \
    "$PY" -m pip wheel --quiet --no-deps --no-cache-dir --no-binary llama-cpp-python "$SPEC" -w "$TMP"
  rm -rf "$CACHE"
  mv "$TMP" "$CACHE"  # only a finished build lands under its key
fi
"$PY" -m pip install --quiet --force-reinstall --no-deps "$CACHE"/llama_cpp_python-*.whl
# llama-cpp-python's own dependencies (numpy, jinja2, diskcache, typing-extensions)
"$PY" -m pip install --quiet "$(ls "$CACHE"/llama_cpp_python-*.whl)"
echo "$KEY" > "$MARK"

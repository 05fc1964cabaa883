#!/usr/bin/env bash
# Put llama.cpp's own HF -> GGUF converter (convert_hf_to_gguf.py, its conversion/ package and the
# gguf-py it is written against) into VENV/share/llama.cpp, from the llama-cpp-python source release
# saap builds (saap/runtime/llama_build.py spec). The tests convert saap's uniform-shape checkpoints with
# it, as a user would, to show they need nothing of saap's. The converter's gguf-py stays out of
# site-packages (run it with PYTHONPATH=VENV/share/llama.cpp/gguf-py) so the project's gguf is unchanged.
#
#   bash scripts/install-llama-converter.sh [VENV]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${VENV:-.venv}}
PY="$VENV/bin/python"
SPEC=$("$PY" saap/runtime/llama_build.py spec)
DEST="$VENV/share/llama.cpp"
if [ "$(cat "$DEST/.spec" 2>/dev/null)" = "$SPEC" ] && [ -f "$DEST/convert_hf_to_gguf.py" ]; then
  exit 0
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download --quiet --no-deps --no-binary :all: "$SPEC" -d "$TMP" 2>/dev/null
SDIST=$(ls "$TMP"/llama_cpp_python-*.tar.gz)
ROOT=$(basename "$SDIST" .tar.gz)/vendor/llama.cpp
tar -xzf "$SDIST" -C "$TMP" "$ROOT/convert_hf_to_gguf.py" "$ROOT/conversion" "$ROOT/gguf-py" "$ROOT/LICENSE"
rm -rf "$DEST" && mkdir -p "$(dirname "$DEST")"
mv "$TMP/$ROOT" "$DEST"
echo "$SPEC" > "$DEST/.spec"

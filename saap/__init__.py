"""saap: structurally-aware adaptive pruning (arXiv 2412.15127) of decoder LLMs, recovered by
distillation, physically shrunk and exported to GGUF and ONNX for edge devices.

The package has three parts, each importable on its own:

- ``saap.runtime``: loading and running models and artifacts (surgery, checkpoints, engines);
- ``saap.pipeline``: the stages (``prune``, ``finetune``, ``bench``, eval) and the ``saap`` command;
- ``saap.export``: GGUF (llama.cpp) and ONNX (ONNX Runtime, onnxruntime-genai) writers.

``import saap`` itself is light; the API (``saap.load``, ``saap.prune``, ``saap.finetune``,
``saap.perplexity``, ``saap.export_gguf``, ``saap.export_onnx``, ``saap.bench``, ``saap.run``) is
``saap.api``'s, imported on first use so that the ``saap`` command starts without torch.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("saap")
except PackageNotFoundError:  # a checkout on sys.path, not installed
    __version__ = "0+unknown"

_API = ("Pruned", "bench", "export_gguf", "export_onnx", "finetune", "load", "perplexity", "prune", "run")
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module("saap.api"), name)
    raise AttributeError(f"module 'saap' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)

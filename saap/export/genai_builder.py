"""onnxruntime-genai's own model builder as a reference beside saap's ONNX exports.

The builder (``python -m onnxruntime_genai.models.builder``) needs transformers >= 5, which optimum-onnx's
pin excludes, so it runs from a virtualenv of its own, named by its Python
(``python -m venv V && V/bin/pip install torch onnxruntime-genai onnx_ir onnxscript "transformers>=5"``).
It reads a Hugging Face checkpoint directory: the dense model as saap loads it (a GGUF alias is
dequantized and saved once beside the builds). ``saap bench --genai-reference PYTHON`` and
``benchmarks/onnx_speed.py`` use it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from saap.runtime.errors import SaapError
from saap.runtime.io import atomic_dir

# saap precision -> the builder's -p (it has no int8 for the CPU)
BUILDER_PRECISIONS = {"fp32": "fp32", "fp16": "fp16", "int4": "int4"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SOURCE_DIR = "dense-hf"


def check_builder(python: str) -> None:
    """One clear line unless ``python`` runs and has onnxruntime-genai's builder and transformers >= 5."""
    probe = (
        "import importlib.util, sys, transformers\n"
        "if int(transformers.__version__.split('.')[0]) < 5: sys.exit(4)\n"
        "if importlib.util.find_spec('onnxruntime_genai.models.builder') is None: sys.exit(3)\n"
    )
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SaapError(f"cannot run the builder's Python '{python}': {e}") from None
    reasons = {3: "has no onnxruntime_genai.models.builder", 4: "has transformers < 5 (the builder needs >= 5)"}
    if done.returncode:
        reason = reasons.get(done.returncode) or (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise SaapError(f"'{python}' cannot run onnxruntime-genai's model builder: {reason}")


def builder_source(model_spec: str, work: Path) -> Path:
    """The Hugging Face checkpoint the builder reads for ``model_spec``, saved once under ``work``."""
    source = work / SOURCE_DIR
    if not (source / "config.json").is_file():
        from saap.runtime.models import load_model

        loaded = load_model(model_spec)
        with atomic_dir(source, overwrite=True) as tmp:
            loaded.model.save_pretrained(tmp)  # safetensors
            loaded.tokenizer.save_pretrained(tmp)
    return source


def build_reference(python: str, source: Path, out: Path, precision: str) -> Path:
    """The builder's CPU export of ``source`` at ``precision`` in ``out`` (kept when already there), with
    ``source``'s tokenizer files beside it, so that transformers < 5 (saap's engine) reads the same
    tokenizer that the builder's transformers 5 wrote in its newer form."""
    if precision not in BUILDER_PRECISIONS:
        raise SaapError(f"onnxruntime-genai's builder has no {precision} (it has {', '.join(BUILDER_PRECISIONS)})")
    if (out / "model.onnx").is_file():
        return out
    log_path = out.parent / f"{out.name}.log"
    with atomic_dir(out, overwrite=True) as tmp, tempfile.TemporaryDirectory() as cache, open(log_path, "w") as log:
        command = [python, "-m", "onnxruntime_genai.models.builder", "-m", str(source), "-i", str(source)]
        command += ["-o", str(tmp), "-p", BUILDER_PRECISIONS[precision], "-e", "cpu", "-c", cache]
        done = subprocess.run(command, stdout=log, stderr=log)  # its per-tensor progress, kept aside
        if done.returncode:
            raise SaapError(f"onnxruntime-genai's builder failed on {source} at {precision} (see {log_path})")
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, tmp / name)
    return out

"""What the ``--models`` entries are, their labels in the tables, and which is whose dense parent."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from saap.pipeline.bench.settings import BenchModel
from saap.runtime.errors import SaapError
from saap.runtime.gguf_engine import check_gguf_file
from saap.runtime.onnx_engine import MODEL_FILE, RECORD_FILE, check_recorded_sizes, resolve_onnx_path

# runtime.checkpoint and runtime.models import torch and transformers: imported where used, so that
# `import pipeline.bench` (the regression check compares documents) stays light.


def split_label(spec: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH): a label given explicitly. A path may contain ``=`` itself, so the
    entry splits only when neither it nor its left part exists, and the left part is a name, not a path."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest or "/" in name or Path(spec).expanduser().exists():
        return None, spec
    if Path(name).expanduser().exists():
        return None, spec
    return name, rest


def _label(spec: str, taken: set[str]) -> str:
    base = spec if not Path(spec).exists() else Path(spec).resolve().name
    label, n = base, 2
    while label in taken:
        label, n = f"{base}#{n}", n + 1
    return label


def classify(spec: str) -> BenchModel:
    """What a ``--models`` entry is: an alias, a checkpoint / HF dir, a .gguf file or an ONNX export dir."""
    from saap.runtime.checkpoint import is_checkpoint
    from saap.runtime.models import ALIASES

    if spec in ALIASES:
        return BenchModel(spec, spec, "alias")
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" or (path.is_file() and path.suffix != ".onnx"):
        check_gguf_file(path)
        return BenchModel(spec, str(path), "gguf")
    if path.suffix == ".onnx" or (path.is_dir() and (path / MODEL_FILE).is_file()):
        check_recorded_sizes(resolve_onnx_path(path).parent)
        return BenchModel(spec, str(path), "onnx")
    if path.is_dir() and is_checkpoint(path):
        return BenchModel(spec, str(path), "checkpoint")
    if path.is_dir() and (path / "config.json").is_file():
        return BenchModel(spec, str(path), "hf")
    if not path.exists():
        raise SaapError(f"model '{spec}' does not exist (give smollm2-135m, a checkpoint dir, .gguf or ONNX dir)")
    raise SaapError(f"'{spec}' is not a model: no saap.json, config.json, model.onnx, and not a .gguf file")


def resolve_models(specs: list[str]) -> list[BenchModel]:
    """Classify every spec, label it, and link each pruned checkpoint to its dense parent if present.

    Explicit labels (``NAME=PATH``) are reserved first, so a derived label never takes one of them.
    """
    parsed = [split_label(spec) for spec in specs]
    twice = [name for name, n in Counter(name for name, _ in parsed if name).items() if n > 1]
    if twice:
        raise SaapError(f"label '{twice[0]}' is given to more than one of --models")
    taken = {name for name, _ in parsed if name}
    models: list[BenchModel] = []
    for name, spec in parsed:
        model = classify(spec)
        model.label = name or _label(spec, taken)
        taken.add(model.label)
        models.append(model)
    _link_parents(models)
    return models


def _pruned_source(model: BenchModel) -> dict | None:
    """The ``source`` record of the prune behind ``model`` (itself, its fine-tune parent, or the checkpoint
    its ONNX export came from), or None for a dense model."""
    from saap.runtime.checkpoint import read_metadata

    if model.kind == "onnx":
        record = Path(model.spec) / RECORD_FILE
        parent_dir = json.loads(record.read_text()).get("source", {}).get("path") if record.is_file() else None
        if not parent_dir or not (Path(parent_dir) / "saap.json").is_file():
            return None
        meta = read_metadata(parent_dir)
    elif model.kind == "checkpoint":
        meta = read_metadata(model.spec)
        if meta.get("kind") == "finetuned":  # a fine-tuned prune: its dense parent is the prune's source
            parent = meta.get("parent", {}).get("model")
            if not parent or not (Path(parent) / "saap.json").is_file():
                return None
            meta = read_metadata(parent)
    else:
        return None
    return meta.get("source") if meta.get("kind") == "pruned" else None


def _link_parents(models: list[BenchModel]) -> None:
    by_name = {m.spec: m for m in models} | {str(Path(m.spec).resolve()): m for m in models if m.kind != "alias"}
    for model in models:
        source = _pruned_source(model) or {}
        for key in (source.get("name"), source.get("path")):
            parent = by_name.get(key) or (by_name.get(str(Path(key).resolve())) if key else None)
            if parent is not None and parent is not model:
                model.parent = parent.label
                break

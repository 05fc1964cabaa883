"""Pickle-free Trainer checkpoints: nested state as safetensors + JSON, and the files of a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainingArguments

from saap.runtime.errors import SaapError

ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_TENSORS, OPTIMIZER_JSON = "optimizer.safetensors", "optimizer.json"
RUN_FILE = "run.json"
BEST_ADAPTER_FILE, BEST_JSON = "best_adapter.safetensors", "best.json"
ELAPSED_FILE = "elapsed.json"


def _encode(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """JSON for nested state dicts; tensors go to ``tensors`` (safetensors), dict keys keep their
    type (the optimizer's state is keyed by int and silently ignores str keys on load)."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(obj, np.ndarray):
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj).contiguous()
        return {"ndarray": key, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {"dict": [[k, _encode(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
        return {"list": items} if isinstance(obj, list) else {"tuple": items}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    if isinstance(obj, np.generic):
        return {"value": obj.item()}
    raise TypeError(f"cannot store a {type(obj).__name__} in a safetensors + JSON checkpoint")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "ndarray" in node:
        return tensors[node["ndarray"]].numpy().astype(node["dtype"])
    if "dict" in node:
        return {k: _decode(v, tensors) for k, v in node["dict"]}
    if "list" in node:
        return [_decode(v, tensors) for v in node["list"]]
    if "tuple" in node:
        return tuple(_decode(v, tensors) for v in node["tuple"])
    return node["value"]


def save_state(directory: Path, stem: str, state: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, "s")
    save_file(tensors, directory / f"{stem}.safetensors")
    (directory / f"{stem}.json").write_text(json.dumps(tree) + "\n")


def load_state(directory: Path, stem: str) -> Any:
    tree = json.loads((directory / f"{stem}.json").read_text())
    return _decode(tree, load_file(directory / f"{stem}.safetensors"))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the parameters being trained (the adapters)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` (from ``trainable_state`` or a checkpoint) into the model's trainable parameters."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        raise SaapError(f"{source} does not match this run's adapters")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def saved_checkpoint(args: TrainingArguments, state) -> Path | None:
    """The checkpoint directory the Trainer just wrote, on the process that writes files."""
    checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
    return checkpoint if state.is_world_process_zero and checkpoint.is_dir() else None


def last_checkpoint(partial: Path) -> Path | None:
    steps = [
        (int(p.name.rsplit("-", 1)[1]), p)
        for p in partial.glob("checkpoint-*")
        if p.name.rsplit("-", 1)[1].isdigit() and (p / "trainer_state.json").is_file() and (p / ADAPTER_FILE).is_file()
    ]
    return max(steps)[1] if steps else None

"""The saap checkpoint: a plain directory anyone can read, with per-layer shapes made explicit.

    config.json        the family's standard keys + ``*_per_layer`` lists (see runtime.surgery)
    model.safetensors  weights at their pruned shapes (tied lm_head stored once, as HF does)
    tokenizer files    whatever the Hugging Face tokenizer writes
    saap.json          provenance: source and its sha256, settings, parameter counts, file sha256s

Writes go to a temporary sibling directory renamed into place at the end, so a crash never leaves
a half-written checkpoint. Loading builds the model at its stored shapes on the meta device (no
dense model, no random init), loads the safetensors strictly and verifies every sha256. The family
(``runtime.families``) comes from ``config.json``'s ``model_type``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from saap.runtime.errors import SaapError
from saap.runtime.families import family_of
from saap.runtime.io import atomic_dir
from saap.runtime.surgery import has_output_bias, head_dim, layer_shapes, reshape_empty_layer

METADATA_FILE = "saap.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    metadata: dict[str, Any],
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``model`` and ``tokenizer`` as a saap checkpoint; returns the saap.json written."""
    with atomic_dir(out_dir, overwrite) as tmp:
        model.config.architectures = [family_of(model).architecture]
        model.config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # stored once, re-tied at load
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        family_of(model).write_notice(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        metadata = {"format_version": FORMAT_VERSION, **metadata, "files": files}
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def read_metadata(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / METADATA_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SaapError(f"'{path}' is not a readable saap checkpoint: {METADATA_FILE}: {e}") from None


def verify_files(path: str | Path, metadata: dict[str, Any]) -> None:
    for name, expected in metadata.get("files", {}).items():
        file = Path(path) / name
        if not file.is_file():
            raise SaapError(f"checkpoint '{path}' is incomplete: {name} is missing")
        if sha256_file(file) != expected:
            raise SaapError(f"checkpoint '{path}' is corrupt: sha256 of {name} does not match {METADATA_FILE}")


def load_checkpoint(
    path: str | Path, verify: bool = True, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Load a saap checkpoint at its stored per-layer shapes."""
    path = Path(path)
    metadata = read_metadata(path)
    if verify:
        verify_files(path, metadata)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SaapError(f"checkpoint '{path}': cannot read config.json: {str(e).splitlines()[0]}") from None
    family = family_of(config)
    # Parameters on the meta device, buffers (RoPE frequencies, Gemma's embedding scale) built for real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    hd = head_dim(config)
    for layer, shape in zip(family.layers(model), layer_shapes(config), strict=True):
        reshape_empty_layer(layer, shape, hd, has_output_bias(config))

    try:
        state = load_file(path / WEIGHTS_FILE)
    except (SafetensorError, OSError) as e:
        raise SaapError(f"cannot read '{path / WEIGHTS_FILE}': {e}") from None
    expected = set(model.state_dict())
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing, unexpected = expected - set(state) - optional, set(state) - expected
    if missing or unexpected:
        raise SaapError(
            f"checkpoint '{path}' does not match its config: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    for name, tensor in state.items():
        want = model.get_parameter(name).shape
        if tensor.shape != want:
            raise SaapError(f"checkpoint '{path}': {name} has shape {tuple(tensor.shape)}, config says {tuple(want)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise SaapError(f"checkpoint '{path}' left tensors unloaded: {still_meta[:3]}")
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        model.generation_config = GenerationConfig.from_model_config(config)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, metadata

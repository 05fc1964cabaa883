"""The saap checkpoint: a plain directory anyone can read, with per-layer shapes made explicit.

    config.json        the family's standard keys; per-layer shapes add ``*_per_layer`` lists, transformers
                       5's ``per_layer_config`` and an ``auto_map`` to modeling_saap.py
    model.safetensors  weights at their pruned shapes (tied lm_head stored once, as HF does)
    modeling_saap.py   per-layer shapes only: ``runtime.per_layer_model`` as is, so that
                       ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it
                       without saap (docs/checkpoints.md says why remote code, and what it costs)
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

from saap.runtime import per_layer_model
from saap.runtime.errors import SaapError
from saap.runtime.families import family_of
from saap.runtime.io import atomic_dir
from saap.runtime.surgery import (
    PER_LAYER_KEYS,
    has_output_bias,
    head_dim,
    layer_shapes,
    reshape_empty_layer,
)

METADATA_FILE = "saap.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
MODELING_FILE = "modeling_saap.py"


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
        if is_per_layer(model.config):
            write_modeling_file(model.config, tmp)
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


def is_per_layer(config) -> bool:
    """Whether ``config`` lists per-layer shapes (a standard config of the family does not)."""
    return any(getattr(config, key, None) is not None for key in PER_LAYER_KEYS.values())


def per_layer_config(config) -> dict[str, dict]:
    """transformers 5's ``per_layer_config`` (sparse: a layer's keys that differ from the global ones;
    a removed block is a ``skip``), written beside saap's lists so the checkpoint is ready for its
    modelling side (transformers PR #45332) when that lands."""
    keys = list(PER_LAYER_KEYS)
    overrides = {}
    for i, shape in enumerate(layer_shapes(config)):
        entry: dict = {
            k: getattr(shape, k) for k in keys if getattr(shape, k) and getattr(shape, k) != getattr(config, k)
        }
        skip = [name for name, width in (("attention", shape.num_key_value_heads), ("mlp", shape.intermediate_size))
                if width == 0]  # fmt: skip
        if skip:
            entry["skip"] = skip
        if entry:
            overrides[str(i)] = entry
    return overrides


def write_modeling_file(config, directory: Path) -> None:
    """``modeling_saap.py`` beside the weights, and the config keys that point ``AutoModelForCausalLM``
    at it: the family's own class, with each layer's projections at the shapes config.json lists."""
    source = Path(per_layer_model.__file__).read_text()
    base = family_of(config).architecture
    footer = f"\n\nimport transformers  # noqa: E402\n\nSaapForCausalLM = per_layer_class(transformers.{base})\n"
    (directory / MODELING_FILE).write_text(source + footer)
    config.auto_map = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.SaapForCausalLM"}
    config.per_layer_config = per_layer_config(config)


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

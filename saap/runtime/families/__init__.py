"""The decoder families saap handles: one adapter module per family, registered by ``model_type``.

Adding a family is one module here (a ``Family`` subclass decorated with ``@register``) plus its
tests; nothing else in saap names a family. ``family_of`` is the only way in.
"""

from __future__ import annotations

from saap.runtime.errors import SaapError
from saap.runtime.families.base import Family

FAMILIES: dict[str, type[Family]] = {}


def register(cls: type[Family]) -> type[Family]:
    FAMILIES[cls.model_type] = cls
    return cls


def family_of(obj) -> type[Family]:
    """The adapter of a model, a config, or a ``model_type`` string; one clear error otherwise."""
    config = getattr(obj, "config", obj)
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise SaapError(f"unsupported architecture '{model_type}': saap handles {', '.join(supported_names())}")
    return FAMILIES[model_type]


def gguf_architectures() -> set[str]:
    """The GGUF architectures whose files saap reads (transformers' GGUF loader turns them into a family)."""
    return {f.gguf_arch for f in FAMILIES.values()}


def family_for_gguf(arch: str) -> type[Family]:
    """The family whose GGUF architecture ``arch`` is (``deci`` is a per-layer Llama)."""
    for family in FAMILIES.values():
        if arch in (family.gguf_arch, family.gguf_per_layer_arch):
            return family
    raise SaapError(f"unsupported GGUF architecture '{arch}': saap handles {', '.join(supported_names())}")


def supported_names() -> list[str]:
    return [f"{f.display} ({f.architecture})" for f in FAMILIES.values()]


# Imported for their @register side effect; the order is the order the README lists them in.
from saap.runtime.families import gemma3, llama, mistral, qwen2, qwen3  # noqa: E402, F401

__all__ = [
    "FAMILIES",
    "Family",
    "family_for_gguf",
    "family_of",
    "gguf_architectures",
    "register",
    "supported_names",
]

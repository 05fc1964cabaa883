"""Per-layer shapes of a pruned decoder, and the model class that builds them: self-contained.

This file imports nothing from saap, only torch and transformers, because it is also written beside
a per-layer checkpoint's weights as ``modeling_saap.py`` (see ``runtime.checkpoint``): with
``trust_remote_code=True``, ``AutoModelForCausalLM`` and every tool built on it (lm-eval's ``hf``
model, ...) then load the checkpoint with no saap installed. saap's own loader and surgery use the
same functions, so the shapes a checkpoint declares are built one way everywhere.

A per-layer checkpoint's config.json holds the family's standard keys plus one list per shape key
(``PER_LAYER_KEYS``); a removed attention or MLP block is a width of 0, built as ``RemovedAttention``
/ ``RemovedMLP``. ``config.output_bias`` (default false) gives every o_proj / down_proj a bias (FLAP's
compensation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

# Per-layer shape keys written into config.json next to the family's standard keys.
PER_LAYER_KEYS = {
    "num_attention_heads": "num_attention_heads_per_layer",
    "num_key_value_heads": "num_key_value_heads_per_layer",
    "intermediate_size": "intermediate_size_per_layer",
}


@dataclass(frozen=True)
class LayerShape:
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    @property
    def queries_per_kv_head(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads if self.num_key_value_heads else 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class RemovedAttention(nn.Module):
    """A layer's attention block pruned away entirely: it adds nothing to the residual stream.

    It never touches the KV cache; HF's cache grows per layer lazily and reads sequence lengths
    from layer 0, which is why the pruner never removes layer 0's attention.
    """

    def __init__(self, layer_idx: int, is_sliding: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_sliding = is_sliding  # Gemma 3's layer reads it to pick its RoPE table

    @classmethod
    def replacing(cls, attention: nn.Module) -> RemovedAttention:
        return cls(attention.layer_idx, bool(getattr(attention, "is_sliding", False)))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class RemovedMLP(nn.Module):
    """A layer's MLP block pruned away entirely."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_shapes(config) -> list[LayerShape]:
    """Shapes of every decoder layer: the per-layer lists if present, else the dense values."""
    n = config.num_hidden_layers
    columns = {}
    for key, per_layer_key in PER_LAYER_KEYS.items():
        values = getattr(config, per_layer_key, None)
        columns[key] = list(values) if values is not None else [getattr(config, key)] * n
        if len(columns[key]) != n:
            raise ValueError(f"config.{per_layer_key} has {len(columns[key])} entries, expected {n}")
    return [LayerShape(*values) for values in zip(*(columns[k] for k in PER_LAYER_KEYS), strict=True)]


def has_output_bias(config) -> bool:
    """Whether o_proj and down_proj carry a bias of their own (``config.output_bias``)."""
    return bool(getattr(config, "output_bias", False))


def set_attention_counts(attention: nn.Module, shape: LayerShape) -> None:
    # HF reads the query/KV ratio from the module, not the weights: keep it in step with the slice.
    attention.num_key_value_groups = shape.queries_per_kv_head
    attention.num_heads = shape.num_attention_heads
    attention.num_key_value_heads = shape.num_key_value_heads


def reshape_empty_layer(
    layer: nn.Module, shape: LayerShape, hd: int, output_bias: bool = False, device: str | None = "meta"
) -> None:
    """Give ``layer`` uninitialised modules of ``shape`` for a checkpoint load (on ``device``; None:
    wherever the surrounding context puts new modules, as in ``from_pretrained``).

    ``output_bias``: o_proj and down_proj get a bias even where the family's config gives them none.
    """
    attention, mlp = layer.self_attn, layer.mlp
    hidden = attention.q_proj.in_features
    q_width, kv_width = shape.num_attention_heads * hd, shape.num_key_value_heads * hd

    def bias(linear: nn.Linear, extra: bool = False) -> bool:
        # Each projection keeps the bias its family gives it (Qwen2: q/k/v yes, o_proj no).
        return linear.bias is not None or extra

    def linear(n_in: int, n_out: int, like: nn.Linear, extra: bool = False) -> nn.Linear:
        return nn.Linear(n_in, n_out, bias=bias(like, extra), device=device, dtype=like.weight.dtype)

    if shape.num_key_value_heads == 0:
        layer.self_attn = RemovedAttention.replacing(attention)
    else:
        attention.q_proj = linear(hidden, q_width, attention.q_proj)
        attention.k_proj = linear(hidden, kv_width, attention.k_proj)
        attention.v_proj = linear(hidden, kv_width, attention.v_proj)
        attention.o_proj = linear(q_width, hidden, attention.o_proj, output_bias)
        set_attention_counts(attention, shape)
    if shape.intermediate_size == 0:
        layer.mlp = RemovedMLP()
    else:
        mlp.gate_proj = linear(hidden, shape.intermediate_size, mlp.gate_proj)
        mlp.up_proj = linear(hidden, shape.intermediate_size, mlp.up_proj)
        mlp.down_proj = linear(shape.intermediate_size, hidden, mlp.down_proj, output_bias)
        mlp.intermediate_size = shape.intermediate_size


def per_layer_class(base: type) -> type:
    """``base`` (a family's ``*ForCausalLM``) built at the per-layer shapes its config lists.

    The family's own modules are built first, then each layer's projections are replaced at its
    shape, so every norm, rotary table and attention kernel stays the family's own."""

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        hd, bias = head_dim(config), has_output_bias(config)
        for layer, shape in zip(self.model.layers, layer_shapes(config), strict=True):
            reshape_empty_layer(layer, shape, hd, bias, device=None)

    return type(f"PerLayer{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})

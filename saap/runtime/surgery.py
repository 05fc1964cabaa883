"""Model surgery shared by every stage: per-layer shapes, coupled pruning groups, physical slicing.

A decoder layer of every supported family (``runtime.families``) has two kinds of coupled structure
(Torch-Pruning's "group"): removing one member forces the others out too.

* Attention group j = KV head j with the query heads that read it (HF's ``repeat_kv`` gives query
  head i the KV head ``i // groups``): q rows of those query heads, k/v rows of head j, and the
  o_proj input columns of those query heads. For multi-head attention this is a single head.
* MLP group c = intermediate channel c: gate/up row c and down_proj input column c.

Embeddings, norms (per-head q/k norms included) and lm_head are never touched; a q/k/v bias goes
with its rows. A pruner may add a bias to o_proj and down_proj
(FLAP's bias compensation): ``config.output_bias`` (a saap key, default false) says every present
o_proj / down_proj carries one, independently of the family's own biases. Both
the pruner (slicing real weights) and the runtime loader (building empty modules at a checkpoint's
shapes) go through this module, so the shapes a checkpoint declares are exactly the shapes the
pruner wrote.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from saap.runtime.per_layer_model import (  # noqa: F401  (re-exported: the shape vocabulary of every stage)
    PER_LAYER_KEYS,
    LayerShape,
    RemovedAttention,
    RemovedMLP,
    has_output_bias,
    head_dim,
    layer_shapes,
    reshape_empty_layer,
    set_attention_counts,
)


def set_layer_shapes(config, shapes: list[LayerShape]) -> None:
    """Record per-layer shapes in the config; the dense keys keep the parent's values."""
    for key, per_layer_key in PER_LAYER_KEYS.items():
        setattr(config, per_layer_key, [getattr(s, key) for s in shapes])


def compact(model: nn.Module) -> list[int]:
    """Make a uniform plan a standard model of its family: delete the layers pruned away whole,
    renumber the rest, and state the one kept shape in the family's own config keys (no per-layer
    lists, so any tool that knows the family loads it). Returns the removed layers' old indices."""
    config, shapes = model.config, layer_shapes(model.config)
    kept = [i for i, s in enumerate(shapes) if s != LayerShape(0, 0, 0)]
    if len({shapes[i] for i in kept}) != 1:
        raise ValueError("compact: the kept layers have more than one shape")
    layers, shape = decoder_layers(model), shapes[kept[0]]
    for i in reversed(range(len(shapes))):
        if i not in kept:
            del layers[i]
    for j, layer in enumerate(layers):  # the KV cache is indexed by layer_idx
        for module in (layer, layer.self_attn):
            if hasattr(module, "layer_idx"):
                module.layer_idx = j
    config.head_dim = head_dim(config)  # explicit: hidden / heads no longer gives it once heads are fewer
    config.num_hidden_layers = len(kept)
    config.num_attention_heads, config.num_key_value_heads = shape.num_attention_heads, shape.num_key_value_heads
    config.intermediate_size = shape.intermediate_size
    if isinstance(getattr(config, "layer_types", None), list):  # sliding/full per layer (Gemma 3, Qwen2, ...)
        config.layer_types = [config.layer_types[i] for i in kept]
    for key in PER_LAYER_KEYS.values():
        if hasattr(config, key):
            delattr(config, key)
    return [i for i in range(len(shapes)) if i not in kept]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a model of any supported family."""
    from saap.runtime.families import family_of

    return family_of(model).layers(model)


def block_output(layer: nn.Module, module: str) -> nn.Linear:
    """The projection that writes a block's output to the residual stream (``attention``: o_proj,
    ``mlp``: down_proj); its input columns are the block's groups, so masks and hooks sit there."""
    return layer.self_attn.o_proj if module == "attention" else layer.mlp.down_proj


def has_attention(layer: nn.Module) -> bool:
    return not isinstance(layer.self_attn, RemovedAttention)


def has_mlp(layer: nn.Module) -> bool:
    return not isinstance(layer.mlp, RemovedMLP)


@dataclass(frozen=True)
class _LayerCounts:
    """Parameters of one decoder layer as a linear function of its shape (see ``_layer_counts``)."""

    fixed: int  # norms outside the blocks
    attention: int  # an attention block whatever its width: o_proj bias, q/k norms
    per_query_head: int  # q rows (+ bias) and o_proj columns of one query head
    per_kv_head: int  # k and v rows (+ biases) of one KV head
    mlp: int  # an MLP whatever its width: down_proj bias
    per_channel: int  # gate and up rows (+ biases) and the down_proj column of one channel


_COUNTS: dict[tuple[str, ...], _LayerCounts] = {}


def _layer_counts(config) -> _LayerCounts:
    """Read off a dense layer of the family built on the meta device (no memory, no init), so every
    family's biases and extra norms are counted without a per-family formula. Cached per config."""
    key = tuple(
        str(getattr(config, k, None))
        for k in ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                  "head_dim", "attention_bias", "mlp_bias", "output_bias")
    )  # fmt: skip
    if key not in _COUNTS:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            layer = AutoModelForCausalLM.from_config(config).model.layers[0]
        a, m = layer.self_attn, layer.mlp

        def n(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        hidden, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        extra_bias = hidden if has_output_bias(config) else 0
        _COUNTS[key] = _LayerCounts(
            fixed=n(layer) - n(a) - n(m),
            attention=n(a)
            - n(a.q_proj)
            - n(a.k_proj)
            - n(a.v_proj)
            - a.o_proj.weight.numel()
            + (extra_bias if a.o_proj.bias is None else 0),
            per_query_head=(n(a.q_proj) + a.o_proj.weight.numel()) // heads,
            per_kv_head=(n(a.k_proj) + n(a.v_proj)) // kv,
            mlp=n(m)
            - n(m.gate_proj)
            - n(m.up_proj)
            - m.down_proj.weight.numel()
            + (extra_bias if m.down_proj.bias is None else 0),
            per_channel=(n(m.gate_proj) + n(m.up_proj) + m.down_proj.weight.numel()) // config.intermediate_size,
        )
    return _COUNTS[key]


def layer_parameter_count(config, shape: LayerShape) -> int:
    """Parameters of one decoder layer at ``shape`` (weights, biases, norms), for any family."""
    c = _layer_counts(config)
    total = c.fixed
    if shape.num_key_value_heads:
        total += c.attention + shape.num_attention_heads * c.per_query_head + shape.num_key_value_heads * c.per_kv_head
    if shape.intermediate_size:
        total += c.mlp + shape.intermediate_size * c.per_channel
    return total


def decode_parameter_count(config, shapes: list[LayerShape]) -> int:
    """Weights read to generate one token: every decoder layer, the final norm, the output
    projection (tied or not, it is read whole) and a single embedding row."""
    layers = sum(layer_parameter_count(config, s) for s in shapes)
    return layers + config.hidden_size + config.vocab_size * config.hidden_size + config.hidden_size


def config_parameter_count(config) -> int:
    """Unique parameters of the model ``config`` describes (per-layer shapes included, tied
    embedding counted once): the same number as ``model_parameter_count`` without building it."""
    layers = sum(layer_parameter_count(config, s) for s in layer_shapes(config))
    embeddings = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    return layers + embeddings + config.hidden_size  # + the final norm


def model_parameter_count(model: nn.Module) -> int:
    """Unique parameters (a tied embedding counts once, as the papers count it)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def attention_group_index(shape: LayerShape, hd: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each KV head j: its q-row indices [n_kv, G*hd] and k/v-row indices [n_kv, hd]."""
    n_kv, queries = shape.num_key_value_heads, shape.queries_per_kv_head
    q_rows = torch.arange(n_kv * queries * hd).view(n_kv, queries * hd)
    kv_rows = torch.arange(n_kv * hd).view(n_kv, hd)
    return q_rows, kv_rows


def attention_columns(
    shape: LayerShape, hd: int, groups: torch.Tensor, queries: torch.Tensor | None = None
) -> torch.Tensor:
    """The o_proj input columns (= q rows) of KV groups ``groups``: their query heads' outputs.

    ``queries`` [len(groups), kept]: which query heads of each listed group stay (slots 0..G-1 inside
    the group, Minitron's query-head narrowing); None keeps every query head of those groups."""
    rows = attention_group_index(shape, hd)[0][groups]  # [groups, G * hd]
    if queries is None:
        return rows.flatten()
    heads = rows.view(len(groups), shape.queries_per_kv_head, hd)
    return torch.stack([heads[g, queries[g]] for g in range(len(groups))]).flatten()


def kept_queries(scores: torch.Tensor, shape: LayerShape, groups: torch.Tensor, keep: int) -> torch.Tensor:
    """[len(groups), keep]: each listed KV group's ``keep`` highest-scoring query heads (slots inside
    the group, in order); ``scores`` has one entry per query head of the layer."""
    per_group = scores.view(shape.num_key_value_heads, shape.queries_per_kv_head)[groups]
    return per_group.topk(keep, dim=1).indices.sort(dim=1).values


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new, smaller nn.Linear keeping ``index`` along output (dim 0) or input (dim 1) features."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device)).clone()
    bias = None
    if linear.bias is not None:
        bias = linear.bias.detach().clone() if dim == 1 else linear.bias.detach()[index].clone()
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    return new


def shrink_layer(
    layer: nn.Module,
    shape: LayerShape,
    hd: int,
    keep_kv_heads: torch.Tensor,
    keep_channels: torch.Tensor,
    keep_queries: torch.Tensor | None = None,
) -> LayerShape:
    """Physically remove every attention group and MLP channel of ``layer`` not listed to keep.

    ``keep_queries`` [kept groups, kept per group] (slots inside each group, in the order of the sorted
    ``keep_kv_heads``) also narrows each kept group to those query heads; every group keeps the same
    number, so HF's ``repeat_kv`` still maps query head i to KV head i // G'. Keeping nothing of a
    block replaces it with ``RemovedAttention`` / ``RemovedMLP``.
    """
    order = keep_kv_heads.argsort()
    keep_kv_heads, keep_channels = keep_kv_heads[order], keep_channels.sort().values
    if keep_queries is not None:
        keep_queries = keep_queries[order]
    per_group = shape.queries_per_kv_head if keep_queries is None else keep_queries.shape[1]
    new_shape = LayerShape(
        num_attention_heads=len(keep_kv_heads) * per_group,
        num_key_value_heads=len(keep_kv_heads),
        intermediate_size=len(keep_channels),
    )
    if new_shape.num_key_value_heads == 0:
        layer.self_attn = RemovedAttention.replacing(layer.self_attn)
    elif has_attention(layer):
        attention = layer.self_attn
        q_keep = attention_columns(shape, hd, keep_kv_heads, keep_queries)
        kv_keep = attention_group_index(shape, hd)[1][keep_kv_heads].flatten()
        attention.q_proj = _slice_linear(attention.q_proj, q_keep, 0)
        attention.k_proj = _slice_linear(attention.k_proj, kv_keep, 0)
        attention.v_proj = _slice_linear(attention.v_proj, kv_keep, 0)
        attention.o_proj = _slice_linear(attention.o_proj, q_keep, 1)
        set_attention_counts(attention, new_shape)
    if new_shape.intermediate_size == 0:
        layer.mlp = RemovedMLP()
    elif has_mlp(layer):
        mlp = layer.mlp
        mlp.gate_proj = _slice_linear(mlp.gate_proj, keep_channels, 0)
        mlp.up_proj = _slice_linear(mlp.up_proj, keep_channels, 0)
        mlp.down_proj = _slice_linear(mlp.down_proj, keep_channels, 1)
        mlp.intermediate_size = new_shape.intermediate_size
    return new_shape


def kept_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest-scoring groups, in their original order."""
    return scores.topk(keep).indices.sort().values


def add_output_bias(layer: nn.Module) -> None:
    """Give the layer's o_proj and down_proj a (zero) bias if they have none, in place."""
    for linear in [layer.self_attn.o_proj] * has_attention(layer) + [layer.mlp.down_proj] * has_mlp(layer):
        if linear.bias is None:
            w = linear.weight
            linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False)


def prunable_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The linears of the blocks this layer still has (a removed block has none)."""
    linears = {}
    if has_attention(layer):
        a = layer.self_attn
        linears |= {"q_proj": a.q_proj, "k_proj": a.k_proj, "v_proj": a.v_proj, "o_proj": a.o_proj}
    if has_mlp(layer):
        m = layer.mlp
        linears |= {"gate_proj": m.gate_proj, "up_proj": m.up_proj, "down_proj": m.down_proj}
    return linears


# Which axis of each weight indexes its groups: output rows, or input columns for o_proj/down_proj.
GROUP_AXIS = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 0, "up_proj": 0, "down_proj": 1}


def reduce_to_group_axis(name: str, per_element: torch.Tensor) -> torch.Tensor:
    """Sum a per-element tensor of weight ``name`` over everything but its group axis."""
    return per_element.sum(1 - GROUP_AXIS[name])


def groups_from_reduced(shape: LayerShape, hd: int, reduced: dict[str, torch.Tensor]):
    """Group totals ``(attention [n_kv], mlp [intermediate])`` from per-row/column sums."""
    attention, mlp = torch.zeros(0), torch.zeros(0)
    if "q_proj" in reduced:
        q_rows, kv_rows = attention_group_index(shape, hd)
        attention = (
            reduced["q_proj"][q_rows].sum(1)
            + reduced["k_proj"][kv_rows].sum(1)
            + reduced["v_proj"][kv_rows].sum(1)
            + reduced["o_proj"][q_rows].sum(1)
        )
    if "gate_proj" in reduced:
        mlp = reduced["gate_proj"] + reduced["up_proj"] + reduced["down_proj"]
    return attention, mlp


def group_sums(shape: LayerShape, hd: int, per_element: dict[str, torch.Tensor]):
    """Sum a per-element quantity (same shapes as the prunable weights) over each coupled group.

    Returns ``(attention [n_kv], mlp [intermediate])``. Every importance estimator goes through
    this, so the group membership lives in this one place.
    """
    reduced = {name: reduce_to_group_axis(name, t) for name, t in per_element.items()}
    return groups_from_reduced(shape, hd, reduced)

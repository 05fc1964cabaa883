"""Aligned removal units and the cheapest-first removal heap (FLAP's threshold, SAAP's old search).

A module's next *unit* is the step from its current size to the next aligned size below: a chunk
of MLP channels down to a multiple of ``align``, or KV groups down to a kept count whose q width is
a multiple of ``align``. Layer 0 keeps at least one attention group, because HF's KV cache reads
the sequence length from layer 0.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from saap.runtime.surgery import LayerShape, head_dim, layer_parameter_count

MODULES = ("attention", "mlp")

# (module, layer, index of the unit's first group in the ascending score order, groups, params) -> priority
Priority = Callable[[str, int, int, int, int], float]


def kept_kv_counts(config, shape: LayerShape, layer: int, align: int) -> list[int]:
    """KV group counts a layer of ``shape``'s query/KV ratio may keep (ascending, current included)."""
    q, hd = shape.queries_per_kv_head, head_dim(config)
    counts = [k for k in range(shape.num_key_value_heads + 1) if (k * q * hd) % align == 0]
    return [k for k in counts if k > 0 or layer > 0]


def attention_sizes(config, shape: LayerShape, layer: int, align: int, narrow_queries: bool) -> list[tuple[int, int]]:
    """``(KV groups, query heads per group)`` a layer may keep, by ascending query heads (the current
    size last; removal is ``(0, G)``). ``narrow_queries``: also fewer query heads in each kept group,
    ModelOpt Minitron's head pruning, the only narrowing left to a layer with one KV head (Gemma 3 270M)."""
    q, hd = shape.queries_per_kv_head, head_dim(config)
    counts = kept_kv_counts(config, shape, layer, align)
    per_group = range(1, q + 1) if narrow_queries else [q]
    sizes = {(k, g) for k in counts if k for g in per_group if (k * g * hd) % align == 0}
    sizes |= {(0, q)} if 0 in counts else set()
    return sorted(sizes, key=lambda size: (size[0] * size[1], size[0]))


def next_unit(config, original: LayerShape, shape: LayerShape, module: str, layer: int, align: int):
    """``(groups removed, new shape)`` of the module's next aligned step, or None when it cannot shrink."""
    if module == "attention":
        q = original.queries_per_kv_head
        kept = [k for k in kept_kv_counts(config, original, layer, align) if k < shape.num_key_value_heads]
        if not kept:
            return None
        return shape.num_key_value_heads - kept[-1], LayerShape(kept[-1] * q, kept[-1], shape.intermediate_size)
    if not shape.intermediate_size:
        return None
    width = (shape.intermediate_size - 1) // align * align
    new = LayerShape(shape.num_attention_heads, shape.num_key_value_heads, width)
    return shape.intermediate_size - width, new


def remove_cheapest(
    config, shapes: list[LayerShape], align: int, remove_params: int, priority: Priority, closest: bool
) -> list[LayerShape]:
    """Remove units lowest priority first across every layer until ``remove_params`` are gone.

    ``closest``: stop before a unit that would overshoot the budget by more than stopping undershoots
    (FLAP's threshold); otherwise the last unit may overshoot (at most one unit).
    """
    current, removed_count = list(shapes), {module: [0] * len(shapes) for module in MODULES}

    def push(module: str, i: int) -> None:
        unit = next_unit(config, shapes[i], current[i], module, i, align)
        if unit:
            count, new = unit
            params = layer_parameter_count(config, current[i]) - layer_parameter_count(config, new)
            heapq.heappush(
                heap, (priority(module, i, removed_count[module][i], count, params), module, i, count, params)
            )

    heap: list = []
    for module in MODULES:
        for i in range(len(shapes)):
            push(module, i)
    removed = 0
    while heap and removed < remove_params:
        _, module, i, count, params = heapq.heappop(heap)
        if closest and removed + params - remove_params > remove_params - removed:
            break
        removed_count[module][i] += count
        shape = current[i]  # the other module of this layer may have shrunk since the unit was queued
        if module == "attention":
            kv = shape.num_key_value_heads - count
            current[i] = LayerShape(kv * shapes[i].queries_per_kv_head, kv, shape.intermediate_size)
        else:
            current[i] = LayerShape(
                shape.num_attention_heads, shape.num_key_value_heads, shape.intermediate_size - count
            )
        removed += params
        push(module, i)
    return current

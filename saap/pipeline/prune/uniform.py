"""Uniform-shape search (``--shape uniform``): one kept width for every layer, plus whole layers removed.

A per-layer plan gives each layer its own query heads, KV heads and MLP width; no standard config
can describe it, so only saap's loader, its exports and tools that run remote code can load it. A
uniform plan keeps the same shape in every layer it keeps and removes the others whole, as NVIDIA's
Minitron does: the result is a standard checkpoint of the source family (``runtime.surgery.compact``)
that plain transformers, llama.cpp's converter and the onnxruntime-genai builder take unchanged.

The choice is measured on the calibration KL, as the per-layer search's (``measured``):

1. **Costs.** Every layer's candidates are measured as there: attention at each kept size, the MLP at
   ``width_levels`` widths (interpolated between), and the whole layer removed.
2. **Per common shape.** For each shape S a layer may keep (every aligned attention size with at least
   one KV group, every aligned MLP width above 0), each layer either keeps S or is removed; the
   multiple-choice knapsack (``measured.choose``) picks the removed layers that minimise the summed
   cost with the budget met. Layer 0 is never removed (the per-layer search's rule too). A family
   adapter may rule out what llama.cpp's converter cannot express: fewer query heads (Qwen2) or
   removed layers (Gemma 3, whose layer pattern the converter does not write).
3. **Choice on the whole model.** Summed costs ignore how the layers' errors interact, so the
   ``FINALISTS`` cheapest plans by that sum are each scored by their whole-model KL, and the lowest wins.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from saap.pipeline.prune.context import PruneContext, Scored
from saap.pipeline.prune.measured import Keep, Probe, aligned_widths, choose, measure, query_scores, width_levels
from saap.pipeline.prune.units import attention_sizes
from saap.runtime.errors import SaapError
from saap.runtime.families import family_of
from saap.runtime.surgery import LayerShape

FINALISTS = 6  # plans scored on their whole-model KL (one forward of the search sequences each)


def common_keeps(ctx: PruneContext) -> list[Keep]:
    """Every shape a kept layer may take: the same grid as the per-layer search's, without removals."""
    shape = ctx.shapes[0]
    if any(s != shape for s in ctx.shapes):
        raise SaapError("--shape uniform needs a model whose layers all have one shape (an unpruned model)")
    sizes = attention_sizes(ctx.config, shape, 1, ctx.align, ctx.settings.narrow_queries)
    if family_of(ctx.config).uniform_fixed_queries:
        sizes = [(kv, q) for kv, q in sizes if kv * q == shape.num_attention_heads]
    widths = aligned_widths(shape.intermediate_size, ctx.align)
    return [Keep(kv, width, queries) for kv, queries in sizes if kv for width in widths if width]


def uniform_candidates(ctx: PruneContext, costs: list) -> list[tuple[float, list[Keep]]]:
    """For each common shape, the layers to remove (knapsack on the measured costs): (summed cost, keeps)."""
    shape, removed = ctx.shapes[0], Keep(0, 0, ctx.shapes[0].queries_per_kv_head)
    gone = LayerShape(0, 0, 0)
    drop = [(c.cost(removed) if c.layer is not None else None, ctx.budget.saved(i, shape, gone))
            for i, c in enumerate(costs)]  # fmt: skip
    plans = []
    for keep in common_keeps(ctx):
        options = []
        for i, layer_costs in enumerate(costs):
            kept = (layer_costs.cost(keep), ctx.budget.saved(i, shape, keep.shape(shape)))
            can_drop = i > 0 and drop[i][0] is not None and family_of(ctx.config).uniform_removes_layers
            options.append([kept, drop[i]] if can_drop else [kept])
        chosen = choose(options, ctx.budget.remove)
        if chosen is None:
            continue
        keeps = [removed if j else keep for j in chosen]
        plans.append((sum(options[i][j][0] for i, j in enumerate(chosen)), keeps))
    if not plans:
        raise SaapError(f"the budget ({ctx.budget.remove:,.1f} {ctx.budget.unit}) is out of reach of a uniform shape")
    return sorted(plans, key=lambda p: p[0])


def uniform_plan(ctx: PruneContext, scored: Scored) -> tuple[list[LayerShape], dict]:
    """The uniform plan of lowest whole-model KL among the ``FINALISTS`` cheapest by summed cost."""
    settings, started = ctx.settings, time.perf_counter()
    tokens = torch.cat(ctx.batches)[: settings.search_samples]
    probe = Probe(ctx.model, tokens, scored.scores, ctx.shapes)
    per_layer = [
        len(attention_sizes(ctx.config, s, i, ctx.align, settings.narrow_queries))
        + len(width_levels(s.intermediate_size, settings.width_levels, ctx.align))
        + 1
        for i, s in enumerate(ctx.shapes)
    ]
    bar = tqdm(total=sum(per_layer) + FINALISTS, desc="uniform search", unit="run", disable=not ctx.progress)
    whole = [Keep.of(s) for s in ctx.shapes]
    try:
        if settings.narrow_queries:  # which query heads a narrowed group keeps: measured as the per-layer search does
            scored.scores.queries = query_scores(probe, ctx)
        candidates = uniform_candidates(ctx, measure(probe, {}, ctx, bar))[:FINALISTS]
        finalists = []
        for summed, keeps in candidates:
            plan = {i: k for i, (k, w) in enumerate(zip(keeps, whole, strict=True)) if k != w}
            finalists.append((probe.inputs_under(plan)[1], summed, keeps))
            bar.update()
    finally:
        bar.close()
        probe.close()
    kl, _, keeps = min(finalists, key=lambda f: f[0])
    kept = next(k for k in keeps if k.kv)
    record = {
        "search_samples": len(tokens),
        "kept_shape": kept.shape(ctx.shapes[0]).as_dict(),
        "removed_layers": [i for i, k in enumerate(keeps) if not k.kv],
        "kl": round(kl, 6),
        "finalists": [
            {
                "shape": next(k for k in f[2] if k.kv).shape(ctx.shapes[0]).as_dict(),
                "removed_layers": sum(not k.kv for k in f[2]),
                "summed_cost": round(f[1], 6),
                "kl": round(f[0], 6),
            }
            for f in finalists
        ],  # fmt: skip
        "runs": probe.runs,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return [k.shape(s) for s, k in zip(ctx.shapes, keeps, strict=True)], {"uniform": record}

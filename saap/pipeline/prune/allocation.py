"""Allocation: how many groups go from each layer and module. One small class each, in a registry.

``plan(ctx, scored)`` returns the kept shape of every layer; slicing then keeps each module's
highest-scoring groups (``saap.pipeline.prune.pruner.shrink_model``). ``check`` validates a budget from
the config alone, so ``saap run`` refuses an unreachable one before any work.

* ``uniform-range``: one ratio in every layer of LLM-Pruner's middle range (layers 4-30 of 32);
* ``uniform-all-layers``: the same ratio in every layer (Wanda-sp);
* ``global-threshold``: FLAP's one threshold over every group of the model, weighted by cost;
* ``whole-layers``: ShortGPT's lowest-scoring whole layers, then attention blocks;
* ``adaptive``: SAAP's first search, cheapest fused importance per parameter first (kept for the ablation);
* ``measured``: depth and width chosen on the measured KL of each change (``saap.pipeline.prune.measured``),
  then, with ``--search-generations``, evolved as whole plans (``saap.pipeline.prune.evolve``); with
  ``--shape uniform``, one kept shape for every layer and whole layers removed (``saap.pipeline.prune.uniform``).
"""

from __future__ import annotations

import torch

from saap.pipeline.prune.context import PruneContext, Scored
from saap.pipeline.prune.evolve import refine
from saap.pipeline.prune.measured import measured_plan
from saap.pipeline.prune.uniform import uniform_plan as uniform_measured_plan
from saap.pipeline.prune.units import remove_cheapest
from saap.runtime.errors import SaapError
from saap.runtime.surgery import LayerShape, head_dim, layer_parameter_count

RATIO_TOLERANCE = 0.01  # achieved fraction of removed parameters must be within this of --ratio


class Allocation:
    name: str
    # Whether the plan can meet a budget other than parameters (a speed requirement).
    any_budget: bool = False
    needs_calibration: bool = False
    needs_importance: tuple[str, ...] | None = None  # the importances whose extra data it reads

    def layers(self, config) -> range:
        """The layers this allocation may change (recorded as ``pruned_layers``)."""
        return range(config.num_hidden_layers)

    def check(self, config, shapes: list[LayerShape], remove_params: int, total: int, align: int) -> None:
        """Raise SaapError when the budget is out of this allocation's reach."""

    def plan(self, ctx: PruneContext, scored: Scored) -> tuple[list[LayerShape], dict]:
        """The kept shapes, and provenance for saap.json (top-level keys)."""
        raise NotImplementedError


def llm_pruner_layer_range(num_layers: int) -> range:
    """LLM-Pruner prunes layers [4, 30) of LLaMA-7B's 32 (first and last layers are sensitive)."""
    return range(round(4 * num_layers / 32), round(30 * num_layers / 32))


def uniform_plan(config, shapes: list[LayerShape], layers: range, ratio: float, align: int, total: int):
    """Kept shapes with one pruning ratio for every layer in ``layers``, meeting ``ratio`` overall.

    Attention groups are coarse (a 3-KV-head layer can only lose thirds) while MLP widths step by
    ``align`` channels, so every (kept KV groups, kept width) pair is tried, the same in each layer
    of the range; among the pairs within RATIO_TOLERANCE of the budget, the one whose attention and
    MLP ratios are closest to each other wins (LLM-Pruner prunes both at one ratio).
    Returns ``(shapes, achieved_ratio)``; raises SaapError when alignment makes ``ratio`` unreachable.
    """
    hd = head_dim(config)
    reference = shapes[layers[0]]
    if any(shapes[i] != reference for i in layers):
        raise SaapError("uniform pruning needs equal layer shapes in the pruned range")
    kept_groups = [
        k for k in range(1, reference.num_key_value_heads + 1) if (k * reference.queries_per_kv_head * hd) % align == 0
    ]
    widths = range(align, reference.intermediate_size + 1, align)
    candidates = []
    for kv in kept_groups:
        for width in widths:
            shape = LayerShape(kv * reference.queries_per_kv_head, kv, width)
            removed = len(layers) * (layer_parameter_count(config, reference) - layer_parameter_count(config, shape))
            attention_ratio = 1 - kv / reference.num_key_value_heads
            mlp_ratio = 1 - width / reference.intermediate_size
            candidates.append((removed / total, abs(attention_ratio - mlp_ratio), shape))
    within = [c for c in candidates if abs(c[0] - ratio) <= RATIO_TOLERANCE]
    if not within:
        closest = min((c[0] for c in candidates), key=lambda r: abs(r - ratio), default=None)
        raise SaapError(
            f"--ratio {ratio} is unreachable with --align {align} in layers {layers.start}-{layers.stop - 1} "
            f"(closest reachable: {'none' if closest is None else f'{closest:.3f}'})"
        )
    achieved, _, shape = min(within, key=lambda c: (c[1], abs(c[0] - ratio)))
    return [shape if i in layers else s for i, s in enumerate(shapes)], achieved


class UniformRange(Allocation):
    name = "uniform-range"

    def layers(self, config):
        return llm_pruner_layer_range(config.num_hidden_layers)

    def check(self, config, shapes, remove_params, total, align):
        uniform_plan(config, shapes, self.layers(config), remove_params / total, align, total)

    def plan(self, ctx, scored):
        layers = self.layers(ctx.config)
        shapes, _ = uniform_plan(ctx.config, ctx.shapes, layers, ctx.remove_params / ctx.total, ctx.align, ctx.total)
        return shapes, {}


class UniformAllLayers(UniformRange):
    name = "uniform-all-layers"

    def layers(self, config):
        return range(config.num_hidden_layers)


def _ascending(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    return [s.argsort() for s in scores]


class GlobalThreshold(Allocation):
    """FLAP: a unit (a module's lowest groups down to the next aligned size) goes when the threshold
    passes its highest member's score; units go in that order until the removed parameters are
    closest to the budget."""

    name = "global-threshold"

    def plan(self, ctx, scored):
        values = {"attention": scored.scores.attention, "mlp": scored.scores.mlp}
        order = {module: _ascending(v) for module, v in values.items()}

        def level(module, i, start, count, params):
            return float(values[module][i][order[module][i][start : start + count]].max())

        return remove_cheapest(ctx.config, ctx.shapes, ctx.align, ctx.remove_params, level, closest=True), {}


class WholeLayers(Allocation):
    """ShortGPT: whole layers in ascending score (never layer 0) within the budget, then the
    attention blocks of the next lowest layers while they still fit."""

    name = "whole-layers"
    needs_importance = ("block-influence",)

    def plan(self, ctx, scored):
        config, influence = ctx.config, scored.layer_scores
        ranked = sorted(range(1, len(ctx.shapes)), key=lambda i: influence[i])
        current, removed, whole = list(ctx.shapes), 0, []

        def cost(old: LayerShape, new: LayerShape) -> int:
            return layer_parameter_count(config, old) - layer_parameter_count(config, new)

        for i in ranked:
            params = cost(current[i], LayerShape(0, 0, 0))
            if removed + params > ctx.remove_params:
                break
            current[i], removed = LayerShape(0, 0, 0), removed + params
            whole.append(i)
        for i in ranked:
            if i in whole or not current[i].num_key_value_heads:
                continue
            new = LayerShape(0, 0, current[i].intermediate_size)
            params = cost(current[i], new)
            if removed + params <= ctx.remove_params:
                current[i], removed = new, removed + params
        return current, {}


class Adaptive(Allocation):
    """SAAP's first search: units cheapest first by fused importance per parameter x (1 + lambda CV).

    Measured on SmolLM2-135M at 20 % (dev text, benchmarks/results/saap-ablation-*): perplexity 238
    against 114 for the uniform range: first-order scores rank groups within a module well but are a
    poor exchange rate between modules and layers. Kept as an ablation; ``measured`` replaces it.
    """

    name = "adaptive"
    needs_importance = ("saap-fused",)

    def plan(self, ctx, scored):
        fused, cv, weight = scored.extra["fused"], scored.extra["cv"], ctx.settings.fluctuation_weight
        order = {module: _ascending(fused.groups[module]) for module in fused.groups}

        def priority(module, i, start, count, params):
            importance = float(fused.groups[module][i][order[module][i][start : start + count]].sum())
            return importance / params * (1 + weight * cv[module][i])

        return remove_cheapest(ctx.config, ctx.shapes, ctx.align, ctx.remove_params, priority, closest=False), {}


class Measured(Allocation):
    name = "measured"
    any_budget = True
    needs_calibration = True  # the KL is measured on calibration sequences

    def plan(self, ctx, scored):
        if ctx.settings.shape == "uniform":  # one kept shape, whole layers removed: no per-layer evolution
            return uniform_measured_plan(ctx, scored)
        shapes, record = measured_plan(ctx, scored)
        if ctx.settings.search_generations:
            shapes, evolution = refine(ctx, scored, shapes)
            record |= evolution
        return shapes, record


ALLOCATIONS: dict[str, Allocation] = {
    cls.name: cls() for cls in (UniformRange, UniformAllLayers, GlobalThreshold, WholeLayers, Adaptive, Measured)
}

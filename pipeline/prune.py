"""Structured pruning: score the coupled groups, plan the kept shapes, slice the weights.

``--method llm-pruner`` is the LLM-Pruner recipe (Ma et al. 2023), the reference baseline:
element-wise first-order Taylor importance summed over each group, the same pruning ratio in
every layer of a middle range (layers 4-30 of LLaMA-7B's 32, scaled to the model's depth), with
that per-layer ratio solved so the whole model (embeddings included) loses ``ratio`` of its
parameters.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline.data import DEFAULT_CALIBRATION, calibration_batches, resolve_data_file
from pipeline.importance import ESTIMATORS, GroupScores, make_estimator, score_groups
from runtime.checkpoint import sha256_file
from runtime.errors import SaapError
from runtime.models import LoadedModel
from runtime.surgery import (
    LayerShape,
    head_dim,
    layer_parameter_count,
    layer_shapes,
    model_parameter_count,
    set_layer_shapes,
    shrink_layer,
)

METHODS = {"llm-pruner": {"importance": "taylor-element"}}
RATIO_TOLERANCE = 0.01  # achieved fraction of removed parameters must be within this of --ratio


@dataclass
class PruneSettings:
    method: str = "llm-pruner"
    ratio: float = 0.2
    align: int = 32
    importance: str | None = None  # None: the method's own estimator
    calibration: str = DEFAULT_CALIBRATION
    num_samples: int = 32
    seq_len: int = 128
    batch_size: int = 1  # gradients accumulate across batches; 1 keeps peak memory lowest
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise SaapError(f"unknown method '{self.method}' (choose from {', '.join(METHODS)})")
        if not 0 < self.ratio <= 0.9:
            raise SaapError(f"--ratio must be in (0, 0.9], got {self.ratio}")
        if self.align < 1:
            raise SaapError(f"--align must be a positive integer, got {self.align}")
        if self.importance is None:
            self.importance = METHODS[self.method]["importance"]
        if self.importance not in ESTIMATORS:
            raise SaapError(f"unknown importance '{self.importance}' (choose from {', '.join(ESTIMATORS)})")
        if self.num_samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise SaapError("--num-samples, --seq-len and --batch-size must be positive")


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
        raise SaapError("the llm-pruner method needs equal layer shapes in the pruned range")
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


def kept_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest-scoring groups, in their original order."""
    return scores.topk(keep).indices.sort().values


def shrink_model(model: nn.Module, scores: GroupScores, plan: list[LayerShape]) -> None:
    """Slice every layer down to ``plan``, keeping its most important groups; update the config."""
    hd = head_dim(model.config)
    current = layer_shapes(model.config)
    new_shapes = []
    for i, (layer, shape, target) in enumerate(zip(model.model.layers, current, plan, strict=True)):
        if target == shape:
            new_shapes.append(shape)
            continue
        keep_kv = kept_indices(scores.attention[i], target.num_key_value_heads)
        keep_channels = kept_indices(scores.mlp[i], target.intermediate_size)
        new_shapes.append(shrink_layer(layer, shape, hd, keep_kv, keep_channels))
    set_layer_shapes(model.config, new_shapes)


def prune(loaded: LoadedModel, settings: PruneSettings, progress: bool = True) -> dict:
    """Prune ``loaded.model`` in place; returns the provenance record for saap.json."""
    model, config = loaded.model, loaded.model.config
    started = time.perf_counter()
    before_shapes = layer_shapes(config)
    total_before = model_parameter_count(model)
    layers = llm_pruner_layer_range(config.num_hidden_layers)
    plan, _ = uniform_plan(config, before_shapes, layers, settings.ratio, settings.align, total_before)

    estimator = make_estimator(settings.importance, settings.seed)
    calibration = None
    batches = None
    if estimator.needs_gradients:
        path = resolve_data_file(settings.calibration)
        batches = calibration_batches(
            loaded.tokenizer, path, settings.num_samples, settings.seq_len, settings.batch_size, settings.seed
        )
        calibration = {"path": str(path), "sha256": sha256_file(path)}
    scores = score_groups(model, estimator, batches, progress)
    shrink_model(model, scores, plan)

    after_shapes = layer_shapes(config)
    total_after = model_parameter_count(model)
    return {
        "kind": "pruned",
        "source": loaded.source,
        "method": settings.method,
        "settings": asdict(settings),
        "calibration": calibration,
        "pruned_layers": [layers.start, layers.stop],
        "ratio_requested": settings.ratio,
        "ratio_achieved": 1 - total_after / total_before,
        "params_before": total_before,
        "params_after": total_after,
        "layers": [
            {
                "index": i,
                "before": b.as_dict(),
                "after": a.as_dict(),
                "params_before": layer_parameter_count(config, b),
                "params_after": layer_parameter_count(config, a),
            }
            for i, (b, a) in enumerate(zip(before_shapes, after_shapes, strict=True))
        ],
        "prune_seconds": round(time.perf_counter() - started, 2),
    }

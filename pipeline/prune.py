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


def _nearest(allowed: list[int], value: float) -> int:
    return min(allowed, key=lambda a: (abs(a - value), -a))


def uniform_plan(config, shapes: list[LayerShape], layers: range, ratio: float, align: int, total: int):
    """Kept shapes with one pruning ratio for every layer in ``layers``, meeting ``ratio`` overall.

    MLP widths step by ``align`` channels; the attention of each layer keeps the KV-group count
    nearest the same ratio (groups are coarse: a 3-KV-head layer can only lose 1/3 at a time).
    Returns ``(shapes, achieved_ratio)``; raises SaapError when alignment makes ``ratio``
    unreachable within RATIO_TOLERANCE.
    """
    hd = head_dim(config)
    best = None
    reference = shapes[layers[0]]
    for kept_width in range(align, reference.intermediate_size + 1, align):
        layer_ratio = 1 - kept_width / reference.intermediate_size
        planned = list(shapes)
        for i in layers:
            shape = shapes[i]
            kept_groups = [
                k for k in range(1, shape.num_key_value_heads + 1) if (k * shape.queries_per_kv_head * hd) % align == 0
            ]
            if not kept_groups:
                raise SaapError(f"--align {align} cannot be met by any number of attention heads in layer {i}")
            kv = _nearest(kept_groups, shape.num_key_value_heads * (1 - layer_ratio))
            width = min(_nearest(list(range(align, shape.intermediate_size + 1, align)), kept_width), kept_width)
            planned[i] = LayerShape(kv * shape.queries_per_kv_head, kv, width)
        removed = sum(
            layer_parameter_count(config, a) - layer_parameter_count(config, b)
            for a, b in zip(shapes, planned, strict=True)
        )
        achieved = removed / total
        if best is None or abs(achieved - ratio) < abs(best[1] - ratio):
            best = (planned, achieved)
    if best is None or abs(best[1] - ratio) > RATIO_TOLERANCE:
        closest = f"{best[1]:.3f}" if best else "none"
        raise SaapError(
            f"--ratio {ratio} is unreachable with --align {align} in layers {layers.start}-{layers.stop - 1} "
            f"(closest reachable: {closest})"
        )
    return best


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

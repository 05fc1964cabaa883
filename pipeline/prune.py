"""Structured pruning: score the coupled groups, plan the kept shapes, slice the weights.

``--method llm-pruner`` is the LLM-Pruner recipe (Ma et al. 2023), the reference baseline:
element-wise first-order Taylor importance summed over each group, the same pruning ratio in
every layer of a middle range (layers 4-30 of LLaMA-7B's 32, scaled to the model's depth), with
that per-layer ratio solved so the whole model (embeddings included) loses ``ratio`` of its
parameters.

``--method magnitude`` / ``random`` are the same uniform recipe with the L2-magnitude / random
estimator (no calibration). ``flap``, ``wanda-sp`` and ``shortgpt`` live in ``pipeline.baselines``
(their choices are documented there); ``saap`` in ``pipeline.saap``. All share the budget below,
the calibration batches and ``runtime.surgery``.

``--device-map auto`` dispatches the model over the available devices with accelerate for the
importance estimation (hooks and gradients follow each module's device), then gathers the pruned
model back on the CPU for saving.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline.data import DEFAULT_CALIBRATION, calibration_batches, resolve_data_file
from pipeline.importance import ESTIMATORS, GroupScores, make_estimator, score_groups
from pipeline.options import option
from pipeline.saap import ABLATIONS, SEARCHES
from runtime.checkpoint import sha256_file
from runtime.errors import SaapError
from runtime.models import LoadedModel
from runtime.surgery import (
    LayerShape,
    decode_parameter_count,
    head_dim,
    layer_parameter_count,
    layer_shapes,
    model_parameter_count,
    set_layer_shapes,
    shrink_layer,
)

# method -> its importance estimator and its layer-shape search
METHODS = {
    "llm-pruner": {"importance": "taylor-element", "plan": "uniform"},
    "magnitude": {"importance": "magnitude", "plan": "uniform"},
    "random": {"importance": "random", "plan": "uniform"},
    "wanda-sp": {"importance": "wanda-sp", "plan": "uniform-all-layers"},
    "flap": {"importance": "flap", "plan": "global-threshold"},
    "shortgpt": {"importance": "block-influence", "plan": "whole-layers"},
    "saap": {"importance": "saap", "plan": "adaptive"},
}
DEVICE_MAPS = ("auto",)
RATIO_TOLERANCE = 0.01  # achieved fraction of removed parameters must be within this of --ratio
DTYPE_BYTES = 4  # checkpoints are float32: 4 bytes per weight read


@dataclass
class PruneSettings:
    """How ``saap prune`` prunes: the method, one budget, and the calibration pass (``saap prune``'s
    flags and the run config's ``prune:`` section are derived from these fields)."""

    method: str = option("saap", "pruning method", choices=sorted(METHODS))
    ratio: float | None = option(None, "fraction of all parameters to remove, in (0, 0.9] (default 0.2)")
    target_params: int | None = option(None, "budget as parameters to keep (instead of --ratio)")
    target_decode_bytes: int | None = option(None, "budget as float32 weight bytes read per generated token")
    align: int = option(32, "kept MLP widths and q-head widths are multiples of this")
    importance: str | None = option(None, "llm-pruner: override its importance estimator", choices=sorted(ESTIMATORS))
    calibration: str = option(DEFAULT_CALIBRATION, "text/jsonl/json calibration file")
    num_samples: int = option(32, "calibration sequences")
    seq_len: int = option(128, "tokens per calibration sequence")
    # Gradients accumulate across batches; 1 keeps peak memory lowest (and SAAP's statistics per sample).
    batch_size: int = option(1, "calibration sequences per backward pass (memory)")
    seed: int = option(0, "random seed (random importance, calibration sample order)")
    ablation: str = option("fused", "saap importance", choices=ABLATIONS)
    # uniform is the default because it measured better than adaptive (pipeline/saap.py).
    search: str = option("uniform", "saap structure search", choices=SEARCHES)
    fluctuation_weight: float = option(1.0, "saap: lambda in priority x (1 + lambda x CV)")
    bias_compensation: bool = option(True, "flap: fold the removed channels' mean output into o_proj/down_proj biases")
    device_map: str | None = option(
        None, "spread the model over all devices for estimation (accelerate)", choices=DEVICE_MAPS
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise SaapError(f"unknown method '{self.method}' (choose from {', '.join(METHODS)})")
        budgets = [b for b in (self.ratio, self.target_params, self.target_decode_bytes) if b is not None]
        if len(budgets) > 1:
            raise SaapError("give one budget: --ratio, --target-params or --target-decode-bytes")
        if not budgets:
            self.ratio = 0.2
        if self.ratio is not None and not 0 < self.ratio <= 0.9:
            raise SaapError(f"--ratio must be in (0, 0.9], got {self.ratio}")
        if any(t is not None and t <= 0 for t in (self.target_params, self.target_decode_bytes)):
            raise SaapError("--target-params and --target-decode-bytes must be positive")
        if self.align < 1:
            raise SaapError(f"--align must be a positive integer, got {self.align}")
        if self.importance is None:
            self.importance = METHODS[self.method]["importance"]
        if self.method == "llm-pruner" and self.importance not in ESTIMATORS:
            raise SaapError(f"unknown importance '{self.importance}' (choose from {', '.join(ESTIMATORS)})")
        if self.method != "llm-pruner" and self.importance != METHODS[self.method]["importance"]:
            hint = " (use --ablation)" if self.method == "saap" else ""
            raise SaapError(f"--importance does not apply to --method {self.method}{hint}")
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise SaapError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, got '{self.device_map}'")
        if self.ablation not in ABLATIONS or self.search not in SEARCHES:
            raise SaapError(f"--ablation is one of {', '.join(ABLATIONS)}; --search one of {', '.join(SEARCHES)}")
        if self.num_samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise SaapError("--num-samples, --seq-len and --batch-size must be positive")

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("saap", "flap", "wanda-sp", "shortgpt") or self.importance in (
            "taylor-vector",
            "taylor-element",
        )


def dispatch(model: nn.Module, device_map: str | dict = "auto", force_hooks: bool = False) -> dict:
    """Spread ``model`` over the available devices with accelerate (whole decoder layers per device).

    Importance estimation needs every weight resident (gradients and hooks on real tensors), so a
    map that would offload to CPU-behind-GPU or disk is refused; on a CPU-only machine everything
    stays on the CPU. Returns the device map used.
    """
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = [type(model.model.layers[0]).__name__]
    if device_map == "auto":
        max_memory = get_balanced_memory(model, no_split_module_classes=no_split)
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    devices = {str(d) for d in device_map.values()}
    if "disk" in devices or ("cpu" in devices and len(devices) > 1):
        raise SaapError(
            f"--device-map auto would offload part of the model to {'disk' if 'disk' in devices else 'CPU'}; "
            "importance estimation needs every weight on an accelerator (add devices or use a smaller model)"
        )
    dispatch_model(model, device_map=device_map, force_hooks=force_hooks)
    return {k: str(v) for k, v in device_map.items()}


def gather(model: nn.Module) -> None:
    """Undo ``dispatch``: drop accelerate's hooks and bring every tensor to the CPU."""
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(model, recurse=True)
    model.to("cpu")


def parameters_to_remove(config, shapes: list[LayerShape], total: int, settings: PruneSettings) -> int:
    """The budget as a number of parameters to remove, whichever way it was given."""
    if settings.ratio is not None:
        return round(settings.ratio * total)
    if settings.target_params is not None:
        remove = total - settings.target_params
        what = f"--target-params {settings.target_params:,}"
    else:
        remove = decode_parameter_count(config, shapes) - settings.target_decode_bytes // DTYPE_BYTES
        what = f"--target-decode-bytes {settings.target_decode_bytes:,}"
    prunable = sum(
        layer_parameter_count(config, s) - layer_parameter_count(config, LayerShape(0, 0, 0)) for s in shapes
    )
    if remove <= 0:
        raise SaapError(f"{what} is already met by the model ({total:,} parameters): nothing to prune")
    if remove > 0.9 * prunable:
        raise SaapError(f"{what} is unreachable: it needs {remove:,} of the {prunable:,} prunable parameters removed")
    return remove


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


def budget_plan(config, shapes: list[LayerShape], total: int, settings: PruneSettings):
    """``(parameters to remove, layer range, uniform plan or None)``; raises SaapError for a budget
    the method cannot meet. Needs only the config, so ``saap run`` checks budgets before any work;
    ``prune`` calls it before the expensive gradients."""
    remove = parameters_to_remove(config, shapes, total, settings)
    kind = METHODS[settings.method]["plan"]
    if kind == "uniform-all-layers":
        layers = range(config.num_hidden_layers)
    else:
        layers = llm_pruner_layer_range(config.num_hidden_layers)
    plan = None
    if kind in ("uniform", "uniform-all-layers") or (settings.method == "saap" and settings.search == "uniform"):
        plan, _ = uniform_plan(config, shapes, layers, remove / total, settings.align, total)
    return remove, layers, plan


def prune(loaded: LoadedModel, settings: PruneSettings, progress: bool = True) -> dict:
    """Prune ``loaded.model`` in place; returns the provenance record for saap.json."""
    model, config = loaded.model, loaded.model.config
    started = time.perf_counter()
    before_shapes = layer_shapes(config)
    total_before = model_parameter_count(model)
    remove, layers, plan = budget_plan(config, before_shapes, total_before, settings)
    uniform = plan is not None

    calibration, batches = None, None
    if settings.needs_calibration:
        path = resolve_data_file(settings.calibration)
        batches = calibration_batches(
            loaded.tokenizer, path, settings.num_samples, settings.seq_len, settings.batch_size, settings.seed
        )
        calibration = {"path": str(path), "sha256": sha256_file(path)}
    record: dict = {}
    if settings.device_map:
        record["device_map"] = dispatch(model, settings.device_map)
    try:
        scores, plan = _scores_and_plan(loaded, settings, batches, before_shapes, remove, plan,
                                        record, progress)  # fmt: skip
        shrink_model(model, scores, plan)
    finally:
        if settings.device_map:
            gather(model)

    after_shapes = layer_shapes(config)
    total_after = model_parameter_count(model)
    return {
        "kind": "pruned",
        "source": loaded.source,
        "method": settings.method,
        "settings": asdict(settings),
        "calibration": calibration,
        "pruned_layers": [layers.start, layers.stop] if uniform else [0, config.num_hidden_layers],
        "ratio_requested": remove / total_before,
        "ratio_achieved": 1 - total_after / total_before,
        "params_before": total_before,
        "params_after": total_after,
        "decode_bytes_before": decode_parameter_count(config, before_shapes) * DTYPE_BYTES,
        "decode_bytes_after": decode_parameter_count(config, after_shapes) * DTYPE_BYTES,
        **record,
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


def _scores_and_plan(loaded, settings, batches, before_shapes, remove, plan, record, progress):
    """Each method's group scores and kept shapes (``plan`` given: the uniform plan made up front)."""
    from pipeline import baselines, saap

    model, config = loaded.model, loaded.model.config
    if settings.method in ("flap", "wanda-sp"):
        stats = baselines.collect_input_stats(model, batches, progress)
        if settings.method == "wanda-sp":
            return baselines.wanda_sp_scores(model, stats), plan
        scores = baselines.flap_scores(model, stats)
        if settings.bias_compensation:
            # The new biases (one hidden-size vector per o_proj / down_proj) count against the budget:
            # plan with them in the config so that the final model meets the budget exactly.
            extra = sum(config.hidden_size * (bool(s.num_key_value_heads) + bool(s.intermediate_size))
                        for s in before_shapes)  # fmt: skip
            config.output_bias = True
            plan = baselines.threshold_plan(config, before_shapes, scores, remove + extra, settings.align)
            dropped = baselines.compensate_bias(model, stats, scores, plan)
        else:
            plan = baselines.threshold_plan(config, before_shapes, scores, remove, settings.align)
            dropped = []
        record["flap"] = {"bias_compensation": settings.bias_compensation, "dropped_compensation": dropped}
        return scores, plan
    if settings.method == "shortgpt":
        influence = baselines.block_influence(model, batches, progress)
        record["shortgpt"] = {"block_influence": influence}
        return baselines._empty_scores(model), baselines.shortgpt_plan(config, before_shapes, influence, remove)
    if settings.method == "saap":
        stats = saap.collect_statistics(model, batches, progress)
        fused = saap.fuse(stats, settings.ablation)
        cv = saap.fluctuation(fused)
        scores = GroupScores(fused.groups["attention"], fused.groups["mlp"])
        if plan is None:
            plan = saap.adaptive_plan(
                config, before_shapes, fused, cv, remove, settings.align, settings.fluctuation_weight
            )
        record["saap"] = {
            "metric_noise": fused.noise,
            "learned_sigma2": fused.sigma2,
            "metric_weights": fused.weights,
            "fluctuation_cv": cv,
        }
        return scores, plan
    return score_groups(model, make_estimator(settings.importance, settings.seed), batches, progress), plan

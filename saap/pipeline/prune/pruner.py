"""``prune``: score the coupled groups, allocate the kept shapes, slice the weights.

A method is a preset (``saap.pipeline.prune.methods``) of an importance (which groups go inside a
module) and an allocation (how many go from each layer); both are looked up in registries and share
the budget, the calibration batches and ``saap.runtime.surgery``.

``--device-map auto`` dispatches the model over the available devices with accelerate for the
importance estimation (hooks and gradients follow each module's device), then gathers the pruned
model back on the CPU for saving.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from torch import nn

from saap.pipeline.data import calibration_batches, resolve_data_file
from saap.pipeline.prune.allocation import ALLOCATIONS
from saap.pipeline.prune.budget import DTYPE_BYTES, parameter_budget, parameters_to_remove, speed_budget
from saap.pipeline.prune.context import Budget, PruneContext
from saap.pipeline.prune.estimators import GroupScores
from saap.pipeline.prune.importance import IMPORTANCES
from saap.pipeline.prune.settings import PruneSettings
from saap.runtime.checkpoint import sha256_file
from saap.runtime.errors import SaapError
from saap.runtime.models import LoadedModel
from saap.runtime.surgery import (
    LayerShape,
    compact,
    decode_parameter_count,
    decoder_layers,
    head_dim,
    kept_indices,
    layer_parameter_count,
    layer_shapes,
    model_parameter_count,
    set_layer_shapes,
    shrink_layer,
)

FORWARD_BATCH = 8  # calibration sequences per no-gradient forward (the compensation's statistics)


def dispatch(model: nn.Module, device_map: str | dict = "auto", force_hooks: bool = False) -> dict:
    """Spread ``model`` over the available devices with accelerate (whole decoder layers per device).

    Importance estimation needs every weight resident (gradients and hooks on real tensors), so a
    map that would offload to CPU-behind-GPU or disk is refused; on a CPU-only machine everything
    stays on the CPU. Returns the device map used.
    """
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = [type(decoder_layers(model)[0]).__name__]
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


def check_budget(config, shapes: list[LayerShape], total: int, settings: PruneSettings) -> Budget:
    """What to remove; raises SaapError for a budget the allocation cannot meet. Needs only the
    config (and a speed budget's profile), so ``saap run`` checks budgets before any work, and
    ``prune`` before the gradients."""
    if settings.speed_budget:
        return speed_budget(config, shapes, settings)
    remove = parameters_to_remove(config, shapes, total, settings)
    ALLOCATIONS[settings.allocation].check(config, shapes, remove, total, settings.align)
    return parameter_budget(config, remove)


def shrink_model(model: nn.Module, scores: GroupScores, plan: list[LayerShape]) -> None:
    """Slice every layer down to ``plan``, keeping its most important groups; update the config."""
    hd = head_dim(model.config)
    current = layer_shapes(model.config)
    new_shapes = []
    for i, (layer, shape, target) in enumerate(zip(decoder_layers(model), current, plan, strict=True)):
        if target == shape:
            new_shapes.append(shape)
            continue
        keep_kv, keep_queries = scores.attention_keep(i, shape, target)
        keep_channels = kept_indices(scores.mlp[i], target.intermediate_size)
        new_shapes.append(shrink_layer(layer, shape, hd, keep_kv, keep_channels, keep_queries))
    set_layer_shapes(model.config, new_shapes)


def calibration(loaded: LoadedModel, settings: PruneSettings):
    """``(batches, compensation batches, provenance)``; ``None`` for what the method does not read."""
    if not settings.needs_calibration:
        return None, None, None
    path = resolve_data_file(settings.calibration)
    batches = calibration_batches(
        loaded.tokenizer, path, settings.num_samples, settings.seq_len, settings.batch_size, settings.seed
    )
    extra = None
    if settings.compensator and settings.compensator.needs_calibration:
        # forward passes only (no gradients), so batched; more windows than the importance's, as a
        # least-squares fit over a few thousand tokens generalises worse than slicing alone
        extra = calibration_batches(
            loaded.tokenizer, path, settings.compensation_samples, settings.seq_len, FORWARD_BATCH, settings.seed + 1
        )
    return batches, extra, {"path": str(path), "sha256": sha256_file(path)}


def prune(loaded: LoadedModel, settings: PruneSettings, progress: bool = True) -> dict:
    """Prune ``loaded.model`` in place; returns the provenance record for saap.json."""
    model, config = loaded.model, loaded.model.config
    started = time.perf_counter()
    shapes, total = layer_shapes(config), model_parameter_count(model)
    budget = check_budget(config, shapes, total, settings)
    importance, allocation = IMPORTANCES[settings.importance], ALLOCATIONS[settings.allocation]
    compensation = settings.compensator
    if compensation and compensation.adds_parameters:  # only parameter budgets pair with one (settings check)
        budget = parameter_budget(config, int(budget.remove) + compensation.extra_params(config, shapes))
    if compensation:
        compensation.prepare(config)
    remove = int(budget.remove) if budget.unit == "parameters" else 0
    batches, compensation_batches, data = calibration(loaded, settings)
    ctx = PruneContext(
        model, shapes, total, remove, budget, settings.align, batches, settings, progress, compensation_batches
    )
    record: dict = {"device_map": dispatch(model, settings.device_map)} if settings.device_map else {}
    try:
        scored = importance.score(ctx)
        plan, planned = allocation.plan(ctx, scored)
        if compensation:
            record |= compensation.apply(ctx, scored, plan)
        shrink_model(model, scored.scores, plan)
    finally:
        if settings.device_map:
            gather(model)
    layers = allocation.layers(config)
    result = {
        "kind": "pruned",
        "source": loaded.source,
        "method": settings.method,
        "settings": asdict(settings),
        "calibration": data,
        "pruned_layers": [layers.start, layers.stop],
        **shape_record(config, shapes, total, model_parameter_count(model), remove),
        "budget": budget_record(budget, shapes, layer_shapes(config)),
        **record,
        **scored.record,
        **planned,
    }
    if settings.shape == "uniform":  # a standard checkpoint of the family: removed layers deleted, renumbered
        result["uniform"]["deleted_layers"] = compact(model)
    return result | {"prune_seconds": round(time.perf_counter() - started, 2)}


def budget_record(budget: Budget, before: list[LayerShape], after: list[LayerShape]) -> dict:
    """The budget as saap.json records it; a speed budget adds its prediction for the pruned shapes
    (the dense prediction less what every layer's change saves, the same savings the plan met)."""
    record = dict(budget.record)
    if budget.unit != "parameters":
        saved = sum(budget.saved(i, b, a) for i, (b, a) in enumerate(zip(before, after, strict=True)))
        pruned_ms = record["dense_ms_predicted"] - saved
        record |= {"pruned_ms_predicted": round(pruned_ms, 4),
                   "speedup_predicted": round(record["dense_ms_predicted"] / pruned_ms, 4)}  # fmt: skip
    return record


def shape_record(config, before: list[LayerShape], total_before: int, total_after: int, remove: int) -> dict:
    """The budget and shapes part of saap.json, shared with the torch-pruning reference."""
    after = layer_shapes(config)
    decoder_before, decoder_after = (
        sum(layer_parameter_count(config, s) for s in shapes) for shapes in (before, after)
    )
    return {
        "ratio_requested": remove / total_before if remove else None,  # None: a speed budget
        "ratio_achieved": 1 - total_after / total_before,  # of all parameters, whatever --ratio-of said
        "decoder_ratio_achieved": 1 - decoder_after / decoder_before,  # of the decoder layers' parameters
        "params_before": total_before,
        "params_after": total_after,
        "decoder_params_before": decoder_before,
        "decoder_params_after": decoder_after,
        "decode_bytes_before": decode_parameter_count(config, before) * DTYPE_BYTES,
        "decode_bytes_after": decode_parameter_count(config, after) * DTYPE_BYTES,
        "layers": [
            {
                "index": i,
                "before": b.as_dict(),
                "after": a.as_dict(),
                "params_before": layer_parameter_count(config, b),
                "params_after": layer_parameter_count(config, a),
            }
            for i, (b, a) in enumerate(zip(before, after, strict=True))
        ],
    }

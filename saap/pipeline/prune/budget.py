"""The budget: parameters to remove, or predicted decode milliseconds for a speed requirement, and
what one layer's change saves in that unit."""

from __future__ import annotations

from dataclasses import asdict

from saap.pipeline.prune.context import Budget
from saap.pipeline.prune.speed_model import find_profile
from saap.runtime.errors import SaapError
from saap.runtime.surgery import LayerShape, decode_parameter_count, layer_parameter_count

DTYPE_BYTES = 4  # checkpoints are float32: 4 bytes per weight read


def parameters_to_remove(config, shapes: list[LayerShape], total: int, settings) -> int:
    """The budget as a number of parameters to remove (``--ratio``, ``--target-params`` or
    ``--target-decode-bytes``); raises SaapError for one that is met already or out of reach."""
    if settings.ratio is not None:
        base = total if settings.ratio_of == "all" else sum(layer_parameter_count(config, s) for s in shapes)
        return round(settings.ratio * base)
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


def parameter_budget(config, remove: int) -> Budget:
    """Parameters (decode bytes are layer parameters x 4 plus a constant, so the same saving)."""

    def saved(i: int, before: LayerShape, after: LayerShape) -> float:
        return layer_parameter_count(config, before) - layer_parameter_count(config, after)

    return Budget(remove, "parameters", saved, {"unit": "parameters", "remove": remove})


def speed_budget(config, shapes: list[LayerShape], settings) -> Budget:
    """Predicted decode ms per token to save on the profile's engine (``--target-speedup`` or
    ``--target-tok-s``); raises SaapError for a requirement met already or out of reach."""
    profile = find_profile(config, settings.engine, settings.profile)
    cost = profile.cost
    dense_ms = cost.predict_ms(config, shapes)
    if settings.target_speedup is not None:
        target_ms, what = dense_ms / settings.target_speedup, f"--target-speedup {settings.target_speedup}"
    else:
        target_ms, what = 1000 / settings.target_tok_s, f"--target-tok-s {settings.target_tok_s}"
    floor_ms = cost.predict_ms(config, [shapes[0]] + [LayerShape(0, 0, 0)] * (len(shapes) - 1))
    if target_ms >= dense_ms:
        predicted = f"{1000 / dense_ms:.1f} tok/s on {profile.engine}"
        raise SaapError(f"{what} is already met: the model is predicted at {predicted}")
    if target_ms <= floor_ms:
        raise SaapError(
            f"{what} is unreachable on {profile.engine}: even one layer left is predicted at {1000 / floor_ms:.1f} "
            f"tok/s (the model: {1000 / dense_ms:.1f})"
        )

    def saved(i: int, before: LayerShape, after: LayerShape) -> float:
        return cost.layer_ms(config, before) - cost.layer_ms(config, after)

    record = {
        "unit": "ms per token",
        "engine": profile.engine,
        "profile": settings.profile or "default (saap profile)",
        "cost_model": asdict(cost),
        "dense_ms_predicted": round(dense_ms, 4),
        "target_ms": round(target_ms, 4),
    }
    return Budget(dense_ms - target_ms, "ms per token", saved, record)

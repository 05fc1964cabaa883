"""The budget: parameters to remove, whichever way it was given, and what one layer's change saves."""

from __future__ import annotations

from pipeline.prune.context import Budget
from runtime.errors import SaapError
from runtime.surgery import LayerShape, decode_parameter_count, layer_parameter_count

DTYPE_BYTES = 4  # checkpoints are float32: 4 bytes per weight read


def parameters_to_remove(config, shapes: list[LayerShape], total: int, settings) -> int:
    """The budget as a number of parameters to remove (``--ratio``, ``--target-params`` or
    ``--target-decode-bytes``); raises SaapError for one that is met already or out of reach."""
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


def parameter_budget(config, remove: int) -> Budget:
    """Parameters (decode bytes are layer parameters x 4 plus a constant, so the same saving)."""

    def saved(i: int, before: LayerShape, after: LayerShape) -> float:
        return layer_parameter_count(config, before) - layer_parameter_count(config, after)

    return Budget(remove, "parameters", saved)

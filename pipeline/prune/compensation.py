"""Compensation: adjusting the kept weights for what was removed (FLAP's bias), in a registry."""

from __future__ import annotations

from pipeline import baselines
from pipeline.prune.context import Scored
from runtime.surgery import LayerShape


class FlapBias:
    """FLAP: the removed channels' mean contribution folded into o_proj / down_proj biases.

    The new biases (one hidden-size vector per present o_proj / down_proj) count against the
    budget, so the allocation plans with them in the config and the final model meets it exactly.
    """

    name = "flap-bias"
    needs_importance = ("flap", "wanda-sp")  # it reads their input statistics

    def extra_params(self, config, shapes: list[LayerShape]) -> int:
        present = sum(bool(s.num_key_value_heads) + bool(s.intermediate_size) for s in shapes)
        return config.hidden_size * present

    def prepare(self, config) -> None:
        config.output_bias = True

    def apply(self, model, scored: Scored, plan: list[LayerShape]) -> dict:
        dropped = baselines.compensate_bias(model, scored.extra, scored.scores, plan)
        return {"flap": {"bias_compensation": True, "dropped_compensation": dropped}}


COMPENSATIONS = {cls.name: cls() for cls in (FlapBias,)}

"""``--method`` presets: each method is a named pair of an importance and an allocation.

Importance decides *which* groups go inside a module (``saap.pipeline.prune.importance``); allocation
decides *how many* go from each layer and module (``saap.pipeline.prune.allocation``). A compensation,
where a method has one, adjusts the kept weights for what was removed; each preset names the
calibration text it scores on (``--calibration`` overrides it). ``--importance`` and
``--allocation`` override either half of a preset, so an ablation is a flag, not a new method.
"""

from __future__ import annotations

from dataclasses import dataclass

from saap.pipeline.data import BOOKS_CALIBRATION, WEB_CALIBRATION

DEFAULT_NUM_SAMPLES = 32  # calibration sequences a method scores on unless --num-samples is given


@dataclass(frozen=True)
class Preset:
    importance: str
    allocation: str
    compensation: str | None = None
    calibration: str = BOOKS_CALIBRATION  # the text it scores on unless --calibration is given
    num_samples: int = DEFAULT_NUM_SAMPLES


METHODS: dict[str, Preset] = {
    # LLM-Pruner (Ma et al. 2023): element-wise first-order Taylor, one ratio in a middle layer range.
    "llm-pruner": Preset("taylor-element", "uniform-range"),
    "magnitude": Preset("magnitude", "uniform-range"),
    "random": Preset("random", "uniform-range"),
    # The FLAP repository's structured Wanda: one ratio in every layer.
    "wanda-sp": Preset("wanda-sp", "uniform-all-layers"),
    # FLAP (An et al. 2024): fluctuation metric, one global threshold, bias compensation.
    "flap": Preset("flap", "global-threshold", compensation="flap-bias"),
    # ShortGPT (Men et al. 2024): whole layers in ascending block influence.
    "shortgpt": Preset("block-influence", "whole-layers"),
    # SAAP: fused uncertainty-weighted Taylor ranking, depth and width allocated on measured KL. On web
    # text its dev perplexity is 68.5 against 89.6 on the books; scored on 64 sequences rather than 32,
    # its dev task average is 0.291 against 0.270 (benchmarks/results/saap-calibration-*.md).
    "saap": Preset("saap-fused", "measured", calibration=WEB_CALIBRATION, num_samples=64),
}

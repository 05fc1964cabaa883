"""What importance and allocation see: the model, its shapes before pruning, the budget, the data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from saap.pipeline.prune.estimators import GroupScores
from saap.runtime.surgery import LayerShape


@dataclass(frozen=True)
class Budget:
    """How much the allocation must remove, in the unit ``saved`` counts.

    ``saved(layer index, shape before, shape after)`` is what one layer's change removes: parameters
    for ``--ratio`` / ``--target-params`` / ``--target-decode-bytes`` (decode bytes are the layers'
    parameters times 4 plus a constant), predicted milliseconds per token for ``--target-speedup``.
    """

    remove: float
    unit: str
    saved: Callable[[int, LayerShape, LayerShape], float]
    record: dict = field(default_factory=dict)  # saap.json's "budget" (a speed budget's profile and targets)


@dataclass
class PruneContext:
    model: nn.Module
    shapes: list[LayerShape]  # before pruning
    total: int  # parameters before pruning
    remove_params: int  # the budget as parameters (what the parameter-budget allocations meet)
    budget: Budget
    align: int
    batches: list[torch.Tensor] | None
    settings: Any  # PruneSettings (method-specific knobs: fluctuation weight, search size...)
    progress: bool = True
    compensation_batches: list[torch.Tensor] | None = None  # a compensation's own calibration windows

    @property
    def config(self):
        return self.model.config


@dataclass
class Scored:
    """An importance's result: group scores (higher = keep) and what the allocation may also use."""

    scores: GroupScores
    record: dict = field(default_factory=dict)  # top-level saap.json keys (provenance)
    layer_scores: list[float] | None = None  # one score per whole layer (block influence)
    extra: Any = None  # importance-specific data a matching allocation or compensation reads

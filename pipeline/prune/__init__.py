"""Structured pruning: importance x allocation presets over the shared surgery (see ``pruner``)."""

from pipeline.prune.allocation import ALLOCATIONS, RATIO_TOLERANCE, llm_pruner_layer_range, uniform_plan
from pipeline.prune.budget import parameters_to_remove
from pipeline.prune.importance import IMPORTANCES
from pipeline.prune.methods import METHODS
from pipeline.prune.pruner import check_budget, dispatch, gather, prune, shape_record, shrink_model
from pipeline.prune.settings import PruneSettings

__all__ = [
    "ALLOCATIONS",
    "IMPORTANCES",
    "METHODS",
    "RATIO_TOLERANCE",
    "PruneSettings",
    "check_budget",
    "dispatch",
    "gather",
    "llm_pruner_layer_range",
    "parameters_to_remove",
    "prune",
    "shape_record",
    "shrink_model",
    "uniform_plan",
]

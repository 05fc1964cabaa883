"""Structured pruning: importance x allocation presets over the shared surgery (see ``pruner``)."""

from saap.pipeline.prune.allocation import ALLOCATIONS, RATIO_TOLERANCE, llm_pruner_layer_range, uniform_plan
from saap.pipeline.prune.budget import parameters_to_remove
from saap.pipeline.prune.importance import IMPORTANCES
from saap.pipeline.prune.methods import METHODS
from saap.pipeline.prune.pruner import check_budget, dispatch, gather, prune, shape_record, shrink_model
from saap.pipeline.prune.settings import PruneSettings

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

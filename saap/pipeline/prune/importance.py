"""Importance: which groups go inside a module. One small class per criterion, in a registry.

Each ``score(ctx)`` runs at most one calibration pass and returns ``Scored``: a score per attention
group and MLP channel (higher = keep; ``saap.runtime.surgery`` defines the groups), plus provenance and
whatever its matching allocation or compensation needs (FLAP's input statistics, SAAP's per-batch
fused scores). The criteria themselves live beside it: ``estimators`` (Taylor / magnitude / random
estimators), ``saap_criterion`` (the fused score) and ``baselines`` (FLAP, Wanda-sp, block influence).
"""

from __future__ import annotations

from saap.pipeline.prune import baselines, saap_criterion
from saap.pipeline.prune.context import PruneContext, Scored
from saap.pipeline.prune.estimators import ESTIMATORS, GroupScores, make_estimator, score_groups


class Importance:
    name: str
    needs_calibration: bool = True
    ranks_groups: bool = True  # False: one score per layer, for an allocation of whole layers

    def score(self, ctx: PruneContext) -> Scored:
        raise NotImplementedError


class Estimator(Importance):
    """A per-element estimator summed over each group (``saap.pipeline.prune.estimators``)."""

    def __init__(self, name: str):
        self.name = name
        self.needs_calibration = ESTIMATORS[name].needs_gradients

    def score(self, ctx):
        estimator = make_estimator(self.name, ctx.settings.seed)
        return Scored(score_groups(ctx.model, estimator, ctx.batches, ctx.progress))


class SaapFused(Importance):
    """SAAP's uncertainty-weighted fusion of the vector- and element-wise Taylor scores."""

    name = "saap-fused"

    def score(self, ctx):
        stats = saap_criterion.collect_statistics(ctx.model, ctx.batches, ctx.progress)
        fused = saap_criterion.fuse(stats, ctx.settings.ablation)
        cv = saap_criterion.fluctuation(fused)
        record = {
            "metric_noise": fused.noise,
            "learned_sigma2": fused.sigma2,
            "metric_weights": fused.weights,
            "fluctuation_cv": cv,
        }
        scores = GroupScores(fused.groups["attention"], fused.groups["mlp"])
        return Scored(scores, {"saap": record}, extra={"fused": fused, "cv": cv})


class Flap(Importance):
    name = "flap"

    def score(self, ctx):
        stats = baselines.collect_input_stats(ctx.model, ctx.batches, ctx.progress)
        return Scored(baselines.flap_scores(ctx.model, stats), extra=stats)


class WandaSp(Importance):
    name = "wanda-sp"

    def score(self, ctx):
        stats = baselines.collect_input_stats(ctx.model, ctx.batches, ctx.progress)
        return Scored(baselines.wanda_sp_scores(ctx.model, stats), extra=stats)


class BlockInfluence(Importance):
    """ShortGPT's per-layer score; groups inside a layer are not ranked (whole layers go)."""

    name = "block-influence"
    ranks_groups = False

    def score(self, ctx):
        influence = baselines.block_influence(ctx.model, ctx.batches, ctx.progress)
        scores = baselines.empty_scores(ctx.model)
        return Scored(scores, {"shortgpt": {"block_influence": influence}}, layer_scores=influence)


IMPORTANCES: dict[str, Importance] = {
    **{name: Estimator(name) for name in ESTIMATORS},
    **{cls.name: cls() for cls in (SaapFused, Flap, WandaSp, BlockInfluence)},
}

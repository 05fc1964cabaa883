"""Importance of every coupled group (attention KV-group, MLP channel), behind one interface.

An estimator maps each prunable weight (and, if it needs one, the loss gradient accumulated over
the calibration batches) to a per-element quantity; ``saap.runtime.surgery.group_sums`` adds it up over
each coupled group, and the estimator's ``finish`` turns the sums into scores (higher = keep).

* ``random``          uniform noise, the sanity floor
* ``magnitude``       L2 norm of the group's weights
* ``taylor-vector``   |sum_k w_k g_k|: first-order loss change when the whole group is removed
* ``taylor-element``  sum_k |w_k g_k|: LLM-Pruner's element-wise first-order Taylor, summed
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from saap.runtime.errors import SaapError
from saap.runtime.surgery import (
    LayerShape,
    decoder_layers,
    group_sums,
    head_dim,
    kept_indices,
    kept_queries,
    layer_shapes,
    prunable_linears,
)


@dataclass
class GroupScores:
    attention: list[torch.Tensor]  # per layer, one score per KV group
    mlp: list[torch.Tensor]  # per layer, one score per intermediate channel
    # per layer, one score per query head: set by the measured search when it narrows query heads
    queries: list[torch.Tensor] | None = None

    def attention_keep(self, i: int, shape: LayerShape, target: LayerShape) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer i's KV groups that slicing to ``target`` keeps, and (when ``target`` has fewer query
        heads per group) each kept group's query heads; every stage that slices or masks asks here."""
        groups = kept_indices(self.attention[i], target.num_key_value_heads)
        per_group = target.queries_per_kv_head
        if not target.num_key_value_heads or per_group >= shape.queries_per_kv_head:
            return groups, None
        if self.queries is None:
            raise SaapError(f"layer {i}: narrowing query heads needs query-head scores (--narrow-queries)")
        return groups, kept_queries(self.queries[i], shape, groups, per_group)


class ImportanceEstimator:
    name: str
    needs_gradients: bool = False

    def per_element(self, weight: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, group_total: torch.Tensor) -> torch.Tensor:
        return group_total


class Magnitude(ImportanceEstimator):
    name = "magnitude"

    def per_element(self, weight, grad):
        return weight.square()

    def finish(self, group_total):
        return group_total.sqrt()


class TaylorVector(ImportanceEstimator):
    name = "taylor-vector"
    needs_gradients = True

    def per_element(self, weight, grad):
        return weight * grad  # signed: the group's terms may cancel, which is the point

    def finish(self, group_total):
        return group_total.abs()


class TaylorElement(ImportanceEstimator):
    name = "taylor-element"
    needs_gradients = True

    def per_element(self, weight, grad):
        return (weight * grad).abs()


class Random(ImportanceEstimator):
    name = "random"

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def per_element(self, weight, grad):
        return torch.zeros_like(weight)

    def finish(self, group_total):
        return torch.rand(group_total.shape, generator=self.generator)


ESTIMATORS: dict[str, type[ImportanceEstimator]] = {
    cls.name: cls for cls in (Random, Magnitude, TaylorVector, TaylorElement)
}


def make_estimator(name: str, seed: int = 0) -> ImportanceEstimator:
    return Random(seed) if name == "random" else ESTIMATORS[name]()


def accumulate_gradients(model: nn.Module, batches: list[torch.Tensor], progress: bool = True) -> None:
    """Sum the language-model loss gradient of every calibration batch into the prunable weights.

    Only the prunable linears require grad (embeddings, norms and lm_head stay frozen), and .grad
    itself is the accumulator, so memory stays near one forward+backward of one batch. Each batch's
    mean loss is weighted by its share of the samples, so the result is the gradient of the mean
    loss over all samples whatever the batch size (equal-length windows: every token counts once).
    """
    model.requires_grad_(False)
    for layer in decoder_layers(model):
        for linear in prunable_linears(layer).values():
            linear.weight.requires_grad_(True)
            linear.weight.grad = None
    device = model.get_input_embeddings().weight.device  # the first device under a device map
    samples = sum(len(b) for b in batches)
    for batch in tqdm(batches, desc="calibration gradients", unit="batch", disable=not progress):
        batch = batch.to(device)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        (loss * (len(batch) / samples)).backward()


def score_groups(
    model: nn.Module,
    estimator: ImportanceEstimator,
    batches: list[torch.Tensor] | None = None,
    progress: bool = True,
) -> GroupScores:
    """Score every coupled group of every decoder layer with ``estimator``."""
    if estimator.needs_gradients:
        if not batches:
            raise ValueError(f"importance '{estimator.name}' needs calibration batches")
        accumulate_gradients(model, batches, progress)
    hd = head_dim(model.config)
    attention, mlp = [], []
    with torch.no_grad():
        for layer, shape in zip(decoder_layers(model), layer_shapes(model.config), strict=True):
            a, m = _layer_scores(layer, shape, hd, estimator)
            attention.append(a)
            mlp.append(m)
    if estimator.needs_gradients:
        for p in model.parameters():
            p.grad = None
        model.requires_grad_(False)
    return GroupScores(attention, mlp)


def _layer_scores(layer: nn.Module, shape: LayerShape, hd: int, estimator: ImportanceEstimator):
    per_element = {
        name: estimator.per_element(linear.weight.float(), _grad(linear.weight, estimator))
        for name, linear in prunable_linears(layer).items()
    }
    attention_total, mlp_total = group_sums(shape, hd, per_element)
    return estimator.finish(attention_total.cpu()), estimator.finish(mlp_total.cpu())


def _grad(weight: torch.Tensor, estimator: ImportanceEstimator) -> torch.Tensor | None:
    if not estimator.needs_gradients:
        return None
    if weight.grad is None:
        raise RuntimeError("no gradient reached a prunable weight; was the model run with grad enabled?")
    return weight.grad.float()

"""SAAP: structurally-aware adaptive pruning (arXiv 2412.15127), rebuilt from its abstract.

Only the abstract is public; each step below is our reading of it, switchable so that its
contribution can be measured (``--ablation``, ``--allocation``, ``--fluctuation-weight``).

1. Importance at two granularities per coupled group, from per-sample calibration gradients g_b
   (batch size 1, so one backward = one sample), collected with tensor hooks (no weight copies
   beyond ``.grad`` and one Fisher buffer):
     vector-wise  I_V = |sum_k w_k g_k|                        (first-order loss change of the group)
     element-wise I_E = sum_k |w_k g_k - 1/2 w_k^2 F_kk|        (F: diagonal Fisher = mean of g_b^2)
   with g the mean gradient. Per-batch values (g_b in place of g, g_b^2 in place of F) are kept
   for the spread that steps 2 and 3 need.
2. Fusion with homoscedastic uncertainty (Kendall, Gal & Cipolla 2018): each metric is normalised
   by its mean over all groups, then I = I_V/(2 s_V^2) + I_E/(2 s_E^2) + log s_V + log s_E with
   log s^2 learned by gradient descent per module type (attention, MLP). The "task loss" of a metric
   is its across-batch noise L = mean_(b,group) (x_b - mean_b x)^2; minimising
   L/(2 s^2) + 1/2 log s^2 has its optimum at s^2 = L, so the learned weight 1/(2 s^2) = 1/(2L):
   a metric whose per-batch estimates scatter more is trusted less.
3. Structure: how many groups go from each layer and module is the allocation's job
   (``saap.pipeline.prune.allocation``). The paper's step "rank the importance of all modules to
   determine the specific layers that should be pruned" is ``--allocation measured``: costs measured
   as KL to the dense model, because summed first-order scores (our first reading, ``--allocation
   adaptive``: priority = fused importance per parameter x (1 + lambda CV), CV the coefficient of
   variation of a module's per-batch fused score) proved a poor exchange rate between layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from saap.runtime.surgery import (
    decoder_layers,
    groups_from_reduced,
    head_dim,
    layer_shapes,
    prunable_linears,
    reduce_to_group_axis,
)

MODULES = ("attention", "mlp")
METRICS = ("vector", "element")
ABLATIONS = ("fused", "sum", "vector", "element")


@dataclass
class GroupStatistics:
    """metric -> module -> per layer: totals ``[groups]`` and per-batch values ``[batches, groups]``."""

    total: dict[str, dict[str, list[torch.Tensor]]]
    per_batch: dict[str, dict[str, list[torch.Tensor]]]


def collect_statistics(model: nn.Module, batches: list[torch.Tensor], progress: bool = True) -> GroupStatistics:
    """Run the calibration batches once; return both Taylor metrics, in total and per batch."""
    config = model.config
    hd, shapes = head_dim(config), layer_shapes(config)
    model.requires_grad_(False)
    fisher: dict[tuple[int, str], torch.Tensor] = {}
    batch_reduced: dict[str, dict[tuple[int, str], torch.Tensor]] = {m: {} for m in METRICS}
    per_batch: dict[str, dict[str, list[list[torch.Tensor]]]] = {
        metric: {module: [[] for _ in shapes] for module in MODULES} for metric in METRICS
    }
    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        for name, linear in prunable_linears(layer).items():
            weight = linear.weight
            weight.requires_grad_(True)
            weight.grad = None
            fisher[i, name] = torch.zeros_like(weight)

            def hook(grad, i=i, name=name, weight=weight):
                w, g = weight.detach(), grad.detach()
                fisher[i, name].add_(g.square())
                batch_reduced["vector"][i, name] = reduce_to_group_axis(name, w * g)
                batch_reduced["element"][i, name] = reduce_to_group_axis(
                    name, (w * g - 0.5 * w.square() * g.square()).abs()
                )
                return grad

            handles.append(weight.register_hook(hook))
    device = next(model.parameters()).device
    try:
        for batch in tqdm(batches, desc="saap importance", unit="batch", disable=not progress):
            batch = batch.to(device)
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
            for i, (layer, shape) in enumerate(zip(decoder_layers(model), shapes, strict=True)):
                names = prunable_linears(layer)
                for metric in METRICS:
                    reduced = {n: batch_reduced[metric][i, n] for n in names}
                    attention, mlp = groups_from_reduced(shape, hd, reduced)
                    if metric == "vector":  # |sum| is taken over the whole group, after summing
                        attention, mlp = attention.abs(), mlp.abs()
                    per_batch[metric]["attention"][i].append(attention.cpu())
                    per_batch[metric]["mlp"][i].append(mlp.cpu())
    finally:
        for handle in handles:
            handle.remove()

    total: dict[str, dict[str, list[torch.Tensor]]] = {m: {module: [] for module in MODULES} for m in METRICS}
    n = len(batches)
    with torch.no_grad():
        for i, (layer, shape) in enumerate(zip(decoder_layers(model), shapes, strict=True)):
            vector, element = {}, {}
            for name, linear in prunable_linears(layer).items():
                w, g, f = linear.weight.detach(), linear.weight.grad / n, fisher[i, name] / n
                vector[name] = reduce_to_group_axis(name, w * g)
                element[name] = reduce_to_group_axis(name, (w * g - 0.5 * w.square() * f).abs())
                linear.weight.grad = None
            for metric, reduced in (("vector", vector), ("element", element)):
                attention, mlp = groups_from_reduced(shape, hd, reduced)
                if metric == "vector":
                    attention, mlp = attention.abs(), mlp.abs()
                total[metric]["attention"].append(attention.cpu())
                total[metric]["mlp"].append(mlp.cpu())
    model.requires_grad_(False)
    stacked = {
        metric: {
            module: [torch.stack(v) if v and v[0].numel() else torch.zeros(n, 0) for v in per_batch[metric][module]]
            for module in MODULES
        }
        for metric in METRICS
    }
    return GroupStatistics(total=total, per_batch=stacked)


def learn_uncertainty(noise: dict[str, float], steps: int = 3000, lr: float = 0.1) -> dict[str, float]:
    """Learn s^2 per metric by gradient descent on sum_k L_k/(2 s_k^2) + 1/2 log s_k^2.

    The optimum is s_k^2 = L_k (d/ds: -L/(2 s^4) + 1/(2 s^2) = 0); gradient descent gets there
    within a fraction of a percent, which the tests check. Learned rather than set in closed form
    so that the same code can take further loss terms (as in Kendall et al.) without changes.
    """
    names = list(noise)
    log_var = torch.zeros(len(names), requires_grad=True)
    losses = torch.tensor([max(noise[k], 1e-12) for k in names])
    optimizer = torch.optim.Adam([log_var], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        objective = (losses * torch.exp(-log_var) / 2 + log_var / 2).sum()
        objective.backward()
        optimizer.step()
    return {k: float(torch.exp(v)) for k, v in zip(names, log_var.detach(), strict=True)}


@dataclass
class FusedScores:
    """Fused importance per layer and module, plus what produced it (recorded in saap.json)."""

    groups: dict[str, list[torch.Tensor]]  # module -> per layer, fused score per group (ranking form)
    per_batch_module: dict[str, list[torch.Tensor]]  # module -> per layer, [batches] summed fused score
    weights: dict[str, dict[str, float]] = field(default_factory=dict)  # module -> metric -> 1/(2 s^2)
    sigma2: dict[str, dict[str, float]] = field(default_factory=dict)
    noise: dict[str, dict[str, float]] = field(default_factory=dict)


def fuse(stats: GroupStatistics, ablation: str = "fused") -> FusedScores:
    """Combine the two metrics per module type (step 2)."""
    # One normalising constant per metric across both module types keeps attention and MLP
    # scores in the same (loss-change) units, so the global search can compare them.
    scale = {
        metric: torch.cat([t for module in MODULES for t in stats.total[metric][module]]).mean().clamp_min(1e-30)
        for metric in METRICS
    }
    batch_scale = {
        metric: torch.cat([t.flatten() for module in MODULES for t in stats.per_batch[metric][module]])
        .mean()
        .clamp_min(1e-30)
        for metric in METRICS
    }
    result = FusedScores(groups={}, per_batch_module={})
    for module in MODULES:
        per_batch = {m: [t / batch_scale[m] for t in stats.per_batch[m][module]] for m in METRICS}
        totals = {m: [t / scale[m] for t in stats.total[m][module]] for m in METRICS}
        noise = {}
        for metric in METRICS:
            spread = [(t - t.mean(0, keepdim=True)).square().flatten() for t in per_batch[metric] if t.numel()]
            noise[metric] = float(torch.cat(spread).mean()) if spread else 1.0
        if ablation == "fused":
            sigma2 = learn_uncertainty(noise)
            weights = {m: 1 / (2 * sigma2[m]) for m in METRICS}
        else:
            sigma2 = {}
            weights = {"vector": float(ablation in ("vector", "sum")), "element": float(ablation in ("element", "sum"))}
        result.noise[module], result.sigma2[module], result.weights[module] = noise, sigma2, weights
        # Ranking form: the weighted average of the two normalised metrics. The fused score of the
        # paper adds log s_V + log s_E, a constant within a module type, and scales by the weight
        # sum; dividing that out lets the learned s set the mix, not the scale between module types.
        total_weight = sum(weights.values())
        result.groups[module] = [
            sum(weights[m] * totals[m][i] for m in METRICS) / total_weight for i in range(len(totals["vector"]))
        ]
        result.per_batch_module[module] = [
            sum(weights[m] * per_batch[m][i] for m in METRICS).sum(1) / total_weight
            for i in range(len(per_batch["vector"]))
        ]
    return result


def paper_fused_score(i_v: torch.Tensor, i_e: torch.Tensor, sigma2_v: float, sigma2_e: float) -> torch.Tensor:
    """I = I_V/(2 s_V^2) + I_E/(2 s_E^2) + log s_V + log s_E, as the fusion is usually written."""
    log_sigma = 0.5 * (torch.log(torch.tensor(sigma2_v)) + torch.log(torch.tensor(sigma2_e)))
    return i_v / (2 * sigma2_v) + i_e / (2 * sigma2_e) + log_sigma


def fluctuation(fused: FusedScores) -> dict[str, list[float]]:
    """Coefficient of variation across batches of each module's summed fused score."""
    result = {}
    for module in MODULES:
        values = []
        for series in fused.per_batch_module[module]:
            mean = series.mean().abs()
            values.append(float(series.std() / mean) if series.numel() > 1 and mean > 0 else 0.0)
        result[module] = values
    return result

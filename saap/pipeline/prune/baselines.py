"""The baseline pruners of the comparison: FLAP, Wanda-sp and ShortGPT, on the shared surgery.

Every method sees the same calibration batches and the same budget (parameters to remove, as
``saap.pipeline.prune.parameters_to_remove`` computes it). This module holds their scores; their
allocations (global threshold, whole layers, one ratio everywhere) are in ``saap.pipeline.prune.allocation``
and ``saap.pipeline.prune.pruner.shrink_model`` (``saap.runtime.surgery``) does the slicing.

* ``flap`` (An et al., AAAI 2024, "Fluctuation-based Adaptive Structured Pruning"): the
  fluctuation metric of an input channel c of o_proj / down_proj is the sample variance of that
  channel over all calibration tokens times the squared norm of weight column c (WIFV). Scores are
  standardised per layer and module type ((s - mean) / std over the layer's channels, FLAP's
  "AL-AM" structure); an attention group (a KV head with its query heads) scores the mean of its
  o_proj channels' standardised scores. One global threshold then rises across every head and
  channel of the model, weighted by parameter cost, until the budget is met; with ``--align``
  units are aligned chunks of a module's lowest groups and a chunk goes when the threshold passes
  its highest member. Bias compensation: the removed channels' mean input times their weight
  columns is added to the o_proj / down_proj bias (``config.output_bias``), so the layer's mean
  output is unchanged. A block pruned away entirely (all groups under the threshold) becomes
  ``RemovedAttention`` / ``RemovedMLP`` and its compensation constant is dropped (recorded in
  saap.json as ``flap.dropped_compensation``). Layer 0 keeps at least one attention group.
* ``wanda-sp`` (the structured Wanda of the FLAP paper and repository): score of input channel c
  of o_proj / down_proj = mean over output rows of |W[:, c]| * ||X_c||_2 (X_c: that channel over
  all calibration tokens); a head group sums its channels. One pruning ratio in every layer (all
  layers, as the FLAP repository's ``prune_wanda_sp``), solved to meet the budget.
* ``shortgpt`` (Men et al. 2024): Block Influence of layer i, BI_i = 1 - mean over tokens of
  cos(h_in, h_out), on the calibration batches; whole layers with the lowest BI are removed
  (attention and MLP both become residual identities). Layer 0 is never removed (HF's KV cache
  reads its sequence length from layer 0's attention; it is also the highest-BI layer in practice).
  Whole layers are coarse (one SmolLM2 layer is 2.6 % of the model), so the last step is finer:
  after the largest number of whole layers within the budget, the attention blocks of the next
  lowest-BI layers go while they still fit, which keeps the achieved ratio within one attention
  block (0.7 % of SmolLM2) below the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from saap.pipeline.prune.estimators import GroupScores
from saap.runtime.surgery import (
    LayerShape,
    add_output_bias,
    attention_group_index,
    block_output,
    decoder_layers,
    has_attention,
    has_mlp,
    head_dim,
    kept_indices,
    layer_shapes,
)

BASELINES = ("flap", "wanda-sp", "shortgpt")
MODULES = ("attention", "mlp")


@dataclass
class ChannelStats:
    """Running per-channel sums of one linear's input over every calibration token (float64)."""

    count: int
    total: torch.Tensor  # [channels] sum of x
    square: torch.Tensor  # [channels] sum of x^2

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def variance(self) -> torch.Tensor:  # unbiased sample variance, as torch.var
        return (self.square - self.count * self.mean.square()) / max(self.count - 1, 1)

    @property
    def norm(self) -> torch.Tensor:  # ||X_c||_2 over all tokens
        return self.square.sqrt()


def _device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def collect_input_stats(
    model: nn.Module, batches: list[torch.Tensor], progress: bool = True
) -> dict[str, list[ChannelStats | None]]:
    """Per layer, the channel statistics of o_proj's and down_proj's inputs (``None``: block removed).

    Forward pre-hooks accumulate on each module's own device, so a model dispatched over several
    devices (``--device-map auto``) works unchanged.
    """
    stats: dict[str, list[ChannelStats | None]] = {m: [None] * len(decoder_layers(model)) for m in MODULES}
    handles = []

    def hook_for(module: str, i: int):
        def hook(linear, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            current = stats[module][i]
            if current is None:
                stats[module][i] = ChannelStats(x.shape[0], x.sum(0), x.square().sum(0))
            else:
                current.count += x.shape[0]
                current.total += x.sum(0).to(current.total.device)
                current.square += x.square().sum(0).to(current.square.device)

        return hook

    for i, layer in enumerate(decoder_layers(model)):
        if has_attention(layer):
            handles.append(block_output(layer, "attention").register_forward_pre_hook(hook_for("attention", i)))
        if has_mlp(layer):
            handles.append(block_output(layer, "mlp").register_forward_pre_hook(hook_for("mlp", i)))
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="activation statistics", unit="batch", disable=not progress):
                model(input_ids=batch.to(_device(model)), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for module in MODULES:
        for s in stats[module]:
            if s is not None:
                s.total, s.square = s.total.cpu(), s.square.cpu()
    return stats


def _group_channels(model: nn.Module, i: int) -> torch.Tensor:
    """o_proj input-column indices of each attention group of layer i: ``[n_kv, G * hd]``."""
    shape = layer_shapes(model.config)[i]
    q_rows, _ = attention_group_index(shape, head_dim(model.config))
    return q_rows


def empty_scores(model: nn.Module) -> GroupScores:
    shapes = layer_shapes(model.config)
    return GroupScores(
        [torch.zeros(s.num_key_value_heads) for s in shapes], [torch.zeros(s.intermediate_size) for s in shapes]
    )


def _standardise(x: torch.Tensor) -> torch.Tensor:
    std = x.std()
    return (x - x.mean()) / std if x.numel() > 1 and std > 0 else torch.zeros_like(x)


def flap_scores(model: nn.Module, stats: dict[str, list[ChannelStats | None]]) -> GroupScores:
    """Standardised WIFV per attention group and MLP channel (higher = keep)."""
    scores = empty_scores(model)
    for i, layer in enumerate(decoder_layers(model)):
        if stats["attention"][i] is not None:
            w = block_output(layer, "attention").weight.detach().double().cpu()
            z = _standardise(stats["attention"][i].variance * w.square().sum(0))
            scores.attention[i] = z[_group_channels(model, i)].mean(1).float()
        if stats["mlp"][i] is not None:
            w = block_output(layer, "mlp").weight.detach().double().cpu()
            scores.mlp[i] = _standardise(stats["mlp"][i].variance * w.square().sum(0)).float()
    return scores


def wanda_sp_scores(model: nn.Module, stats: dict[str, list[ChannelStats | None]]) -> GroupScores:
    """|W| * ||X||_2 of o_proj / down_proj input channels, mean over output rows, summed per group."""
    scores = empty_scores(model)
    for i, layer in enumerate(decoder_layers(model)):
        if stats["attention"][i] is not None:
            w = block_output(layer, "attention").weight.detach().double().cpu()
            channel = (w.abs() * stats["attention"][i].norm).mean(0)
            scores.attention[i] = channel[_group_channels(model, i)].sum(1).float()
        if stats["mlp"][i] is not None:
            w = block_output(layer, "mlp").weight.detach().double().cpu()
            scores.mlp[i] = (w.abs() * stats["mlp"][i].norm).mean(0).float()
    return scores


def compensate_bias(
    model: nn.Module, stats: dict[str, list[ChannelStats | None]], scores: GroupScores, plan: list[LayerShape]
) -> list[dict]:
    """Add W[:, removed] @ mean(X[removed]) to o_proj / down_proj's bias before slicing.

    Must run on the unsliced model with the scores and plan ``shrink_model`` will use (it keeps the
    top-scoring groups). Returns the blocks removed whole, whose compensation is lost.
    """
    model.config.output_bias = True
    dropped = []
    with torch.no_grad():
        for i, (layer, target) in enumerate(zip(decoder_layers(model), plan, strict=True)):
            add_output_bias(layer)
            for module, linear, keep_count in (
                ("attention", getattr(layer.self_attn, "o_proj", None), target.num_key_value_heads),
                ("mlp", getattr(layer.mlp, "down_proj", None), target.intermediate_size),
            ):
                if linear is None or stats[module][i] is None:
                    continue
                group_scores = scores.attention[i] if module == "attention" else scores.mlp[i]
                keep = torch.zeros(len(group_scores), dtype=torch.bool)
                keep[kept_indices(group_scores, keep_count)] = True
                if module == "attention":
                    removed = _group_channels(model, i)[~keep].flatten()
                else:
                    removed = (~keep).nonzero().flatten()
                if not len(removed):
                    continue
                w = linear.weight.detach().double().cpu()
                shift = w[:, removed] @ stats[module][i].mean[removed]
                if keep_count == 0:
                    dropped.append({"layer": i, "module": module, "norm": float(shift.norm())})
                    continue
                linear.bias += shift.to(linear.bias.dtype).to(linear.bias.device)
    return dropped


def block_influence(model: nn.Module, batches: list[torch.Tensor], progress: bool = True) -> list[float]:
    """ShortGPT's BI_i = 1 - mean over calibration tokens of cos(layer input, layer output)."""
    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    tokens = [0] * len(layers)
    handles = []

    def hook_for(i: int):
        def hook(layer, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(h_in.float(), h_out.float().to(h_in.device), dim=-1)
            sums[i] += float(cos.sum())
            tokens[i] += cos.numel()

        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(hook_for(i), with_kwargs=True))
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="block influence", unit="batch", disable=not progress):
                model(input_ids=batch.to(_device(model)), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [1 - s / n for s, n in zip(sums, tokens, strict=True)]

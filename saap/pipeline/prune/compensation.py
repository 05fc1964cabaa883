"""Compensation: adjusting the kept weights for what was removed, in a registry.

* ``flap-bias``: FLAP's removed channels' mean output folded into o_proj / down_proj biases;
* ``least-squares``: the kept input columns of o_proj / down_proj re-fitted to the unpruned block's
  output on the calibration text.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from saap.pipeline.prune import baselines
from saap.pipeline.prune.context import PruneContext, Scored
from saap.runtime.surgery import (
    LayerShape,
    attention_columns,
    block_output,
    decoder_layers,
    has_attention,
    has_mlp,
    head_dim,
    kept_indices,
)

# Ridge added to each Gram matrix, as a fraction of its mean diagonal (SparseGPT's percdamp, there
# 0.01): it keeps H[S, S] invertible and pulls the fit towards the sliced weights. Held-out C4 tokens
# of SmolLM2 (o_proj / down_proj of layers 3 and 20 at half width, fit on 16k tokens): 0.1 was best
# of 0.01 / 0.1 / 1; a 4k-token fit at 0.01 was worse than slicing alone on one of the four.
DAMPING = 0.1


class FlapBias:
    """FLAP: the removed channels' mean contribution folded into o_proj / down_proj biases.

    The new biases (one hidden-size vector per present o_proj / down_proj) count against the
    budget, so the allocation plans with them in the config and the final model meets it exactly.
    """

    name = "flap-bias"
    needs_importance = ("flap", "wanda-sp")  # it reads their input statistics
    adds_parameters = True
    needs_calibration = False  # its importances read the text already

    def extra_params(self, config, shapes: list[LayerShape]) -> int:
        present = sum(bool(s.num_key_value_heads) + bool(s.intermediate_size) for s in shapes)
        return config.hidden_size * present

    def prepare(self, config) -> None:
        config.output_bias = True

    def apply(self, ctx: PruneContext, scored: Scored, plan: list[LayerShape]) -> dict:
        dropped = baselines.compensate_bias(ctx.model, scored.extra, scored.scores, plan)
        return {"flap": {"bias_compensation": True, "dropped_compensation": dropped}}


class LeastSquares:
    """Each narrowed o_proj / down_proj re-fitted so its output on the calibration text stays the dense one.

    With X the projection's input over the calibration tokens (the unpruned model's) and S the input
    columns slicing keeps, ``W[:, S] <- argmin ||X W^T - X[:, S] W_S^T||^2 = W H[:, S] H[S, S]^-1``
    with ``H = X^T X``: the removed channels' contribution is carried, as far as it correlates with
    the kept ones, by the kept columns (structured OBS, as in ZipLM / SlimGPT). The other inputs of a
    block (q/k/v, gate/up rows) lose whole groups and stay as they are. No parameters are added, so
    every budget pairs with it.
    """

    name = "least-squares"
    needs_importance = None  # any: it reads the calibration text, not an importance's statistics
    adds_parameters = False
    needs_calibration = True

    def prepare(self, config) -> None:
        pass

    def apply(self, ctx: PruneContext, scored: Scored, plan: list[LayerShape]) -> dict:
        kept = kept_columns(ctx, scored, plan)
        grams = input_grams(ctx.model, ctx.compensation_batches, kept)
        before = after = 0.0
        for (i, module), columns in tqdm(kept.items(), desc="least squares", disable=not ctx.progress):
            linear = block_output(decoder_layers(ctx.model)[i], module)
            errors = refit(linear, columns, grams.pop((i, module)))
            before, after = before + errors[0], after + errors[1]
        n = max(len(kept), 1)
        return {
            "least_squares": {
                "damping": DAMPING,
                "tokens": sum(b.numel() for b in ctx.compensation_batches),
                "projections": len(kept),
                # mean over the refitted projections of ||X (W' - W)^T||^2 / ||X W^T||^2 on the calibration text
                "relative_error_sliced": round(before / n, 6),
                "relative_error_refit": round(after / n, 6),
            }
        }


def kept_columns(ctx: PruneContext, scored: Scored, plan: list[LayerShape]) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, module) -> the o_proj / down_proj input columns slicing keeps, for every module that
    loses some groups but not all (``pruner.shrink_model`` keeps the same ones)."""
    hd, kept = head_dim(ctx.config), {}
    for i, (layer, shape, target) in enumerate(zip(decoder_layers(ctx.model), ctx.shapes, plan, strict=True)):
        if has_attention(layer) and 0 < target.num_attention_heads < shape.num_attention_heads:
            groups, queries = scored.scores.attention_keep(i, shape, target)
            kept[(i, "attention")] = attention_columns(shape, hd, groups, queries)
        if has_mlp(layer) and 0 < target.intermediate_size < shape.intermediate_size:
            kept[(i, "mlp")] = kept_indices(scored.scores.mlp[i], target.intermediate_size)
    return kept


def input_grams(model, batches: list[torch.Tensor], wanted) -> dict[tuple[int, str], torch.Tensor]:
    """``X^T X`` (float32) of each wanted projection's input over the calibration batches."""
    grams: dict[tuple[int, str], torch.Tensor] = {}

    def hook(key):
        def accumulate(linear, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            gram = (x.T @ x).cpu()
            grams[key] = grams[key] + gram if key in grams else gram

        return accumulate

    layers = decoder_layers(model)
    handles = [block_output(layers[i], m).register_forward_pre_hook(hook((i, m))) for i, m in wanted]
    try:
        with torch.no_grad():
            for batch in batches:  # the decoder only: the logits are not needed
                model.model(input_ids=batch.to(model.lm_head.weight.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def refit(linear, columns: torch.Tensor, gram: torch.Tensor) -> tuple[float, float]:
    """Set ``linear.weight[:, columns]`` to the least-squares fit; returns the relative output error
    of slicing alone and of the fit (both on ``gram``)."""
    h = gram.double()
    h += DAMPING * h.diagonal().mean() * torch.eye(len(h), dtype=h.dtype)
    w = linear.weight.detach().double().cpu()
    fitted = torch.linalg.solve(h[columns][:, columns], (w @ h[:, columns]).T).T

    def error(kept_weight: torch.Tensor) -> float:
        delta = -w
        delta[:, columns] += kept_weight
        return float(torch.einsum("oi,ij,oj->", delta, h, delta) / torch.einsum("oi,ij,oj->", w, h, w))

    errors = error(w[:, columns]), error(fitted)
    with torch.no_grad():
        linear.weight[:, columns] = fitted.to(linear.weight.dtype).to(linear.weight.device)
    return errors


COMPENSATIONS = {cls.name: cls() for cls in (FlapBias, LeastSquares)}

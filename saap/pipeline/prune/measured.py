"""Measured allocation: per-layer depth and width chosen on what each change does to the outputs.

Cross-layer exchange rates from first-order scores fail (SAAP's ``adaptive`` search: dev perplexity
238 against 114 for a fixed layer range at 20 %), so this search measures them instead.

1. **Candidates.** Per layer: attention kept at every aligned KV-group count (0 = no attention), the
   MLP kept at every aligned width (0 = no MLP), and both at 0 (the layer removed). Inside a module
   the groups that go are the importance's lowest (SAAP's fused ranking by default), the same ones
   slicing removes. With ``--narrow-queries`` attention may also keep fewer query heads in every
   kept KV group (Minitron's head pruning); which ones go is measured too: each query head's cost is
   the KL its removal alone adds, from its layer's dense input.
2. **Costs, measured.** On ``search_samples`` calibration sequences, the cost of a candidate is the
   increase of KL(dense || pruned) of the next-token distributions when that layer takes it: the
   removed groups are masked (their o_proj / down_proj input columns multiply zeros, which is
   exactly their removal) and the model runs from that layer on, from the cached input of the layer.
   Attention is measured at each kept count with the MLP whole, the MLP at ``width_levels`` widths
   with attention whole (costs in between are interpolated), and the whole layer on its own, so the
   attention + MLP sum is not assumed where both go.
3. **Choice.** A multiple-choice knapsack (dynamic programme over the budget in 4000 steps) picks one
   candidate per layer minimising the summed cost, with the summed saving at least the budget.
   The saving is parameters, or predicted milliseconds per token for a speed requirement.
   ``search_moves`` narrows the candidates for the ablation: ``depth`` keeps or removes whole blocks
   (a measured ShortGPT), ``width`` only narrows (a measured LLM-Pruner); both are measured the same.
4. **Interactions.** Errors of separate layers do not add up (EvoPress, Sieberling et al. 2024), so
   each further pass re-measures every candidate with the other layers at the current plan (the
   cost is then the KL with the layer at the candidate minus the KL with the layer whole) and solves
   again. Every plan is scored by its whole-model KL, and the lowest is kept (``search_passes``).

Cost: ``passes x layers x (KV counts + width_levels + 2)`` partial forwards of ``search_samples``
sequences, each from the measured layer to the logits: ~half a forward on average.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from saap.pipeline.prune.context import PruneContext, Scored
from saap.pipeline.prune.estimators import GroupScores
from saap.pipeline.prune.units import attention_sizes
from saap.runtime.errors import SaapError
from saap.runtime.families import family_of
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

DP_STEPS = 4000  # budget resolution of the knapsack: 0.025 % of the budget
SUPPORT_TOP = 32  # the KL's vocabulary: the union of every position's dense top 32


def _kept(value) -> int:
    """What a size keeps: an MLP width, or the KV groups of an attention size ``(groups, queries)``."""
    return value[0] if isinstance(value, tuple) else value


def _depth(values: list) -> list:
    """Whole blocks only: a module kept whole (the last value) or removed (0)."""
    return [v for v in values if not _kept(v) or v == values[-1]]


def _width(values: list) -> list:
    """Narrowing only: no module removed (one with nothing left already stays at 0)."""
    return [v for v in values if _kept(v) > 0] or values


# --search-moves: which of a module's kept sizes (ascending, the current one last) a plan may take.
MOVES: dict[str, Callable[[list], list]] = {"depth+width": list, "depth": _depth, "width": _width}


@dataclass(frozen=True)
class Keep:
    """What one layer keeps: KV groups, query heads per kept group, and MLP channels."""

    kv: int
    width: int
    queries: int

    @classmethod
    def of(cls, shape: LayerShape, original: LayerShape | None = None) -> Keep:
        """What ``shape`` keeps of ``original`` (default: itself). A removed attention is written
        ``(0, G)`` with G the original's queries per group, the one form the candidates use."""
        queries = shape.queries_per_kv_head or (original or shape).queries_per_kv_head
        return cls(shape.num_key_value_heads, shape.intermediate_size, queries)

    @property
    def attention(self) -> tuple[int, int]:
        return self.kv, self.queries

    def shape(self, original: LayerShape) -> LayerShape:
        """The layer shape this keep leaves of ``original``."""
        return LayerShape(self.kv * self.queries, self.kv, self.width)


class Probe:
    """The model with some groups masked, and the KL of its outputs to the dense model's.

    Masks sit in forward pre-hooks on o_proj / down_proj, so nothing is copied or sliced; ``plan``
    maps a layer index to what it keeps (a layer not in it is whole).
    """

    def __init__(self, model: nn.Module, tokens: torch.Tensor, scores: GroupScores, shapes: list[LayerShape]):
        self.model, self.layers, self.shapes, self.scores = model, decoder_layers(model), shapes, scores
        self.hd = head_dim(model.config)
        self.plan: dict[int, Keep] = {}
        self.runs = 0
        self._masks: dict[tuple[int, str, int], torch.Tensor] = {}
        self._handles = []
        for i, layer in enumerate(self.layers):
            if has_attention(layer):
                self._handles.append(
                    block_output(layer, "attention").register_forward_pre_hook(self._hook(i, "attention"))
                )
            if has_mlp(layer):
                self._handles.append(block_output(layer, "mlp").register_forward_pre_hook(self._hook(i, "mlp")))
        with torch.no_grad():
            self.kwargs, inputs = self._capture(tokens)
            self._dense_support(self._run(0, inputs[0]))
        self.dense_inputs = inputs

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, i: int, module: str):
        def hook(linear, args):
            keep = self.plan.get(i)
            if keep is None:
                return None
            mask = self._mask(i, module, keep.attention if module == "attention" else keep.width)
            return None if mask is None else (args[0] * mask,)

        return hook

    def _mask(self, i: int, module: str, kept: int | tuple[int, int]) -> torch.Tensor | None:
        shape = self.shapes[i]
        whole = (shape.num_key_value_heads, shape.queries_per_kv_head) if module == "attention" else None
        if kept == whole or (module == "mlp" and kept >= shape.intermediate_size):
            return None
        key = (i, module, kept)
        if key not in self._masks:
            if module == "attention":  # an attention group is its query heads' o_proj columns
                groups, queries = self.scores.attention_keep(i, shape, LayerShape(kept[0] * kept[1], kept[0], 0))
                keep = attention_columns(shape, self.hd, groups, queries)  # the columns slicing keeps
                full = shape.num_attention_heads * self.hd
            else:
                keep, full = kept_indices(self.scores.mlp[i], kept), shape.intermediate_size
            mask = torch.zeros(full)
            mask[keep] = 1.0
            self._masks[key] = mask.to(self.model.lm_head.weight.dtype)
        return self._masks[key]

    def _capture(self, tokens: torch.Tensor):
        """One forward: each decoder layer's keyword arguments and input. The arguments are kept per
        layer: sliding-window layers (Gemma 3, Mistral) get another attention mask than full ones."""
        inputs: list[torch.Tensor | None] = [None] * len(self.layers)
        kwargs: list[dict] = [{} for _ in self.layers]

        def grab(i: int):
            def hook(layer, args, kw):
                inputs[i] = args[0] if args else kw["hidden_states"]
                kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}

            return hook

        handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        try:
            self.model(input_ids=tokens.to(self.model.lm_head.weight.device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return kwargs, inputs

    def _run(self, start: int, hidden: torch.Tensor, inputs: list | None = None) -> torch.Tensor:
        """The final hidden states, running layers ``start..`` on ``hidden`` (``inputs``: record each layer's input).

        ``hidden`` may hold the first rows of the probe's sequences only (a cheaper screening run):
        the causal mask is the same for every row, so it is cut to match."""
        for i in range(start, len(self.layers)):
            if inputs is not None:
                inputs[i] = hidden
            kwargs = dict(self.kwargs[i])
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.shape[0] > hidden.shape[0]:
                kwargs["attention_mask"] = mask[: hidden.shape[0]]
            out = self.layers[i](hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return family_of(self.model).final_norm(self.model)(hidden)

    def _logits(self, hidden: torch.Tensor, support: torch.Tensor | None = None) -> torch.Tensor:
        head = self.model.lm_head
        if support is None:
            return head(hidden).float()
        bias = head.bias[support] if head.bias is not None else None
        return nn.functional.linear(hidden, head.weight[support], bias).float()

    def _dense_support(self, final_hidden: torch.Tensor) -> None:
        """The vocabulary the KL is taken over: every token in some position's dense top SUPPORT_TOP.

        The output projection over the whole vocabulary would cost more than the layers; on this
        support (it holds ``support_mass`` of the dense probability) the KL is that of the two
        distributions conditioned on it, which ranks candidates the same way at a fraction of the cost.
        """
        logits = self._logits(final_hidden)
        self.support = logits.topk(SUPPORT_TOP, dim=-1).indices.unique()
        self.support_mass = float(torch.softmax(logits, -1)[..., self.support].sum(-1).mean())
        self.dense_logp = torch.log_softmax(logits[..., self.support], dim=-1)

    def kl(self, final_hidden: torch.Tensor) -> float:
        """Mean KL(dense || current plan) per token, on the support, from the final hidden states (of
        every sequence, or of the first ones)."""
        self.runs += 1
        dense = self.dense_logp[: final_hidden.shape[0]]
        with torch.no_grad():
            logq = torch.log_softmax(self._logits(final_hidden, self.support), dim=-1)
            return float((dense.exp() * (dense - logq)).sum(-1).mean())

    def kl_from(self, start: int, hidden: torch.Tensor) -> float:
        """The KL of the current plan, running from layer ``start`` on its input ``hidden``."""
        with torch.no_grad():
            return self.kl(self._run(start, hidden))

    def inputs_under(self, plan: dict[int, Keep]) -> tuple[list[torch.Tensor], float]:
        """Every layer's input with ``plan`` applied, and the plan's whole-model KL."""
        if not plan:
            return self.dense_inputs, 0.0
        self.plan = dict(plan)
        inputs: list = [None] * len(self.layers)
        with torch.no_grad():
            out = self._run(0, self.dense_inputs[0], inputs)
        return inputs, self.kl(out)


@dataclass
class LayerCosts:
    """Measured KL increase of one layer's candidates (0 for the whole module)."""

    attention: dict[tuple[int, int], float]  # kept (KV groups, queries per group) -> cost, with the MLP whole
    mlp: dict[int, float]  # kept width (the measured levels) -> cost, with attention whole
    layer: float | None  # both blocks removed, measured as such (None: not a candidate)

    def cost(self, keep: Keep) -> float:
        if keep.kv == 0 and keep.width == 0 and self.layer is not None:
            return self.layer
        widths = sorted(self.mlp)
        return self.attention[keep.attention] + float(np.interp(keep.width, widths, [self.mlp[w] for w in widths]))


def width_levels(width: int, levels: int, align: int) -> list[int]:
    """The widths the MLP is measured at: ``levels`` aligned steps from 0 to ``width`` (ascending)."""
    return sorted({width * j // levels // align * align for j in range(levels)} | {width})


def aligned_widths(width: int, align: int) -> list[int]:
    """Every width the plan may keep: the aligned ones below ``width``, and ``width`` itself."""
    return [*range(0, width, align), width]


def measure(probe: Probe, plan: dict[int, Keep], ctx: PruneContext, bar) -> list[LayerCosts]:
    """Every layer's candidate costs with the other layers at ``plan``."""
    inputs, _ = probe.inputs_under(plan)
    return [layer_costs(probe, plan, ctx, i, inputs[i], bar) for i in range(len(ctx.shapes))]


def layer_costs(
    probe: Probe, plan: dict[int, Keep], ctx: PruneContext, i: int, hidden: torch.Tensor, bar
) -> LayerCosts:
    """Layer i's candidates, each measured from the layer's input ``hidden`` under ``plan``."""
    shape, others = ctx.shapes[i], {j: keep for j, keep in plan.items() if j != i}
    probe.plan = others
    base = probe.kl_from(i, hidden) if others else 0.0

    def cost(keep: Keep) -> float:
        probe.plan = others | {i: keep}
        bar.update()
        return probe.kl_from(i, hidden) - base

    kv, width, q = shape.num_key_value_heads, shape.intermediate_size, shape.queries_per_kv_head
    sizes = attention_sizes(ctx.config, shape, i, ctx.align, ctx.settings.narrow_queries)
    attention = {(k, g): cost(Keep(k, width, g)) for k, g in sizes if (k, g) != (kv, q)}
    mlp = {w: cost(Keep(kv, w, q)) for w in width_levels(width, ctx.settings.width_levels, ctx.align) if w < width}
    layer = cost(Keep(0, 0, q)) if (0, q) in attention and 0 in mlp else None
    return LayerCosts(attention | {(kv, q): 0.0}, mlp | {width: 0.0}, layer)


def choose(options: list[list[tuple[float, float]]], need: float, steps: int = DP_STEPS) -> list[int] | None:
    """One option per layer, ``(cost, saving)`` each, minimising the summed cost with the summed
    saving at least ``need`` (a multiple-choice knapsack; savings counted in floor(need / steps)
    units, so meeting the units meets ``need``). None when no choice saves enough."""
    unit = need / steps
    best = np.full(steps + 1, np.inf)
    best[0] = 0.0
    parents = []
    for layer_options in options:
        new, pick, origin = np.full(steps + 1, np.inf), np.zeros(steps + 1, int), np.zeros(steps + 1, int)
        for j, (cost, saving) in enumerate(layer_options):
            b = min(steps, int(saving / unit + 1e-9)) if saving > 0 else 0
            candidate, source = np.full(steps + 1, np.inf), np.arange(steps + 1) - b
            candidate[b:] = best[: steps + 1 - b] + cost
            tail = steps - b + int(np.argmin(best[steps - b :]))  # savings beyond the need saturate
            candidate[steps], source[steps] = best[tail] + cost, tail
            better = candidate < new
            new[better], pick[better], origin[better] = candidate[better], j, source[better]
        parents.append((pick, origin))
        best = new
    if not np.isfinite(best[steps]):
        return None
    chosen, t = [], steps
    for pick, origin in reversed(parents):
        chosen.append(int(pick[t]))
        t = int(origin[t])
    return chosen[::-1]


def solve(costs: list[LayerCosts], ctx: PruneContext) -> dict[int, Keep]:
    """The plan minimising the summed measured cost under the budget."""
    candidates, options, moves = [], [], MOVES[ctx.settings.search_moves]
    for i, (shape, layer_costs) in enumerate(zip(ctx.shapes, costs, strict=True)):
        widths = moves(aligned_widths(shape.intermediate_size, ctx.align))
        sizes = attention_sizes(ctx.config, shape, i, ctx.align, ctx.settings.narrow_queries)
        keeps = [Keep(k, w, g) for k, g in moves(sizes) for w in widths]
        candidates.append(keeps)
        options.append([(layer_costs.cost(k), ctx.budget.saved(i, shape, k.shape(shape))) for k in keeps])
    chosen = choose(options, ctx.budget.remove)
    if chosen is None:
        raise SaapError(f"the budget ({ctx.budget.remove:,.1f} {ctx.budget.unit}) is out of reach of any plan")
    whole = [Keep.of(s) for s in ctx.shapes]
    return {i: keeps[j] for i, (keeps, j) in enumerate(zip(candidates, chosen, strict=True)) if keeps[j] != whole[i]}


def query_scores(probe: Probe, ctx: PruneContext) -> list[torch.Tensor]:
    """Each query head's score (higher = keep): minus the KL that removing it alone adds, measured from
    its layer's dense input. Which heads a group keeps is then the same for every plan and for slicing."""
    probe.plan, hd, scores = {}, probe.hd, []
    for i, shape in enumerate(ctx.shapes):
        costs = []
        o_proj = block_output(probe.layers[i], "attention") if has_attention(probe.layers[i]) else None
        for h in range(shape.num_attention_heads if o_proj is not None else 0):
            mask = torch.ones(o_proj.in_features, dtype=o_proj.weight.dtype)
            mask[h * hd : (h + 1) * hd] = 0
            handle = o_proj.register_forward_pre_hook(lambda _, args, mask=mask: (args[0] * mask,))
            try:
                costs.append(probe.kl_from(i, probe.dense_inputs[i]))
            finally:
                handle.remove()
        scores.append(-torch.tensor(costs, dtype=torch.float32))
    return scores


def measured_plan(ctx: PruneContext, scored: Scored) -> tuple[list[LayerShape], dict]:
    """Search ``search_passes`` times (measure, solve, score the plan); keep the lowest-KL plan."""
    settings, started = ctx.settings, time.perf_counter()
    tokens = torch.cat(ctx.batches)[: settings.search_samples]
    probe = Probe(ctx.model, tokens, scored.scores, ctx.shapes)
    per_pass = sum(
        len(attention_sizes(ctx.config, s, i, ctx.align, settings.narrow_queries))
        + len(width_levels(s.intermediate_size, settings.width_levels, ctx.align))
        + 1
        for i, s in enumerate(ctx.shapes)
    )
    bar = tqdm(total=per_pass * settings.search_passes, desc="measured search", unit="run", disable=not ctx.progress)
    plan: dict[int, Keep] = {}
    passes, best = [], None
    try:
        if settings.narrow_queries:
            scored.scores.queries = query_scores(probe, ctx)
        for _ in range(settings.search_passes):
            plan = solve(measure(probe, plan, ctx, bar), ctx)
            kl = probe.inputs_under(plan)[1]
            passes.append({"kl": round(kl, 6), "changed_layers": len(plan)})
            if best is None or kl < best[0]:
                best = (kl, plan, len(passes))
    finally:
        bar.close()
        probe.close()
    chosen = best[1]
    shapes = [k.shape(s) if (k := chosen.get(i)) else s for i, s in enumerate(ctx.shapes)]
    record = {
        "moves": settings.search_moves,
        "search_samples": len(tokens),
        "passes": passes,
        "kept_pass": best[2],
        "runs": probe.runs,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return shapes, {"measured": record}

"""Whole-plan refinement of the measured search: an evolutionary search over plans (EvoPress).

The knapsack adds up costs measured one layer at a time, but removals interact: the errors of
separate layers do not add up (EvoPress, Sieberling et al. 2024). So, starting from the knapsack's
plan, a (1 + ``OFFSPRING``) evolution mutates whole plans and keeps a child only when its
whole-model KL to the dense model is lower.

* **Mutation.** One to three random layers take a step back (one KV group or ``align`` MLP channels
  more kept); then random other layers take a step forward until the budget is met again. A child
  that overshoots the budget by more than the start plan or ``SLACK`` of it is drawn again, so the
  search cannot drift far from the requested size.
* **Fitness.** The KL on twice the search's sequences, run from the earliest layer the child
  changes, on the parent's cached inputs of that layer. As in EvoPress, selection is in two steps:
  every child on ``SCREEN`` sequences, the ``FINALISTS`` lowest on all of them. Scored on the
  knapsack's 8 sequences alone, the evolved 20 % plan of SmolLM2-135M had lowered their KL by 6 %
  and raised it on held-out ones (0.701 -> 0.707): it had fitted those 8.
* **Overfitting guard.** The evolved plan replaces the knapsack's only if its KL is lower on
  held-out calibration sequences that neither search scored (the next ``search_samples``).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from saap.pipeline.prune.context import PruneContext, Scored
from saap.pipeline.prune.estimators import GroupScores
from saap.pipeline.prune.measured import MOVES, Keep, Probe, aligned_widths
from saap.pipeline.prune.units import attention_sizes
from saap.runtime.surgery import LayerShape

OFFSPRING = 8  # children per generation (EvoPress's lambda)
SCREEN = 4  # fitness sequences every child is first scored on (EvoPress's multi-step selection) ...
FINALISTS = 2  # ... and how many of the lowest go on to be scored on all of them
SLACK = 0.01  # a child may save up to 1 % more than the budget (or the start plan's overshoot)
MAX_DRAWS = 50  # redraws of a child over the budget before the generation goes on without it


@dataclass(frozen=True)
class Space:
    """Each layer's grid of keeps (ascending KV counts and widths) and what a plan saves."""

    attention: list[list[tuple[int, int]]]
    widths: list[list[int]]
    ctx: PruneContext

    @classmethod
    def of(cls, ctx: PruneContext) -> Space:
        moves = MOVES[ctx.settings.search_moves]  # the same candidates as the knapsack's
        narrow = ctx.settings.narrow_queries
        sizes = [moves(attention_sizes(ctx.config, s, i, ctx.align, narrow)) for i, s in enumerate(ctx.shapes)]
        return cls(sizes, [moves(aligned_widths(s.intermediate_size, ctx.align)) for s in ctx.shapes], ctx)

    def steps(self, i: int, keep: Keep, direction: int) -> list[Keep]:
        """The keeps one step from ``keep`` in layer i: ``direction`` +1 keeps more, -1 keeps less."""
        out = []
        for values, current, make in (
            (self.attention[i], keep.attention, lambda v: Keep(v[0], keep.width, v[1])),
            (self.widths[i], keep.width, lambda v: Keep(keep.kv, v, keep.queries)),
        ):
            j = values.index(current) + direction
            if 0 <= j < len(values):
                out.append(make(values[j]))
        return out

    def saving(self, keeps: list[Keep]) -> float:
        shapes = enumerate(zip(self.ctx.shapes, keeps, strict=True))
        return sum(self.ctx.budget.saved(i, shape, k.shape(shape)) for i, (shape, k) in shapes)


def mutate(keeps: list[Keep], space: Space, limit: float, rng: random.Random) -> list[Keep] | None:
    """A child of ``keeps`` that saves between the budget and ``limit``; None if the draw overshoots."""
    child, grown = list(keeps), set()
    for _ in range(rng.randint(1, 3)):
        layers = [i for i in range(len(child)) if space.steps(i, child[i], +1)]
        if not layers:
            break
        i = rng.choice(layers)
        child[i] = rng.choice(space.steps(i, child[i], +1))
        grown.add(i)
    need = space.ctx.budget.remove
    while (saved := space.saving(child)) < need:
        steps = [(i, k) for i in range(len(child)) if i not in grown for k in space.steps(i, child[i], -1)]
        if not steps:
            return None
        i, child[i] = rng.choice(steps)
    return child if saved <= limit and child != keeps else None


def as_plan(keeps: list[Keep], whole: list[Keep]) -> dict[int, Keep]:
    return {i: k for i, (k, w) in enumerate(zip(keeps, whole, strict=True)) if k != w}


def evolve(probe: Probe, start: list[Keep], ctx: PruneContext, bar) -> tuple[list[Keep], dict]:
    """``search_generations`` generations from ``start``; the lowest-KL plan found, and its record."""
    space, rng = Space.of(ctx), random.Random(ctx.settings.seed)
    whole = [Keep.of(s) for s in ctx.shapes]
    parent, limit = start, max(space.saving(start), ctx.budget.remove * (1 + SLACK))
    inputs, parent_kl = probe.inputs_under(as_plan(parent, whole))
    start_kl, improved = parent_kl, 0

    def score(child: list[Keep], rows: int | None = None) -> float:
        first = min(i for i, (a, b) in enumerate(zip(child, parent, strict=True)) if a != b)
        probe.plan = as_plan(child, whole)
        return probe.kl_from(first, inputs[first][:rows])

    for _ in range(ctx.settings.search_generations):
        children = [c for _ in range(OFFSPRING) if (c := draw(parent, space, limit, rng))]
        bar.update()
        finalists = sorted(children, key=lambda c: score(c, SCREEN))[:FINALISTS]
        best = min(((score(c), c) for c in finalists), default=None, key=lambda t: t[0])
        if best and best[0] < parent_kl:
            parent, improved = best[1], improved + 1
            inputs, parent_kl = probe.inputs_under(as_plan(parent, whole))
    record = {"generations": ctx.settings.search_generations, "offspring": OFFSPRING, "improved": improved,
              "fitness_samples": len(inputs[0])}  # fmt: skip
    record |= {"kl_start": round(start_kl, 6), "kl_end": round(parent_kl, 6)}
    return parent, record


def draw(parent: list[Keep], space: Space, limit: float, rng: random.Random) -> list[Keep] | None:
    """A child within the budget's limits, or None after MAX_DRAWS overshooting draws."""
    return next((c for _ in range(MAX_DRAWS) if (c := mutate(parent, space, limit, rng))), None)


def plan_kl(ctx: PruneContext, scores: GroupScores, tokens: torch.Tensor, plans: list[list[Keep]]) -> list[float]:
    """Each plan's whole-model KL on ``tokens``."""
    whole = [Keep.of(s) for s in ctx.shapes]
    probe = Probe(ctx.model, tokens, scores, ctx.shapes)
    try:
        return [probe.inputs_under(as_plan(plan, whole))[1] for plan in plans]
    finally:
        probe.close()


def refine(ctx: PruneContext, scored: Scored, shapes: list[LayerShape]) -> tuple[list[LayerShape], dict]:
    """Evolve the knapsack's ``shapes``; keep the result if it also has the lower held-out KL."""
    n, started = ctx.settings.search_samples, time.perf_counter()
    sequences = torch.cat(ctx.batches)
    fitness, held_out = sequences[: 2 * n], sequences[2 * n : 3 * n]
    start = [Keep.of(s, original) for s, original in zip(shapes, ctx.shapes, strict=True)]
    bar = tqdm(total=ctx.settings.search_generations, desc="plan evolution", unit="gen", disable=not ctx.progress)
    probe = Probe(ctx.model, fitness, scored.scores, ctx.shapes)
    try:
        evolved, record = evolve(probe, start, ctx, bar)
    finally:
        bar.close()
        probe.close()
    kept = evolved
    if len(held_out) and evolved != start:  # no held-out sequences (under 3 x search samples): the search KL decides
        before, after = plan_kl(ctx, scored.scores, held_out, [start, evolved])
        record["held_out"] = {"samples": len(held_out), "kl_start": round(before, 6), "kl_end": round(after, 6)}
        kept = evolved if after < before else start
    record["kept"] = "knapsack" if kept == start else "evolved"
    record["seconds"] = round(time.perf_counter() - started, 1)
    return [k.shape(s) for s, k in zip(ctx.shapes, kept, strict=True)], {"evolution": record}

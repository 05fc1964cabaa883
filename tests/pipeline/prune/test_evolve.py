import random

import pytest
import torch

from saap.pipeline.prune import PruneSettings, prune
from saap.pipeline.prune.budget import parameter_budget
from saap.pipeline.prune.context import PruneContext
from saap.pipeline.prune.evolve import SLACK, Space, evolve, mutate
from saap.pipeline.prune.measured import Keep, Probe
from saap.runtime.errors import SaapError
from saap.runtime.models import LoadedModel
from saap.runtime.surgery import layer_parameter_count, layer_shapes, model_parameter_count
from tests.conftest import make_model
from tests.pipeline.prune.test_measured import random_scores, tokens


def context(model, remove, generations=0, seed=0):
    shapes = layer_shapes(model.config)
    settings = PruneSettings(search_samples=4, search_generations=generations, seed=seed)
    return PruneContext(model, shapes, model_parameter_count(model), remove, parameter_budget(model.config, remove), 16,
                        [tokens(8)], settings, progress=False)  # fmt: skip


def removal(model, keeps):
    shapes = layer_shapes(model.config)
    after = [k.shape(s) for k, s in zip(keeps, shapes, strict=True)]
    return sum(layer_parameter_count(model.config, s) for s in shapes) - sum(
        layer_parameter_count(model.config, s) for s in after
    )


@pytest.mark.parametrize("heads,kv_heads,tied", [(4, 4, True), (4, 2, False)])
def test_every_child_meets_the_budget_without_overshooting_it(heads, kv_heads, tied):
    model = make_model(heads=heads, kv_heads=kv_heads, layers=4, intermediate=64, tied=tied)
    q = heads // kv_heads
    parent = [Keep(kv_heads, 64, q), Keep(kv_heads // 2, 32, q), Keep(0, 0, q), Keep(kv_heads, 16, q)]
    ctx = context(model, removal(model, parent))
    space, rng = Space.of(ctx), random.Random(0)
    limit = ctx.budget.remove * (1 + SLACK) + layer_parameter_count(model.config, ctx.shapes[0]) // 8
    children = [c for _ in range(200) if (c := mutate(parent, space, limit, rng))]
    assert len(children) > 20
    for child in children:
        assert child != parent
        assert ctx.budget.remove <= removal(model, child) <= limit
        assert all(k.attention in space.attention[i] and k.width in space.widths[i] for i, k in enumerate(child))
    assert len({tuple(c) for c in children}) > 5  # the draws explore, not one move


def test_evolution_moves_the_removal_to_the_layer_that_does_nothing():
    model = make_model(heads=4, kv_heads=2, layers=4, intermediate=64).eval()
    with torch.no_grad():  # layer 2's MLP writes (almost) nothing into the residual stream
        model.model.layers[2].mlp.down_proj.weight.mul_(1e-4)
    whole = [Keep(2, 64, 2)] * 4
    start = [Keep(2, 64, 2), Keep(2, 32, 2), Keep(2, 32, 2), Keep(2, 64, 2)]  # half of layer 1's MLP and of layer 2's
    ctx = context(model, removal(model, start), generations=30)
    probe = Probe(model, tokens(4), random_scores(ctx.shapes), ctx.shapes)

    class Bar:
        def update(self):
            pass

    try:
        evolved, record = evolve(probe, start, ctx, Bar())
    finally:
        probe.close()
    assert record["kl_end"] < record["kl_start"] and record["improved"] >= 1
    assert evolved == [whole[0], whole[1], Keep(2, 0, 2), whole[3]]  # the knapsack's additive costs missed it
    assert record["kl_end"] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("heads,kv_heads,tied", [(4, 4, True), (8, 4, False)])
def test_saap_with_evolution_meets_the_budget_and_records_the_search(tokenizer, text_file, heads, kv_heads, tied):
    model = make_model(heads=heads, kv_heads=kv_heads, layers=4, intermediate=256, head_dim=8, tied=tied)
    settings = PruneSettings(ratio=0.3, align=8, calibration=str(text_file), num_samples=6, seq_len=16,
                             search_samples=2, search_generations=3)  # fmt: skip
    record = prune(LoadedModel(model, tokenizer, {"name": "tiny"}), settings, progress=False)
    assert 0.3 <= record["ratio_achieved"] <= 0.3 + 0.3 * SLACK + 0.01
    evolution = record["evolution"]
    assert evolution["generations"] == 3 and evolution["kl_end"] <= evolution["kl_start"]
    assert evolution["fitness_samples"] == 4  # twice the search's
    assert evolution["held_out"]["samples"] == 2 and evolution["kept"] in ("evolved", "knapsack")
    assert record["params_after"] == model_parameter_count(model)


def test_negative_generations_are_refused():
    with pytest.raises(SaapError, match="--search-generations"):
        PruneSettings(search_generations=-1)


def test_screening_on_the_first_sequences_measures_their_kl_alone():
    """A run on the first rows of the probe's batch (its mask cut to them) gives those rows' KL in the full run."""
    model = make_model(heads=4, kv_heads=2, layers=3, intermediate=64).eval()
    shapes = layer_shapes(model.config)
    probe = Probe(model, tokens(4), random_scores(shapes), shapes)
    try:
        inputs, _ = probe.inputs_under({1: Keep(1, 32, 2)})
        first_rows = probe.kl_from(1, inputs[1][:2])
        with torch.no_grad():
            in_full_run = probe.kl(probe._run(1, inputs[1])[:2])
    finally:
        probe.close()
    assert first_rows == pytest.approx(in_full_run, rel=1e-5)
    assert first_rows > 0


def test_with_depth_moves_the_evolution_steps_whole_blocks():
    model = make_model(heads=4, kv_heads=2, layers=3, intermediate=64)
    ctx = context(model, removal(model, [Keep(2, 64, 2), Keep(0, 64, 2), Keep(2, 0, 2)]))
    ctx.settings.search_moves = "depth"
    space = Space.of(ctx)
    assert space.attention == [[(2, 2)], [(0, 2), (2, 2)], [(0, 2), (2, 2)]] and space.widths == [[0, 64]] * 3
    assert space.steps(1, Keep(2, 64, 2), -1) == [Keep(0, 64, 2), Keep(2, 0, 2)]

import itertools
import random

import pytest
import torch

from saap.pipeline.prune import PruneSettings, prune, shrink_model
from saap.pipeline.prune.budget import parameter_budget
from saap.pipeline.prune.context import PruneContext, Scored
from saap.pipeline.prune.estimators import GroupScores
from saap.pipeline.prune.measured import Keep, Probe, choose, measured_plan, width_levels
from saap.runtime.errors import SaapError
from saap.runtime.models import LoadedModel
from saap.runtime.surgery import LayerShape, layer_parameter_count, layer_shapes, model_parameter_count
from tests.conftest import make_model


def tokens(n=3, seq=16, seed=0):
    return torch.randint(0, 300, (n, seq), generator=torch.Generator().manual_seed(seed))


def random_scores(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return GroupScores(
        [torch.rand(s.num_key_value_heads, generator=g) for s in shapes],
        [torch.rand(s.intermediate_size, generator=g) for s in shapes],
    )


def test_knapsack_finds_the_cheapest_choice_that_saves_enough():
    rng = random.Random(0)
    for _ in range(20):
        options = [[(rng.random(), rng.choice([0, 1, 2, 3, 5])) for _ in range(4)] for _ in range(4)]
        need = rng.choice([3, 6, 9])
        chosen = choose(options, need, steps=need)
        feasible = [
            c for c in itertools.product(range(4), repeat=4) if sum(options[i][j][1] for i, j in enumerate(c)) >= need
        ]
        if not feasible:
            assert chosen is None
            continue
        best = min(sum(options[i][j][0] for i, j in enumerate(c)) for c in feasible)
        assert sum(options[i][j][1] for i, j in enumerate(chosen)) >= need
        assert sum(options[i][j][0] for i, j in enumerate(chosen)) == pytest.approx(best)


@pytest.mark.parametrize("heads,kv_heads,tied", [(4, 4, True), (4, 2, False)])
def test_masking_a_plan_measures_the_same_kl_as_slicing_it(heads, kv_heads, tied):
    """The probe's masks must be exactly the removal that slicing does (same groups, same outputs)."""
    model = make_model(heads=heads, kv_heads=kv_heads, layers=3, intermediate=64, tied=tied).eval()
    shapes, batch = layer_shapes(model.config), tokens()
    scores = random_scores(shapes)
    probe = Probe(model, batch, scores, shapes)
    q = heads // kv_heads
    plan = {1: Keep(kv_heads // 2, 32, q), 2: Keep(0, 16, q)}
    _, masked_kl = probe.inputs_under(plan)
    probe.close()
    targets = [k.shape(s) if (k := plan.get(i)) else s for i, s in enumerate(shapes)]
    dense_logp = torch.log_softmax(model(batch).logits[..., probe.support], -1)
    shrink_model(model, scores, targets)
    with torch.no_grad():
        logq = torch.log_softmax(model(batch).logits[..., probe.support], -1)
        sliced_kl = float((dense_logp.exp() * (dense_logp - logq)).sum(-1).mean())
    assert masked_kl == pytest.approx(sliced_kl, rel=1e-4, abs=1e-7)
    assert masked_kl > 0


def test_the_search_removes_a_layer_that_does_nothing_whole():
    model = make_model(heads=4, kv_heads=2, layers=4, intermediate=64).eval()
    with torch.no_grad():  # layer 2 writes (almost) nothing into the residual stream
        model.model.layers[2].self_attn.o_proj.weight.mul_(1e-4)
        model.model.layers[2].mlp.down_proj.weight.mul_(1e-4)
    shapes = layer_shapes(model.config)
    remove = layer_parameter_count(model.config, shapes[2]) - layer_parameter_count(model.config, LayerShape(0, 0, 0))
    ctx = PruneContext(model, shapes, model_parameter_count(model), remove, parameter_budget(model.config, remove), 16,
                       [tokens(4)], PruneSettings(search_samples=4), progress=False)  # fmt: skip
    plan, record = measured_plan(ctx, Scored(random_scores(shapes)))
    assert plan[2] == LayerShape(0, 0, 0)
    assert all(plan[i] == shapes[i] for i in (0, 1, 3))
    assert record["measured"]["passes"][0]["changed_layers"] == 1


def test_width_levels_are_aligned_and_span_the_module():
    assert width_levels(1536, 4, 32) == [0, 384, 768, 1152, 1536]
    assert width_levels(100, 3, 32) == [0, 32, 64, 100]


@pytest.mark.parametrize("passes", [1, 2])
def test_saap_default_meets_the_budget_and_reloads_its_shapes(tokenizer, text_file, passes):
    model = make_model(heads=8, kv_heads=4, layers=4, intermediate=256, head_dim=8)
    settings = PruneSettings(ratio=0.3, align=8, calibration=str(text_file), num_samples=4, seq_len=16,
                             search_samples=2, search_passes=passes)  # fmt: skip
    assert settings.allocation == "measured" and settings.importance == "saap-fused"
    record = prune(LoadedModel(model, tokenizer, {"name": "tiny"}), settings, progress=False)
    assert 0.3 <= record["ratio_achieved"] <= 0.31
    assert len(record["measured"]["passes"]) == passes
    assert record["params_after"] == model_parameter_count(model)


@pytest.mark.parametrize("moves", ["depth", "width"])
def test_search_moves_restrict_the_plan_to_whole_blocks_or_to_narrowing(tokenizer, text_file, moves):
    model = make_model(heads=4, kv_heads=2, layers=4, intermediate=64)
    settings = PruneSettings(ratio=0.3, align=8, calibration=str(text_file), num_samples=4, seq_len=16,
                             search_samples=2, search_moves=moves, search_generations=4)  # fmt: skip
    record = prune(LoadedModel(model, tokenizer, {"name": "tiny"}), settings, progress=False)
    assert record["ratio_achieved"] >= 0.3 and record["measured"]["moves"] == moves
    sizes = [(s.num_key_value_heads, s.intermediate_size) for s in layer_shapes(model.config)]
    if moves == "depth":  # every module whole or gone, and some gone
        assert all(kv in (0, 2) and width in (0, 64) for kv, width in sizes) and any(0 in size for size in sizes)
    else:  # every module narrowed at most
        assert all(kv > 0 and width > 0 for kv, width in sizes) and sizes != [(2, 64)] * 4


def test_an_unknown_search_move_is_refused():
    with pytest.raises(SaapError, match="--search-moves is one of depth\\+width, depth, width"):
        PruneSettings(search_moves="layers")


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_narrow_queries_prunes_query_heads_of_a_single_kv_group(tokenizer, text_file, tmp_path, family):
    """One KV head per layer (Gemma 3 270M's case): without --narrow-queries attention can only go whole."""
    from saap.runtime.checkpoint import load_checkpoint, save_checkpoint

    # A small MLP and narrowing moves only: 20 % is out of reach without fewer query heads.
    model = make_model(heads=4, kv_heads=1, intermediate=16, family=family)
    settings = PruneSettings(ratio=0.2, align=8, calibration=str(text_file), num_samples=4, seq_len=16,
                             search_samples=2, narrow_queries=True, search_moves="width",
                             search_generations=4)  # fmt: skip
    record = prune(LoadedModel(model, tokenizer, {"name": "tiny"}), settings, progress=False)
    shapes = layer_shapes(model.config)
    assert record["ratio_achieved"] >= 0.2
    assert any(0 < s.num_attention_heads < 4 for s in shapes), shapes  # narrowed, not only removed
    assert all(s.num_key_value_heads in (0, 1) for s in shapes)
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", record)
    reloaded, _, _ = load_checkpoint(tmp_path / "ckpt")
    ids = tokens(1)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_narrow_queries_needs_the_measured_allocation():
    with pytest.raises(SaapError, match="--narrow-queries needs --allocation measured"):
        PruneSettings(method="flap", narrow_queries=True)

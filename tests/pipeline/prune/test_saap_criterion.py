import pytest
import torch

from saap.pipeline.prune import ALLOCATIONS, PruneSettings, parameters_to_remove, prune, saap_criterion
from saap.pipeline.prune.budget import parameter_budget
from saap.pipeline.prune.context import PruneContext, Scored
from saap.runtime.errors import SaapError
from saap.runtime.models import LoadedModel
from saap.runtime.surgery import (
    LayerShape,
    decode_parameter_count,
    layer_parameter_count,
    layer_shapes,
    model_parameter_count,
)
from tests.conftest import make_model


def batches(n=4, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (1, seq), generator=g) for _ in range(n)]


def test_statistics_have_both_metrics_per_batch_and_in_total():
    model = make_model(heads=6, kv_heads=2)
    stats = saap_criterion.collect_statistics(model, batches(), progress=False)
    for metric in saap_criterion.METRICS:
        assert [t.shape for t in stats.total[metric]["attention"]] == [(2,)] * 3
        assert [t.shape for t in stats.per_batch[metric]["mlp"]] == [(4, 128)] * 3
        assert all((t >= 0).all() for t in stats.total[metric]["mlp"])
    assert all(p.grad is None for p in model.parameters())


def test_element_metric_matches_its_definition_on_one_channel():
    model = make_model(layers=2)
    data = batches(n=3)
    stats = saap_criterion.collect_statistics(model, data, progress=False)
    reference = make_model(layers=2)
    grads = []
    for batch in data:
        reference.zero_grad()
        reference(input_ids=batch, labels=batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in reference.named_parameters() if "layers.1.mlp" in n})
    total = 0.0
    for name, axis in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
        key = f"model.layers.1.mlp.{name}.weight"
        w = dict(reference.named_parameters())[key].detach()
        g = torch.stack([gr[key] for gr in grads]).mean(0)
        fisher = torch.stack([gr[key].square() for gr in grads]).mean(0)
        term = (w * g - 0.5 * w.square() * fisher).abs()
        total += float(term[7].sum() if axis == 0 else term[:, 7].sum())
    assert stats.total["element"]["mlp"][1][7].item() == pytest.approx(total, rel=1e-4)


def test_learned_sigma_converges_to_each_metrics_noise():
    sigma2 = saap_criterion.learn_uncertainty({"vector": 4.0, "element": 0.25})
    assert sigma2["vector"] == pytest.approx(4.0, rel=0.01) and sigma2["element"] == pytest.approx(0.25, rel=0.01)


def _stats(noise_vector: float, noise_element: float, layers=2, groups=8, n=16):
    g = torch.Generator().manual_seed(0)
    truth = [torch.rand(groups, generator=g) + 0.5 for _ in range(layers)]

    def noisy(scale):
        return [t + scale * torch.randn(n, groups, generator=g) for t in truth]

    per_batch = {"vector": noisy(noise_vector), "element": noisy(noise_element)}
    total = {m: [t.mean(0) for t in per_batch[m]] for m in per_batch}
    return saap_criterion.GroupStatistics(
        total={m: {"attention": total[m], "mlp": total[m]} for m in total},
        per_batch={m: {"attention": per_batch[m], "mlp": per_batch[m]} for m in per_batch},
    )


def test_a_noisier_metric_gets_the_smaller_fusion_weight():
    fused = saap_criterion.fuse(_stats(noise_vector=0.5, noise_element=0.05))
    assert fused.weights["mlp"]["vector"] < fused.weights["mlp"]["element"]
    fused = saap_criterion.fuse(_stats(noise_vector=0.05, noise_element=0.5))
    assert fused.weights["mlp"]["vector"] > fused.weights["mlp"]["element"]
    assert saap_criterion.fuse(_stats(0.5, 0.05), "sum").weights["mlp"] == {"vector": 1.0, "element": 1.0}
    assert saap_criterion.fuse(_stats(0.5, 0.05), "element").weights["mlp"] == {"vector": 0.0, "element": 1.0}


def test_paper_form_and_ranking_form_order_groups_alike():
    i_v, i_e = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 1.0, 2.5])
    paper = saap_criterion.paper_fused_score(i_v, i_e, 2.0, 0.5)
    ranking = (i_v / 4 + i_e / 1) / (1 / 4 + 1)
    assert torch.equal(paper.argsort(), ranking.argsort())


def test_fluctuation_is_the_coefficient_of_variation():
    fused = saap_criterion.FusedScores(
        groups={}, per_batch_module={"attention": [torch.tensor([1.0, 1.0, 1.0])], "mlp": [torch.tensor([1.0, 3.0])]}
    )
    cv = saap_criterion.fluctuation(fused)
    assert cv["attention"] == [0.0] and cv["mlp"][0] == pytest.approx(torch.tensor([1.0, 3.0]).std().item() / 2)


def test_adaptive_plan_meets_the_budget_within_one_unit_and_can_drop_a_block():
    model = make_model(heads=4, kv_heads=4, layers=3, intermediate=128, head_dim=16)
    config, shapes = model.config, layer_shapes(model.config)
    groups = {"attention": [torch.ones(4), torch.ones(4) * 1e-6, torch.ones(4)], "mlp": [torch.ones(128)] * 3}
    fused = saap_criterion.FusedScores(groups=groups, per_batch_module={})
    cv = {"attention": [0.0] * 3, "mlp": [0.0] * 3}
    remove = 4 * layer_parameter_count(config, LayerShape(1, 1, 0)) + 3 * 3 * 64 * 16  # a block + a bit
    ctx = PruneContext(model, shapes, 0, remove, parameter_budget(config, remove), 16, None, PruneSettings())
    plan, _ = ALLOCATIONS["adaptive"].plan(ctx, Scored(None, extra={"fused": fused, "cv": cv}))
    removed = sum(
        layer_parameter_count(config, a) - layer_parameter_count(config, b) for a, b in zip(shapes, plan, strict=True)
    )
    assert remove <= removed < remove + layer_parameter_count(config, LayerShape(1, 1, 0))
    assert plan[1].num_key_value_heads == 0  # the near-worthless attention block is gone entirely
    assert plan[0].num_key_value_heads >= 1  # layer 0 always keeps attention
    assert all(s.intermediate_size % 16 == 0 for s in plan)


@pytest.mark.parametrize("allocation", ["measured", "uniform-range", "adaptive"])
@pytest.mark.parametrize("ablation", saap_criterion.ABLATIONS)
def test_saap_prunes_a_tiny_model_to_budget(tokenizer, text_file, allocation, ablation):
    model = make_model(heads=8, kv_heads=4, layers=4, intermediate=512, head_dim=8)
    loaded = LoadedModel(model, tokenizer, {"name": "tiny"})
    settings = PruneSettings(
        method="saap",
        ratio=0.25,
        align=8,
        calibration=str(text_file),
        num_samples=4,
        seq_len=16,
        allocation=allocation,
        ablation=ablation,
    )
    record = prune(loaded, settings, progress=False)
    assert abs(record["ratio_achieved"] - 0.25) <= 0.01
    assert record["params_after"] == model_parameter_count(model)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_budget_can_be_given_as_parameters_or_decode_bytes():
    model = make_model(layers=4, intermediate=256)
    config, shapes = model.config, layer_shapes(model.config)
    total = model_parameter_count(model)
    assert parameters_to_remove(config, shapes, total, PruneSettings(target_params=total - 1000)) == 1000
    decode = decode_parameter_count(config, shapes) * 4
    assert parameters_to_remove(config, shapes, total, PruneSettings(target_decode_bytes=decode - 4000)) == 1000
    with pytest.raises(SaapError, match="already met"):
        parameters_to_remove(config, shapes, total, PruneSettings(target_params=total + 1))
    with pytest.raises(SaapError, match="one budget"):
        PruneSettings(ratio=0.2, target_params=10)

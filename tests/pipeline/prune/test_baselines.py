"""The baseline methods (flap, wanda-sp, shortgpt, magnitude, random) on tiny models."""

import pytest
import torch

from saap.pipeline.data import calibration_batches
from saap.pipeline.prune import ALLOCATIONS, RATIO_TOLERANCE, PruneSettings, baselines, prune, shrink_model
from saap.pipeline.prune.budget import parameter_budget
from saap.pipeline.prune.context import PruneContext, Scored
from saap.pipeline.prune.estimators import make_estimator, score_groups
from saap.runtime.checkpoint import load_checkpoint, save_checkpoint
from saap.runtime.errors import SaapError
from saap.runtime.models import LoadedModel
from saap.runtime.surgery import LayerShape, kept_indices, layer_parameter_count, layer_shapes, model_parameter_count
from tests.conftest import make_model

BASELINES = ["flap", "wanda-sp", "shortgpt", "magnitude", "random"]


def deep_model(heads=8, kv_heads=4, layers=8):
    return make_model(heads=heads, kv_heads=kv_heads, layers=layers, intermediate=512, head_dim=8)


def run(model, tokenizer, text_file, method, ratio=0.3, **kwargs):
    loaded = LoadedModel(model, tokenizer, {"name": "tiny", "sha256": "0" * 64})
    settings = PruneSettings(
        method=method, ratio=ratio, calibration=str(text_file), num_samples=4, seq_len=16, align=8, **kwargs
    )
    return prune(loaded, settings, progress=False)


def logits(model, ids=((1, 5, 9, 13, 17, 21),)):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2)])
def test_each_baseline_meets_the_budget_and_saves_and_reloads(tokenizer, text_file, tmp_path, method, heads, kv_heads):
    model = deep_model(heads, kv_heads)
    before = model_parameter_count(model)
    record = run(model, tokenizer, text_file, method)
    # Budget accounting is exact: the record, the config's shapes and the real tensors agree.
    assert record["params_after"] == model_parameter_count(model)
    shapes = layer_shapes(model.config)
    assert [layer["after"] for layer in record["layers"]] == [s.as_dict() for s in shapes]
    layers = sum(layer_parameter_count(model.config, s) for s in shapes)
    rest = model_parameter_count(model) - sum(model_parameter_count(layer) for layer in model.model.layers)
    assert layers + rest == record["params_after"]
    assert record["ratio_achieved"] == pytest.approx(1 - record["params_after"] / before)
    # Whole layers are coarse: shortgpt stays under the budget by less than one layer of this model.
    tolerance = layer_parameter_count(model.config, shapes[0]) / before if method == "shortgpt" else RATIO_TOLERANCE
    assert abs(record["ratio_achieved"] - 0.3) <= tolerance
    assert shapes[0].num_key_value_heads > 0  # layer 0 keeps attention (HF's KV cache reads it)
    expected = logits(model)
    assert torch.isfinite(expected).all()
    save_checkpoint(model, tokenizer, tmp_path / method, record)
    reloaded, _, metadata = load_checkpoint(tmp_path / method)
    assert metadata["method"] == method
    assert torch.allclose(logits(reloaded), expected, atol=1e-5)
    with torch.no_grad():  # generation with the KV cache runs through removed blocks too
        reloaded.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False)


def test_shortgpt_removes_the_lowest_block_influence_layers(tokenizer, text_file):
    model = deep_model(layers=8)
    batches = calibration_batches(tokenizer, text_file, 4, 16, 1, 0)
    influence = baselines.block_influence(model, batches, progress=False)
    record = run(model, tokenizer, text_file, "shortgpt", ratio=0.3)
    assert record["shortgpt"]["block_influence"] == pytest.approx(influence)
    removed = [i for i, s in enumerate(layer_shapes(model.config)) if s == LayerShape(0, 0, 0)]
    assert removed and 0 not in removed
    ranked = sorted(range(1, 8), key=lambda i: influence[i])
    assert sorted(removed) == sorted(ranked[: len(removed)])
    assert all(0 <= bi <= 2 for bi in influence)


def test_block_influence_is_zero_for_an_identity_layer(tokenizer, text_file):
    model = deep_model(layers=3)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    batches = calibration_batches(tokenizer, text_file, 2, 16, 1, 0)
    influence = baselines.block_influence(model, batches, progress=False)
    assert influence[1] == pytest.approx(0, abs=1e-6) and influence[0] > 1e-3


def test_flap_bias_compensation_keeps_the_mean_output(tokenizer, text_file):
    """At the calibration mean input, the pruned o_proj/down_proj give exactly the dense output."""
    model = deep_model(layers=3)
    batches = calibration_batches(tokenizer, text_file, 4, 16, 1, 0)
    stats = baselines.collect_input_stats(model, batches, progress=False)
    scores = baselines.flap_scores(model, stats)
    shapes = layer_shapes(model.config)
    plan = [LayerShape(4, 2, 256) if i else s for i, s in enumerate(shapes)]
    layer = model.model.layers[1]
    mean_o, mean_d = stats["attention"][1].mean.float(), stats["mlp"][1].mean.float()
    with torch.no_grad():
        dense_o, dense_d = layer.self_attn.o_proj(mean_o), layer.mlp.down_proj(mean_d)
    assert baselines.compensate_bias(model, stats, scores, plan) == []
    shrink_model(model, scores, plan)
    kept_channels = kept_indices(scores.mlp[1], 256)
    kept_groups = kept_indices(scores.attention[1], 2)
    q_channels = baselines._group_channels(deep_model(layers=3), 1)[kept_groups].flatten()
    with torch.no_grad():
        assert torch.allclose(layer.mlp.down_proj(mean_d[kept_channels]), dense_d, atol=1e-5)
        assert torch.allclose(layer.self_attn.o_proj(mean_o[q_channels]), dense_o, atol=1e-5)
    assert model.config.output_bias is True


def test_flap_with_and_without_compensation_both_meet_the_budget(tokenizer, text_file, tmp_path):
    for compensation in (True, False):
        model = deep_model(8, 2)
        record = run(model, tokenizer, text_file, "flap", ratio=0.4, compensation=None if compensation else "none")
        assert abs(record["ratio_achieved"] - 0.4) <= RATIO_TOLERANCE
        has_bias = model.model.layers[1].mlp.down_proj.bias is not None
        assert has_bias == compensation == bool(getattr(model.config, "output_bias", False))
        save_checkpoint(model, tokenizer, tmp_path / str(compensation), record)
        reloaded, _, _ = load_checkpoint(tmp_path / str(compensation))
        assert torch.allclose(logits(reloaded), logits(model), atol=1e-5)


def test_flap_threshold_removes_whole_blocks_and_never_layer_0_attention():
    model = deep_model(8, 4, layers=3)
    shapes = layer_shapes(model.config)
    # Layer 0's attention and layer 1's MLP score lowest of all: the threshold passes them first.
    attention = [torch.full((4,), -5.0), torch.zeros(4), torch.zeros(4)]
    mlp = [torch.zeros(512), torch.full((512,), -3.0), torch.zeros(512)]
    scores = baselines.GroupScores(attention, mlp)
    count = layer_parameter_count
    mlp_block = count(model.config, shapes[1]) - count(model.config, LayerShape(8, 4, 0))
    three_groups = count(model.config, shapes[0]) - count(model.config, LayerShape(2, 1, 512))
    remove = mlp_block + three_groups
    ctx = PruneContext(model, shapes, 0, remove, parameter_budget(model.config, remove), 8, None, PruneSettings())
    plan, _ = ALLOCATIONS["global-threshold"].plan(ctx, Scored(scores))
    assert plan[1].intermediate_size == 0  # a whole MLP block
    assert plan[0].num_key_value_heads == 1  # layer 0: down to one group, never zero


def test_wanda_sp_prunes_every_layer_at_one_ratio(tokenizer, text_file):
    model = deep_model(8, 4)
    run(model, tokenizer, text_file, "wanda-sp", ratio=0.3)
    shapes = layer_shapes(model.config)
    assert len(set(shapes)) == 1 and shapes[0] != LayerShape(8, 4, 512)


def test_wanda_sp_score_is_weight_times_input_norm(tokenizer, text_file):
    model = deep_model(8, 8, layers=1)
    batches = calibration_batches(tokenizer, text_file, 2, 16, 1, 0)
    stats = baselines.collect_input_stats(model, batches, progress=False)
    captured = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    handle.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).double()
    w = model.model.layers[0].mlp.down_proj.weight.double()
    expected = (w.abs() * x.norm(dim=0)).mean(0)
    got = baselines.wanda_sp_scores(model, stats).mlp[0]
    assert torch.allclose(got.double(), expected, rtol=1e-4)
    assert torch.allclose(stats["mlp"][0].variance, x.var(0), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("importance", ["taylor-element", "taylor-vector"])
def test_gradient_accumulation_is_exact_across_batch_sizes(tokenizer, text_file, importance):
    scores = []
    for batch_size in (1, 4):
        model = deep_model(8, 2, layers=3)
        batches = calibration_batches(tokenizer, text_file, 8, 16, batch_size, 0)
        scores.append(score_groups(model, make_estimator(importance), batches, progress=False))
    for a, b in zip(scores[0].attention + scores[0].mlp, scores[1].attention + scores[1].mlp, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", ["llm-pruner", "flap", "shortgpt", "saap"])
def test_device_map_auto_gives_the_same_result(tokenizer, text_file, method):
    results = []
    for device_map in (None, "auto"):
        model = deep_model(8, 2, layers=4)
        record = run(model, tokenizer, text_file, method, device_map=device_map)
        results.append((record["layers"], logits(model)))
        assert all(p.device.type == "cpu" for p in model.parameters())
    assert results[0][0] == results[1][0]
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


def test_dispatch_with_hooks_on_every_layer_matches(tokenizer, text_file):
    """accelerate's hooks (what a multi-GPU map installs) leave scores and gradients unchanged."""
    from saap.pipeline.prune import dispatch, gather

    batches = calibration_batches(tokenizer, text_file, 4, 16, 2, 0)
    results = []
    for hooked in (False, True):
        model = deep_model(8, 2, layers=3)
        if hooked:
            device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
            device_map |= {f"model.layers.{i}": "cpu" for i in range(3)}
            dispatch(model, device_map, force_hooks=True)
            assert hasattr(model.model.layers[1], "_hf_hook")
        results.append(score_groups(model, make_estimator("taylor-element"), batches, progress=False))
        if hooked:
            gather(model)
            assert not hasattr(model.model.layers[1], "_hf_hook")
    for a, b in zip(results[0].mlp, results[1].mlp, strict=True):
        assert torch.allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"device_map": "balanced"}, "device-map"),
    ],
)
def test_bad_baseline_settings_are_refused(kwargs, message):
    with pytest.raises(SaapError, match=message):
        PruneSettings(**kwargs)


def test_magnitude_and_random_methods_use_their_estimators(tokenizer, text_file):
    for method in ("magnitude", "random"):
        settings = PruneSettings(method=method)
        assert settings.importance == method and not settings.needs_calibration
        model = deep_model()
        record = run(model, tokenizer, text_file, method)
        assert record["calibration"] is None


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_flap_compensation_biases_survive_the_exports(tokenizer, text_file, tmp_path, fmt):
    import numpy as np

    from saap.runtime.engine import EngineSettings, load_engine

    model = make_model(heads=4, kv_heads=2, layers=4, intermediate=256, head_dim=16)
    record = run(model, tokenizer, text_file, "flap", ratio=0.3)
    assert any(
        layer.mlp.down_proj.bias.abs().sum() > 0 for layer in model.model.layers if hasattr(layer.mlp, "down_proj")
    )
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", record)
    if fmt == "gguf":
        from saap.export.gguf import export_gguf

        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f32", progress=False)
        exported = load_engine("gguf", str(tmp_path / "m.gguf"), EngineSettings(threads=1))
        bound = 2e-2  # llama.cpp's default f16 KV cache
    else:
        from saap.export.onnx import export_onnx

        export_onnx(tmp_path / "ckpt", tmp_path / "onnx", progress=False)
        exported = load_engine("onnx", str(tmp_path / "onnx"), EngineSettings(threads=1))
        bound = 1e-3
    reference = load_engine("torch", str(tmp_path / "ckpt"), EngineSettings(threads=1))
    prompt = [5, 9, 17, 33, 2, 40, 7]
    assert float(np.abs(exported.prefill(prompt) - reference.prefill(prompt)).max()) <= bound

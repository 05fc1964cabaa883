import pytest
import torch

from saap.pipeline.prune import PruneSettings, llm_pruner_layer_range, prune, shrink_model, uniform_plan
from saap.pipeline.prune.estimators import GroupScores
from saap.runtime.errors import SaapError
from saap.runtime.models import LoadedModel
from saap.runtime.surgery import head_dim, kept_indices, layer_parameter_count, layer_shapes, model_parameter_count
from tests.conftest import make_model


def wide_model(heads=8, kv_heads=8):
    return make_model(heads=heads, kv_heads=kv_heads, layers=4, intermediate=512, head_dim=8)


def test_layer_range_scales_llm_pruners_4_to_30_of_32():
    assert llm_pruner_layer_range(32) == range(4, 30)
    assert llm_pruner_layer_range(30) == range(4, 28)  # SmolLM2-135M


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2)])
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3])
def test_uniform_plan_meets_the_ratio_with_aligned_widths(heads, kv_heads, ratio):
    model = wide_model(heads, kv_heads)
    shapes, total = layer_shapes(model.config), model_parameter_count(model)
    plan, achieved = uniform_plan(model.config, shapes, range(1, 3), ratio, 16, total)
    assert abs(achieved - ratio) <= 0.01
    assert plan[0] == shapes[0] and plan[3] == shapes[3]  # outside the range: untouched
    assert plan[1] == plan[2]  # the same ratio in every pruned layer
    hd = head_dim(model.config)
    for shape in plan:
        assert shape.intermediate_size % 16 == 0 and (shape.num_attention_heads * hd) % 16 == 0


def test_alignment_can_make_a_ratio_unreachable():
    model = wide_model()
    with pytest.raises(SaapError, match="unreachable with --align 512"):
        uniform_plan(model.config, layer_shapes(model.config), range(1, 3), 0.2, 512, model_parameter_count(model))


def test_shrink_keeps_the_highest_scoring_groups():
    assert kept_indices(torch.tensor([0.5, 0.1, 0.9, 0.3]), 2).tolist() == [0, 2]
    model = make_model(heads=4, kv_heads=4, layers=1)
    up = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    scores = GroupScores([torch.tensor([4.0, 3, 2, 1])], [torch.arange(128.0)])
    plan = [layer_shapes(model.config)[0].__class__(2, 2, 32)]
    shrink_model(model, scores, plan)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, up[96:])
    assert layer_shapes(model.config) == plan


@pytest.mark.parametrize("importance", ["taylor-element", "magnitude"])
def test_prune_end_to_end_on_a_tiny_model(tokenizer, text_file, importance):
    model = wide_model(8, 4)
    loaded = LoadedModel(model, tokenizer, {"name": "tiny", "sha256": "0" * 64})
    settings = PruneSettings(
        method="llm-pruner",
        ratio=0.2,
        importance=importance,
        calibration=str(text_file),
        num_samples=4,
        seq_len=16,
        align=8,
    )
    record = prune(loaded, settings, progress=False)
    assert abs(record["ratio_achieved"] - 0.2) <= 0.01
    assert record["params_after"] == model_parameter_count(model)
    assert [layer["after"] for layer in record["layers"]] == [s.as_dict() for s in layer_shapes(model.config)]
    assert (record["calibration"] is None) == (importance == "magnitude")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 0.95}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"method": "obs"}, "unknown method"),
        ({"method": "llm-pruner", "importance": "hessian"}, "unknown importance"),
        ({"align": 0}, "align"),
        ({"allocation": "best"}, "unknown allocation"),
        ({"importance": "block-influence"}, "scores whole layers"),
        ({"allocation": "whole-layers"}, "needs --importance block-influence"),
        ({"method": "llm-pruner", "allocation": "adaptive"}, "needs --importance saap-fused"),
        ({"method": "flap", "importance": "magnitude"}, "add --compensation none"),
        ({"search_passes": 0}, "search-passes"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(SaapError, match=message):
        PruneSettings(**kwargs)


def test_calibration_text_is_the_presets_unless_given():
    from saap.pipeline.data import BOOKS_CALIBRATION, WEB_CALIBRATION

    assert PruneSettings().calibration == WEB_CALIBRATION  # saap
    assert PruneSettings(method="llm-pruner").calibration == BOOKS_CALIBRATION
    assert PruneSettings(method="saap", calibration="mine.txt").calibration == "mine.txt"


def test_ratio_of_the_decoder_excludes_the_embedding(tokenizer, text_file):
    model = wide_model(8, 4)
    decoder = sum(layer_parameter_count(model.config, s) for s in layer_shapes(model.config))
    loaded = LoadedModel(model, tokenizer, {"name": "tiny", "sha256": "0" * 64})
    settings = PruneSettings(method="magnitude", ratio=0.3, ratio_of="decoder", align=8)
    record = prune(loaded, settings, progress=False)
    assert record["decoder_params_before"] == decoder
    assert abs(record["decoder_ratio_achieved"] - 0.3) <= 0.01
    removed = record["params_before"] - record["params_after"]
    assert removed == decoder - record["decoder_params_after"]  # the embedding was not counted, nor touched
    assert record["ratio_achieved"] == pytest.approx(removed / record["params_before"])


# family -> (heads, kv_heads, tied): every family once with GQA and once with MHA across the parametrisation
FAMILY_SHAPES = {
    "mistral": (6, 2, False),
    "qwen2": (4, 4, True),
    "qwen3": (6, 2, True),
    "gemma3_text": (4, 4, False),
}


@pytest.mark.parametrize("method", ["saap", "llm-pruner", "flap", "wanda-sp", "shortgpt", "magnitude", "random"])
@pytest.mark.parametrize("family", list(FAMILY_SHAPES))
def test_every_method_prunes_every_family_to_a_checkpoint_that_reloads_strictly(
    tokenizer, text_file, tmp_path, family, method
):
    from saap.runtime.checkpoint import load_checkpoint, save_checkpoint

    heads, kv_heads, tied = FAMILY_SHAPES[family]
    model = make_model(heads=heads, kv_heads=kv_heads, tied=tied, family=family)
    settings = PruneSettings(method=method, ratio=0.2, calibration=str(text_file), num_samples=4, seq_len=16,
                             align=8, search_generations=2)  # fmt: skip
    record = prune(LoadedModel(model, tokenizer, {"name": "tiny", "sha256": "0" * 64}), settings, progress=False)
    assert record["params_after"] == model_parameter_count(model) < record["params_before"]
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", record)
    reloaded, _, meta = load_checkpoint(tmp_path / "ckpt")  # strict: every tensor at its recorded shape
    assert type(reloaded) is type(model) and meta["method"] == method
    ids = torch.tensor([[1, 5, 9, 17, 33, 40, 7, 11]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    out = reloaded.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=2)
    assert out.shape == (1, 13)

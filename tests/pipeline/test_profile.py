from dataclasses import asdict

import numpy as np
import pytest
import torch

from saap.pipeline.cli import main
from saap.pipeline.profile import PROBES, fit_profile
from saap.pipeline.prune import PruneSettings, prune
from saap.pipeline.prune.speed_model import CostModel, EngineSpec, default_path, features, find_profile, fit
from saap.runtime.checkpoint import save_checkpoint
from saap.runtime.errors import SaapError
from saap.runtime.models import LoadedModel
from saap.runtime.surgery import LayerShape, layer_shapes
from tests.conftest import make_model
from tests.pipeline.prune.test_speed_model import make_profile


def probe_rows(config):
    shapes = layer_shapes(config)
    return [features(config, make(shapes, 8)) for make in PROBES.values()]


def test_the_probes_separate_the_five_coefficients_and_the_fit_recovers_them():
    config = make_model(heads=4, kv_heads=2, layers=6, intermediate=64).config
    rows = probe_rows(config)
    assert np.linalg.matrix_rank(np.asarray(rows)) == 5
    true = CostModel(fixed_ms=2.0, attention_ms=0.3, mlp_ms=0.1, kv_group_ms=0.05, ms_per_mparam=7.0)
    ms = [true.predict_features(r) for r in rows]
    assert fit(rows, ms) == pytest.approx(true)  # dataclass equality, coefficient by coefficient
    assert true.predict_ms(config, layer_shapes(config)) == pytest.approx(ms[0])


def test_the_fit_keeps_slopes_non_negative():
    config = make_model(heads=4, kv_heads=2, layers=6, intermediate=64).config
    rows = probe_rows(config)
    ms = [5.0 - 0.05 * r[1] + 300.0 * r[4] for r in rows]  # attention blocks "save" time: noise, not physics
    cost = fit(rows, ms)
    assert cost.attention_ms == 0 and cost.ms_per_mparam > 0 and cost.mlp_ms >= 0


def test_prune_without_a_stored_profile_says_how_to_make_one(monkeypatch, tmp_path, capsys, hf_dir, text_file):
    monkeypatch.setenv("SAAP_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["prune", "--model", str(hf_dir), "--target-speedup", "1.5", "--engine", "gguf:q8_0",
            "--calibration", str(text_file), "--out", str(tmp_path / "o"), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run 'saap profile --model MODEL --engine gguf:q8_0' first" in err
    assert not (tmp_path / "o").exists()


def speed_prune(tokenizer, text_file, tmp_path, cost: CostModel, speedup: float):
    model = make_model(heads=8, kv_heads=4, layers=4, intermediate=256, head_dim=8)
    path = tmp_path / "profile.json"
    make_profile(model.config, cost).save(path)
    settings = PruneSettings(target_speedup=speedup, profile=str(path), align=8, calibration=str(text_file),
                             num_samples=4, seq_len=16, search_samples=2)  # fmt: skip
    record = prune(LoadedModel(model, tokenizer, {"name": "tiny"}), settings, progress=False)
    return model, record


def test_a_speed_budget_is_met_on_the_profiles_prediction(tokenizer, text_file, tmp_path):
    model, record = speed_prune(tokenizer, text_file, tmp_path, CostModel(0.5, 0.2, 0.2, 0.01, 4.0), 1.4)
    budget = record["budget"]
    assert budget["engine"] == "gguf:q8_0" and budget["unit"] == "ms per token"
    assert 1.4 <= budget["speedup_predicted"] <= 1.45
    cost = CostModel(**budget["cost_model"])
    assert budget["dense_ms_predicted"] / cost.predict_ms(model.config, layer_shapes(model.config)) == pytest.approx(
        budget["speedup_predicted"], rel=1e-3
    )
    assert record["ratio_requested"] is None


def test_where_only_fixed_costs_count_the_search_removes_whole_blocks(tokenizer, text_file, tmp_path):
    """No saving from width (ms_per_mparam 0): narrowing a module buys nothing, so none is narrowed."""
    model, record = speed_prune(tokenizer, text_file, tmp_path, CostModel(0.5, 1.0, 1.0, 0.0, 0.0), 1.5)
    dense = LayerShape(8, 4, 256)
    for shape in layer_shapes(model.config):
        assert shape.num_key_value_heads in (0, dense.num_key_value_heads)
        assert shape.intermediate_size in (0, dense.intermediate_size)
    assert record["budget"]["speedup_predicted"] >= 1.5


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"target_speedup": 1.5}, "needs --engine"),
        (
            {"target_speedup": 1.5, "engine": "gguf", "allocation": "uniform-range", "method": "llm-pruner"},
            "meets parameter budgets only",
        ),  # fmt: skip
        ({"target_speedup": 0.9, "engine": "gguf"}, "above 1"),
        ({"target_speedup": 1.5, "ratio": 0.2, "engine": "gguf"}, "give one budget"),
        ({"engine": "gguf"}, "go with --target-speedup"),
        ({"target_tok_s": 100, "engine": "tflite"}, "unknown engine"),
    ],
)
def test_bad_speed_budgets_are_refused(kwargs, message):
    with pytest.raises(SaapError, match=message):
        PruneSettings(**kwargs)


def test_a_requirement_met_already_or_out_of_reach_is_refused(tokenizer, text_file, tmp_path):
    with pytest.raises(SaapError, match="already met"):
        model = make_model(heads=8, kv_heads=4, layers=4, intermediate=256, head_dim=8)
        make_profile(model.config, CostModel(1.0, 0.1, 0.1, 0.0, 1.0)).save(tmp_path / "p.json")
        prune(LoadedModel(model, tokenizer, {}), PruneSettings(target_tok_s=1.0, profile=str(tmp_path / "p.json")))
    with pytest.raises(SaapError, match="unreachable"):
        speed_prune(tokenizer, text_file, tmp_path, CostModel(5.0, 0.1, 0.1, 0.0, 1.0), 3.0)


def test_fit_profile_measures_the_probes_on_torch(tmp_path, tokenizer, monkeypatch):
    """The whole profile on the torch engine: six interleaved bench rows, one fitted cost model."""
    monkeypatch.setenv("SAAP_CACHE_DIR", str(tmp_path / "cache"))
    model = make_model(heads=4, kv_heads=2, layers=4, intermediate=128)
    save_checkpoint(model, tokenizer, tmp_path / "tiny", {"kind": "test"})
    torch.set_num_threads(1)
    profile = fit_profile(str(tmp_path / "tiny"), EngineSpec.parse("torch"), threads=1, repeats=1, progress=False)
    assert [p["probe"] for p in profile.points] == list(PROBES)
    assert all(p["ms"] > 0 for p in profile.points)
    assert all(v >= 0 for k, v in asdict(profile.cost).items() if k != "fixed_ms")  # the slopes
    out = default_path(model.config, EngineSpec.parse("torch"))
    profile.save(out)
    assert find_profile(model.config, "torch", None) == profile

"""The decode cost model and the stored profile a speed budget reads (``saap.pipeline.prune.speed_model``)."""

import json

import pytest

from saap.pipeline.prune.speed_model import CostModel, EngineSpec, Profile, find_profile, shape_key
from saap.runtime.errors import SaapError
from tests.conftest import make_model


def make_profile(config, cost: CostModel, engine: str = "gguf:q8_0") -> Profile:
    return Profile(engine, cost, {"source": "tiny", "shape_key": shape_key(config)}, 2, {}, [], "now", "test")


def test_engine_specs_parse_with_defaults_and_refuse_what_no_engine_runs():
    assert EngineSpec.parse("gguf:q8_0") == EngineSpec("gguf", "q8_0", "cpu")
    assert EngineSpec.parse("torch") == EngineSpec("torch", "fp32", "cpu")
    assert str(EngineSpec.parse("onnx:int8@cuda")) == "onnx:int8@cuda"
    for bad, message in [("tflite", "unknown engine"), ("onnx:q8_0", "no quantization"), ("torch@tensorrt", "runs on")]:
        with pytest.raises(SaapError, match=message):
            EngineSpec.parse(bad)


def test_a_profile_round_trips_and_belongs_to_its_model_shape(tmp_path):
    config = make_model(heads=4, kv_heads=2, layers=3).config
    profile = make_profile(config, CostModel(1.0, 0.1, 0.1, 0.0, 2.0))
    profile.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == profile
    other = make_model(heads=4, kv_heads=2, layers=4).config
    with pytest.raises(SaapError, match="fitted on a model of shape"):
        Profile.load(tmp_path / "p.json").check_model(other)
    (tmp_path / "bad.json").write_text(json.dumps({"schema": "something/1"}))
    with pytest.raises(SaapError, match="not a saap profile"):
        Profile.load(tmp_path / "bad.json")
    with pytest.raises(SaapError, match="does not match the profile's engine"):
        find_profile(config, "onnx:fp32", str(tmp_path / "p.json"))

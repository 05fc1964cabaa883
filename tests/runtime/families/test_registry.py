"""The family registry: one adapter per model_type, found from a model, a config or a GGUF architecture."""

import pytest

from saap.runtime.errors import SaapError
from saap.runtime.families import FAMILIES, family_for_gguf, family_of
from saap.runtime.surgery import LayerShape
from tests.conftest import make_model


def test_the_five_families_are_registered_by_model_type():
    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3", "gemma3_text"}
    for model_type, family in FAMILIES.items():
        assert family.model_type == model_type and family.architecture.endswith("ForCausalLM")
        assert family_of(make_model(family=model_type)) is family


def test_an_unknown_family_is_refused_in_one_line():
    with pytest.raises(SaapError, match="unsupported architecture 'phi3'") as error:
        family_of("phi3")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("arch,model_type", [("llama", "llama"), ("deci", "llama"), ("qwen2", "qwen2"),
                                             ("qwen3", "qwen3"), ("gemma3", "gemma3_text")])  # fmt: skip
def test_a_gguf_architecture_names_its_family(arch, model_type):
    assert family_for_gguf(arch).model_type == model_type


def test_which_gguf_architecture_each_family_gets():
    whole, narrowed, per_layer = [LayerShape(4, 2, 128)] * 3, [LayerShape(2, 1, 96)] * 3, [LayerShape(4, 2, 128)] * 2
    per_layer.append(LayerShape(2, 1, 64))
    for family, expected in {"llama": ("llama", "llama", "deci"), "mistral": ("llama", "llama", "deci"),
                             "qwen2": ("qwen2", "llama", None), "qwen3": ("qwen3", "qwen3", None),
                             "gemma3_text": ("gemma3", "gemma3", None)}.items():  # fmt: skip
        config = make_model(family=family).config
        adapter = FAMILIES[family]
        assert adapter.gguf_architecture(config, whole) == expected[0]
        assert adapter.gguf_architecture(config, narrowed) == expected[1]
        if expected[2] is None:
            with pytest.raises(SaapError, match="no GGUF form"):
                adapter.gguf_architecture(config, per_layer)
        else:
            assert adapter.gguf_architecture(config, per_layer) == expected[2]

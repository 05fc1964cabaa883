"""Mistral: Llama's graph plus an optional sliding attention window (llama.cpp writes it as ``llama``)."""

from saap.runtime.families import register
from saap.runtime.families.base import Family


@register
class Mistral(Family):
    model_type = "mistral"
    architecture = "MistralForCausalLM"
    display = "Mistral"
    gguf_arch = "llama"  # convert_hf_to_gguf.py's MistralModel is a LlamaModel
    gguf_per_layer_arch = "deci"
    genai_type = "mistral"

    @staticmethod
    def sliding_window(config, layer: int) -> int | None:
        return getattr(config, "sliding_window", None)

"""Llama 1/2/3.x (and SmolLM, TinyLlama, ...): the base description, as llama.cpp writes it."""

from saap.runtime.families import register
from saap.runtime.families.base import Family


@register
class Llama(Family):
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    display = "Llama"
    gguf_arch = "llama"
    # deci (DeciLM / Nemotron-NAS) is llama's graph with per-layer head counts and FFN widths.
    gguf_per_layer_arch = "deci"
    genai_type = "llama"
    traced_onnx = True

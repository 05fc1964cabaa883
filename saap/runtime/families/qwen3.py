"""Qwen3 (dense): Llama's graph with a per-head RMSNorm of q and k before RoPE, neox-style RoPE.

``self_attn.q_norm`` / ``k_norm`` have ``head_dim`` weights shared by every head: slicing heads never
touches them.
"""

from saap.runtime.families import register
from saap.runtime.families.base import Family
from saap.runtime.families.qwen2 import Qwen2


@register
class Qwen3(Family):
    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"
    display = "Qwen3"
    qk_norm = True
    gguf_arch = "qwen3"
    gguf_per_layer_arch = None  # deci has no q/k norm
    genai_type = "qwen3"
    sliding_window = Qwen2.sliding_window

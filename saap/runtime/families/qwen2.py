"""Qwen2 / Qwen2.5: Llama's graph with q/k/v biases (o_proj has none) and neox-style RoPE.

The biases belong to their rows' groups: a KV group's q rows take their q-bias entries with them,
its k/v rows theirs (``runtime.surgery`` slices a bias with its output rows).
"""

from saap.runtime.families import register
from saap.runtime.families.base import Family


@register
class Qwen2(Family):
    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    display = "Qwen2/2.5"
    gguf_arch = "qwen2"
    # deci's q bias is sized to the full embedding width, so a narrowed Qwen2 has no GGUF form.
    gguf_per_layer_arch = None
    genai_type = "qwen2"
    # llama.cpp's qwen2 graph, which its converter writes for Qwen2ForCausalLM, sizes q as hidden x hidden.
    uniform_fixed_queries = True

    @classmethod
    def gguf_architecture(cls, config, shapes: list) -> str:
        arch = super().gguf_architecture(config, shapes)
        # llama.cpp's qwen2 sizes q as hidden x hidden; with fewer query heads (pruned to one shape)
        # llama's graph, whose q/k/v/o biases are optional, is the same model.
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return "llama" if arch == "qwen2" and shapes[0].num_attention_heads * hd != config.hidden_size else arch

    @staticmethod
    def sliding_window(config, layer: int) -> int | None:
        # Qwen2 windows only the layers from max_window_layers on, and only when use_sliding_window.
        if getattr(config, "use_sliding_window", False) and layer >= getattr(config, "max_window_layers", 0):
            return config.sliding_window
        return None

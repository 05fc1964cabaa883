"""What saap needs to know of one decoder family: the base class every family adapter overrides.

Modelled on llama.cpp's converter classes (``@ModelBase.register("Qwen2ForCausalLM") class
Qwen2Model``): the base describes a Llama-style decoder, and a family overrides only the few
attributes in which it differs. Everything else in saap (surgery, the calibration hooks, the loader,
the GGUF and ONNX writers, the engines) asks the adapter instead of naming a family.

What every supported family shares, and the base therefore states once:
* modules at ``model.model.layers[i].self_attn.{q,k,v,o}_proj`` and ``.mlp.{gate,up,down}_proj``, the
  embedding at ``model.model.embed_tokens``, the final norm at ``model.model.norm``;
* the coupled groups of ``runtime.surgery``: a KV head with the query heads that read it, and an MLP
  channel (gate/up row, down column). Biases of q/k/v rows are sliced with their rows; per-head q/k
  norms (Qwen3, Gemma 3) act on ``head_dim`` and are shared by every head, so they are never sliced.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from saap.runtime.errors import SaapError


class Family:
    """A Llama-style decoder family; subclasses override what differs (see the module docstring)."""

    model_type: ClassVar[str] = ""  # config.model_type, the registry key
    architecture: ClassVar[str] = ""  # the transformers class config.json names
    display: ClassVar[str] = ""  # how the README and messages name it

    # Norm modules of a decoder layer by role (None: the family has no such norm). The pre-norms feed
    # a block; the post-norms (Gemma's "sandwich") normalise a block's output before the residual add.
    pre_attention_norm: ClassVar[str] = "input_layernorm"
    post_attention_norm: ClassVar[str | None] = None
    pre_mlp_norm: ClassVar[str] = "post_attention_layernorm"
    post_mlp_norm: ClassVar[str | None] = None
    qk_norm: ClassVar[bool] = False  # per-head RMSNorm of q and k before RoPE (self_attn.q_norm / k_norm)
    norm_offset: ClassVar[float] = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)

    # llama.cpp: the architecture for layers that all have one shape, and the one that varies shapes
    # per layer (None: none of llama.cpp's graphs fits this family).
    gguf_arch: ClassVar[str] = ""
    gguf_per_layer_arch: ClassVar[str | None] = None
    genai_type: ClassVar[str] = ""  # onnxruntime-genai's model type
    # ``--shape uniform`` promises a checkpoint llama.cpp's own converter turns into a working GGUF of
    # ``gguf_arch``; these say what that graph cannot express, so the search never offers it.
    uniform_fixed_queries: ClassVar[bool] = False  # every query head kept (Qwen2: q is hidden x hidden)
    uniform_removes_layers: ClassVar[bool] = True  # whole layers may go (not Gemma 3: its layer pattern)
    # Terms every model of the family comes under, which its derivatives must carry (Gemma's): the
    # licence name and link written into a GGUF, and a NOTICE written beside checkpoints and exports.
    license: ClassVar[str | None] = None
    license_link: ClassVar[str | None] = None
    notice: ClassVar[str | None] = None
    traced_onnx: ClassVar[bool] = False  # export/onnx.py's traced graph (optimum's Llama ONNX config) fits

    @classmethod
    def write_notice(cls, directory) -> None:
        """Put the family's NOTICE beside a checkpoint or export it derives from one of its models."""
        if cls.notice:
            (directory / "NOTICE").write_text(cls.notice + "\n")

    # --- where the modules are ------------------------------------------------------------------

    @staticmethod
    def layers(model) -> Any:
        return model.model.layers

    @staticmethod
    def embedding(model) -> Any:
        return model.model.embed_tokens

    @staticmethod
    def final_norm(model) -> Any:
        return model.model.norm

    # --- what the graph does beyond Llama's -----------------------------------------------------

    @classmethod
    def activation(cls, config) -> str:
        """The MLP's gate activation as the exporters name it: ``silu`` or ``gelu_tanh``."""
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
        names = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
        if act not in names:
            raise SaapError(f"{cls.display}: MLP activation '{act}' is not supported by saap's exporters")
        return names[act]

    @staticmethod
    def embedding_scale(config) -> float:
        """What the embedding lookup is multiplied by (Gemma: sqrt(hidden_size))."""
        return 1.0

    @staticmethod
    def sliding_window(config, layer: int) -> int | None:
        """Layer ``layer``'s attention window in tokens (HF's: the current token and the window - 1
        before it), or None for full attention."""
        return None

    @staticmethod
    def rotary(model, layer: int):
        """The rotary-embedding module whose cos/sin layer ``layer`` uses."""
        return model.model.rotary_emb

    @classmethod
    def check_config(cls, config) -> None:
        """Refuse, in one line, a config using a feature saap's exporters do not write (each exporter
        checks its own RoPE support)."""

    @classmethod
    def fix_gguf_tokenizer(cls, tokenizer, path) -> None:
        """Correct, in place, what transformers' GGUF loader gets wrong about this family's vocabulary.

        For a byte-level (GPT-2-style: SmolLM2, Qwen) vocabulary it adds SentencePiece's byte fallback
        and decoder. Hugging Face's own byte-level tokenizers have neither, and llama.cpp's converter
        (convert_hf_to_gguf.py) reads that pair as a Llama SentencePiece vocabulary, writing a file
        whose tokenizer aborts llama.cpp. Encoding is unchanged: byte-level BPE has no unknown bytes."""
        from tokenizers import Tokenizer

        state = json.loads(tokenizer.backend_tokenizer.to_str())
        if state["model"].get("type") != "BPE" or '"ByteLevel"' not in json.dumps(state.get("pre_tokenizer")):
            return
        state["model"]["byte_fallback"] = False
        state["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
        tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))

    # --- llama.cpp ------------------------------------------------------------------------------

    @classmethod
    def gguf_architecture(cls, config, shapes: list) -> str:
        """The GGUF architecture for a model of this family with these per-layer shapes."""
        if len(set(shapes)) == 1 and min(shapes[0].as_dict().values()) > 0:  # one shape, no block removed
            return cls.gguf_arch
        if cls.gguf_per_layer_arch is None:
            raise SaapError(
                f"llama.cpp's '{cls.gguf_arch}' architecture builds every layer at one shape and none of its "
                f"per-layer architectures fits {cls.display}, so this pruned model (per-layer shapes) has no "
                "GGUF form; export it to ONNX (saap export onnx), which runs per-layer shapes"
            )
        return cls.gguf_per_layer_arch

    @classmethod
    def gguf_norm(cls, weight):
        """A norm's weight as llama.cpp multiplies by it (Gemma stores w, llama.cpp wants 1 + w)."""
        return weight + cls.norm_offset if cls.norm_offset else weight

    @classmethod
    def gguf_keys(cls, writer, config) -> None:
        """Family-specific GGUF metadata beyond the keys every architecture has."""

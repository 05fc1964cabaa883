"""Gemma 3 (text): four norms per layer, q/k norm, GeGLU, a scaled embedding, local and global attention.

* Norms: ``input_layernorm`` before attention, ``post_attention_layernorm`` on its output before the
  residual add, ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` around the MLP; all
  multiply by (1 + weight). A removed block's output is zero and its post-norm keeps it zero, so
  removing a block stays exact.
* Attention: per-head q/k RMSNorm; ``layer_types`` marks each layer sliding (window
  ``sliding_window``, RoPE base ``rope_local_base_freq``) or full (``rope_theta``, ``rope_scaling``).
* MLP: gelu(tanh)(gate) * up; the embedding lookup is multiplied by sqrt(hidden_size).
"""

import json

from saap.runtime.errors import SaapError
from saap.runtime.families import register
from saap.runtime.families.base import Family

# gguf-py's token types (TokenType): NORMAL pieces take part in BPE merges, USER_DEFINED ones (runs of
# spaces, tabs and newlines, markup) are matched whole before it, as SentencePiece does.
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4

# llama.cpp's gemma3 graph hard-codes what it does not read from the file: every 6th layer global,
# local RoPE base 10000, query scale 1/sqrt(head_dim).
LLAMA_CPP_SWA_PERIOD = 6
LLAMA_CPP_LOCAL_ROPE_BASE = 10000.0


@register
class Gemma3(Family):
    model_type = "gemma3_text"
    architecture = "Gemma3ForCausalLM"
    display = "Gemma 3"
    post_attention_norm = "post_attention_layernorm"
    pre_mlp_norm = "pre_feedforward_layernorm"
    post_mlp_norm = "post_feedforward_layernorm"
    qk_norm = True
    norm_offset = 1.0
    gguf_arch = "gemma3"
    gguf_per_layer_arch = None
    genai_type = "gemma3_text"
    # llama.cpp's converter writes no layer pattern for Gemma 3, so its graph takes every 6th layer as global:
    # with a layer removed the file would silently run the wrong layers with the sliding window.
    uniform_removes_layers = False
    license = "gemma"
    license_link = "https://ai.google.dev/gemma/terms"
    # The notice Gemma's Terms of Use (section 3.1) ask every distributed Model Derivative to carry.
    notice = (
        "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms. "
        "This model is a Model Derivative of Gemma (pruned and/or fine-tuned by saap); the use restrictions "
        "of the Gemma Terms of Use and its Prohibited Use Policy (ai.google.dev/gemma/prohibited_use_policy) "
        "apply to it."
    )

    @staticmethod
    def embedding_scale(config) -> float:
        return config.hidden_size**0.5

    @staticmethod
    def sliding_window(config, layer: int) -> int | None:
        return config.sliding_window if config.layer_types[layer] == "sliding_attention" else None

    @staticmethod
    def rotary(model, layer: int):
        sliding = model.config.layer_types[layer] == "sliding_attention"
        return model.model.rotary_emb_local if sliding else model.model.rotary_emb

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, key, None):
                raise SaapError(f"Gemma 3: {key} is not supported by saap's exporters")

    @classmethod
    def gguf_keys(cls, writer, config) -> None:
        expected = [
            "full_attention" if (i + 1) % LLAMA_CPP_SWA_PERIOD == 0 else "sliding_attention"
            for i in range(config.num_hidden_layers)
        ]
        hd = config.head_dim
        if (
            list(config.layer_types) != expected
            or float(config.rope_local_base_freq) != LLAMA_CPP_LOCAL_ROPE_BASE
            or config.query_pre_attn_scalar != hd
        ):
            raise SaapError(
                "llama.cpp's gemma3 graph fixes the layer pattern (every 6th global), the local RoPE base "
                "(10000) and the query scale (1/sqrt(head_dim)); this model differs, so it has no GGUF form"
            )
        writer.add_sliding_window(int(config.sliding_window))

    @classmethod
    def fix_gguf_tokenizer(cls, tokenizer, path) -> None:
        """transformers 4.57 reads Gemma's GGUF vocabulary as a Unigram over the file's scores, which
        splits plain words ("three" -> "th", "ree") where Gemma's SentencePiece BPE (and llama.cpp on the
        same file) keeps them whole. Rebuild it as SentencePiece BPE: merges ordered by the merged piece's
        score (transformers' own ``generate_merges``, as its GemmaConverter does from a .model file), and
        the user-defined pieces (whitespace runs) matched whole first."""
        from gguf import GGUFReader
        from tokenizers import AddedToken, Tokenizer
        from transformers.convert_slow_tokenizer import generate_merges

        reader = GGUFReader(path)
        tokens, scores, types = (reader.fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
        pieces, kinds = [str(p) for p in tokens.contents()], [int(k) for k in types.contents()]
        vocab = {piece: i for i, piece in enumerate(pieces)}
        normal = {p: float(s) for p, s, k in zip(pieces, scores.contents(), kinds, strict=True) if k == NORMAL}
        state = json.loads(tokenizer.backend_tokenizer.to_str())
        state["model"] = {
            "type": "BPE", "dropout": None, "unk_token": pieces[tokenizer.unk_token_id],
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
            "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
            "merges": [list(pair) for pair in generate_merges(vocab, normal)],
        }  # fmt: skip
        state["pre_tokenizer"] = None  # the normaliser's "▁" for " " is all SentencePiece does before BPE
        tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))
        whole = [p for p, kind in zip(pieces, kinds, strict=True) if kind == USER_DEFINED]
        tokenizer.add_tokens([AddedToken(p, normalized=False, special=False) for p in whole])

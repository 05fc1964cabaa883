"""GGUF export for llama.cpp, with per-layer shapes where llama.cpp has a graph for them.

The family adapter (``runtime.families``) names the architecture, as llama.cpp's converter classes do:
a checkpoint whose layers all have one shape is written as the family's own (``llama`` for Llama and
Mistral, ``qwen2``, ``qwen3``, ``gemma3``). A pruned Llama or Mistral (head counts or MLP widths differ
per layer) is written as ``deci`` (DeciLM / Nemotron-NAS in llama.cpp): the same graph as ``llama``,
but ``head_count``, ``head_count_kv`` and ``feed_forward_length`` are per-layer arrays, and 0 means the
layer's attention / MLP is gone. llama.cpp's ``llama``, ``qwen2``, ``qwen3`` and ``gemma3`` build
every layer from layer 0's sizes ("tensor has wrong shape"), and no per-layer graph fits Qwen2 (deci's
q bias is full width), Qwen3 or Gemma 3 (q/k norms): those export per-layer shapes to ONNX only, and
the export says so in one line. llama.cpp's ``qwen2`` also sizes q as hidden x hidden, so a Qwen2
with fewer query heads in every layer is written as ``llama``, whose biases are optional.

The family also says how its tensors are written: RoPE rows permuted for llama.cpp's "normal" RoPE
(``llama``, ``deci``) or left in HF's order ("neox": ``qwen2``, ``qwen3``, ``gemma3``); its norms by role (Gemma's
post-attention / post-MLP norms, per-head q/k norms), with Gemma's ``1 + weight`` folded in as
convert_hf_to_gguf.py does; and its extra keys (Gemma's sliding window).

Everything goes through gguf-py's ``GGUFWriter``; quantized types are produced by llama.cpp's own
quantizer (``llama_model_quantize``) from a float32 GGUF written first. The tokenizer is converted
the way llama.cpp's ``convert_hf_to_gguf.py`` converts it (GPT-2-style BPE -> ``gpt2`` with the
detected pre-tokenizer; SentencePiece-style byte-fallback BPE -> ``llama``).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import tempfile
import time
from collections import Counter
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saap.export.formats import DEFAULT_QUANT, GGUF_QUANTS
from saap.runtime.errors import SaapError
from saap.runtime.families import Family, family_of
from saap.runtime.io import atomic_file
from saap.runtime.native import verbose
from saap.runtime.surgery import LayerShape, head_dim, layer_shapes

# quant -> (llama_cpp LLAMA_FTYPE_* constant, the types its mix gives a matrix whose rows fit: the
# nominal type first; llama.cpp gives some tensors (output, attn_v, some ffn_down) Q6_K / Q5_K)
LLAMA_QUANTS = {
    "q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", ("Q8_0",)),
    "q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", ("Q4_0", "Q6_K")),
    # Q4_1 is d*q + m per 32 values: the very form of `saap finetune --method group-lora --bits 4
    # --group-size 32`, whose merged checkpoint it re-quantizes to the same codes (tested).
    "q4_1": ("LLAMA_FTYPE_MOSTLY_Q4_1", ("Q4_1", "Q6_K")),
    "q4_k_m": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", ("Q4_K", "Q5_K", "Q6_K")),
    "q5_k_m": ("LLAMA_FTYPE_MOSTLY_Q5_K_M", ("Q5_K", "Q6_K")),
}
# llama.cpp architectures whose head counts / FFN widths are per-layer arrays, and those whose RoPE is
# "normal" (interleaved pairs, so HF's rotate-half q/k rows are permuted) rather than "neox".
PER_LAYER_ARCHS = {"deci"}
NORMAL_ROPE_ARCHS = {"llama", "deci"}
# Width of the all-zero MLP written where llama.cpp cannot express "no MLP" (see _written_shapes);
# 32 is the smallest width every 32-block quant type accepts.
PLACEHOLDER_FFN = 32

# convert_hf_to_gguf.py's pre-tokenizer fingerprints (sha256 of the token ids of CHKTXT) for the
# LLaMA-family tokenizers saap handles; anything else is refused rather than guessed.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 "
    "33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}
# gguf-py's TokenType values (NORMAL=1, UNKNOWN=2, CONTROL=3, USER_DEFINED=4, UNUSED=5, BYTE=6)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def permute_rope(weight: np.ndarray, hd: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs, head by head.

    convert_hf_to_gguf.py's ``LlamaModel.permute`` with ``n_head = rows // head_dim``: it only ever
    regroups rows within a head, so it is exact for any (per-layer) head count. Works for biases too.
    """
    n_head = weight.shape[0] // hd
    return weight.reshape(n_head, 2, hd // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _written_shapes(shapes: list[LayerShape]) -> tuple[list[LayerShape], list[str]]:
    """The shapes declared in the file, with all-zero placeholders where llama.cpp needs them.

    Two limits of llama.cpp's deci graph (src/models/deci.cpp) are worked around with blocks whose
    weights are zero (so they add exactly nothing):
    * it reads the head size only if layer 0 has heads: layer 0 without attention gets one zero head;
    * a layer with ``feed_forward_length`` 0 drops its own attention output (``continue`` before the
      residual add), and in the last layer also skips the output-row selection: such a layer gets a
      zero MLP of PLACEHOLDER_FFN channels unless it has no attention and is not the last layer.
    """
    written, notes = [], []
    last = len(shapes) - 1
    for i, s in enumerate(shapes):
        heads, kv, ff = s.num_attention_heads, s.num_key_value_heads, s.intermediate_size
        if ff == 0 and (heads > 0 or i == last):
            ff = PLACEHOLDER_FFN
            notes.append(f"layer {i}: zero MLP of {PLACEHOLDER_FFN} channels stands for the removed MLP")
        if i == 0 and heads == 0:
            heads = kv = 1
            notes.append("layer 0: one zero attention head stands for the removed attention")
        written.append(LayerShape(heads, kv, ff))
    return written, notes


def _check_shapes(shapes: list[LayerShape]) -> None:
    for i, s in enumerate(shapes):
        heads, kv = s.num_attention_heads, s.num_key_value_heads
        if min(heads, kv, s.intermediate_size) < 0 or (heads == 0) != (kv == 0) or (kv and heads % kv):
            raise SaapError(
                f"layer {i}: {heads} query heads / {kv} KV heads cannot be exported (query heads must be a "
                "multiple of KV heads, and both zero or both non-zero)"
            )


def _rope_settings(config, hd: int) -> tuple[dict[str, Any], np.ndarray | None]:
    """RoPE scaling keys for the file and, for Llama-3-style scaling, the rope_freqs tensor."""
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = (scaling.get("rope_type") or scaling.get("type") or "default").lower()
    if kind == "default":
        return {}, None
    if kind == "linear":
        return {"type": "linear", "factor": float(scaling["factor"])}, None
    if kind == "llama3":
        # As convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors: per-frequency divisors.
        base = float(getattr(config, "rope_theta", 10000.0))
        freqs = 1.0 / (base ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
        factor = scaling.get("factor", 8.0)
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_context = scaling.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_context / low, old_context / high
        factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < high_wavelen:
                factors.append(1.0)
            elif wavelen > low_wavelen:
                factors.append(factor)
            else:
                smooth = (old_context / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        return {}, np.array(factors, dtype=np.float32)
    raise SaapError(f"RoPE scaling '{kind}' is not supported by the GGUF export (default, linear, llama3 are)")


# --------------------------------------------------------------------------------------- tokenizer


def _special_added(tokenizer, token_id: int) -> bool:
    added = tokenizer.added_tokens_decoder.get(token_id)
    return added is not None and added.special


def _looks_special(token: str) -> bool:
    # convert_hf_to_gguf.py's does_token_look_special: some models forget to flag control tokens.
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def _add_bpe_vocab(writer, tokenizer, tok_dir: Path, vocab_size: int):
    """GPT-2-style byte-level BPE, as convert_hf_to_gguf.py's get_vocab_base / _set_vocab_gpt2."""
    import gguf

    chkhsh = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    pre = KNOWN_PRE_TOKENIZERS.get(chkhsh)
    if pre is None:
        pre = _plain_byte_level(tok_dir)
    if pre is None:
        raise SaapError(
            f"unrecognised BPE pre-tokenizer (fingerprint {chkhsh[:16]}…): llama.cpp would split text "
            "differently from the Hugging Face tokenizer, so the GGUF export refuses it"
        )
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(reverse) >= vocab_size:
        raise SaapError(f"the tokenizer has token id {max(reverse)} but the model's vocab_size is {vocab_size}")
    added = tokenizer.get_added_vocab()
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif token in added:
            # llama.cpp matches added tokens on normalized text, as convert_hf_to_gguf.py does.
            if not tokenizer.added_tokens_decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if _special_added(tokenizer, i) or _looks_special(token):
                types.append(CONTROL)
            else:
                types.append(USER_DEFINED)
            tokens.append(token)
        else:
            tokens.append(token)
            types.append(NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise SaapError("the BPE tokenizer has no merges; llama.cpp cannot tokenize with it")
    return special


def _plain_byte_level(tok_dir: Path) -> str | None:
    """A bare ByteLevel pre-tokenizer with its default regex is llama.cpp's 'gpt-2' pre-tokenizer."""
    spec = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    pre, normalizer = spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if (
        normalizer in (None, {"type": "Sequence", "normalizers": []})
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
    ):
        if not pre.get("add_prefix_space", False):
            return "gpt-2"
    return None


def _add_spm_vocab(writer, tokenizer, tok_dir: Path, spec: dict, vocab_size: int):
    """SentencePiece-style BPE with byte fallback (LLaMA-1/2, TinyLlama) -> llama.cpp's ``llama`` model.

    Tokens and types come from gguf-py's LlamaHfVocab. Its scores are placeholders, but llama.cpp's
    SPM tokenizer merges the highest-scoring pair first, so scores are rebuilt from the merge ranks
    (the order SentencePiece's own scores impose; tokenizer.model is not needed).
    """
    import gguf

    vocab = gguf.LlamaHfVocab(tok_dir)
    rank: dict[str, int] = {}
    for r, merge in enumerate(spec["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    tokens, scores, types = [], [], []
    for text, _, toktype in vocab.all_tokens():
        tokens.append(text)
        piece = text.decode("utf-8", errors="replace")
        scores.append(-float(rank[piece]) if piece in rank and toktype == NORMAL else 0.0)
        types.append(int(toktype))
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(UNUSED)
    if len(tokens) > vocab_size:
        raise SaapError(f"the tokenizer has {len(tokens)} tokens but the model's vocab_size is {vocab_size}")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_spm_adds_prefix(spec))
    return gguf.SpecialVocab(tok_dir, n_vocab=vocab_size)


def _spm_adds_prefix(spec: dict) -> bool:
    """Whether the tokenizer prepends '▁' to the text (legacy Prepend normalizer or Metaspace)."""
    found = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    if '"Prepend"' in found:
        return True
    if '"Metaspace"' in found:
        return '"prepend_scheme": "never"' not in found and '"add_prefix_space": false' not in found
    return False


def _convert_vocab(writer, tokenizer, vocab_size: int):
    with tempfile.TemporaryDirectory(prefix="saap-tok-") as tmp:
        tok_dir = Path(tmp)
        tokenizer.save_pretrained(tok_dir)  # gguf-py's helpers read tokenizer.json / tokenizer_config.json
        spec = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
        model = spec.get("model", {})
        # Byte-level first: transformers' GGUF loader marks GPT-2-style vocabularies byte_fallback too.
        if model.get("type") == "BPE" and '"ByteLevel"' in json.dumps(spec.get("pre_tokenizer")):
            return _add_bpe_vocab(writer, tokenizer, tok_dir, vocab_size), "gpt2"
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            return _add_spm_vocab(writer, tokenizer, tok_dir, spec, vocab_size), "llama"
        raise SaapError(f"tokenizer model '{model.get('type')}' cannot be exported to GGUF (BPE is supported)")


def add_tokenizer(writer, tokenizer, vocab_size: int) -> dict[str, Any]:
    """Write the tokenizer of ``tokenizer`` (a Hugging Face fast tokenizer) into ``writer``."""
    if not getattr(tokenizer, "is_fast", False):
        raise SaapError("the GGUF export needs a fast (tokenizer.json) Hugging Face tokenizer")
    # gguf-py's SpecialVocab warns about post-processor shapes it only half parses; the ids and flags
    # it would get wrong are set from the tokenizer object below.
    vocab_log = logging.getLogger("gguf.vocab")
    level = vocab_log.level
    vocab_log.setLevel(logging.ERROR)
    try:
        special, kind = _convert_vocab(writer, tokenizer, vocab_size)
    finally:
        vocab_log.setLevel(level)
    # The tokenizer object is the authority on special ids and on what it adds around a text.
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            special.special_token_ids[role] = int(token_id)
    probe = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = (
        tokenizer.bos_token_id is not None and len(probe[0]) > len(probe[1]) and probe[0][0] == tokenizer.bos_token_id
    )
    add_eos = (
        tokenizer.eos_token_id is not None and len(probe[0]) > len(probe[1]) and probe[0][-1] == tokenizer.eos_token_id
    )
    special.add_special_token.update({"bos": add_bos, "eos": add_eos})
    special.add_to_gguf(writer, quiet=True)
    return {"model": kind, "add_bos": add_bos, "add_eos": add_eos, "special_ids": dict(special.special_token_ids)}


# ----------------------------------------------------------------------------------------- writing


def _cast(array: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """2-D weights in the file's type; 1-D tensors (norms, biases, rope_freqs) stay float32 as llama.cpp expects."""
    import gguf

    if array.ndim == 1 or quant == "f32":
        return array.astype(np.float32), None
    if quant == "f16":
        return array.astype(np.float16), None
    return gguf.quants.quantize(
        array.astype(np.float32), gguf.GGMLQuantizationType.BF16
    ), gguf.GGMLQuantizationType.BF16


def _norm_tensors(family: type[Family], block: str) -> list[tuple[str, str]]:
    """(HF module suffix, gguf MODEL_TENSOR name) of the norms that belong to a block of a layer."""
    if block == "attention":
        roles = [(family.pre_attention_norm, "ATTN_NORM"), (family.post_attention_norm, "ATTN_POST_NORM")]
        if family.qk_norm:
            roles += [("self_attn.q_norm", "ATTN_Q_NORM"), ("self_attn.k_norm", "ATTN_K_NORM")]
    else:
        roles = [(family.pre_mlp_norm, "FFN_NORM"), (family.post_mlp_norm, "FFN_POST_NORM")]
    return [(module, kind) for module, kind in roles if module]


def _gguf_tensors(
    config, tensors: dict[str, torch.Tensor], shapes: list[LayerShape], written: list[LayerShape], permute: bool
):
    """(gguf name, float32 array) pairs in llama.cpp's naming; q/k permuted where its RoPE is "normal"."""
    import gguf

    names, T = gguf.TENSOR_NAMES, gguf.MODEL_TENSOR
    hd, hidden = head_dim(config), config.hidden_size
    family = family_of(config)

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise SaapError(f"tensor '{name}' is missing from the model")
        array = tensors[name].detach().to(torch.float32).cpu().numpy()
        if array.shape != shape:
            raise SaapError(f"tensor '{name}' has shape {array.shape}, the config says {shape}")
        return array

    def optional(name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        return get(name, shape) if name in tensors else None

    def rope(array: np.ndarray) -> np.ndarray:
        return permute_rope(array, hd) if permute else array

    def norms(prefix: str, i: int, block: str):
        for module, kind in _norm_tensors(family, block):
            width = hd if module.endswith(("q_norm", "k_norm")) else hidden
            yield names[T[kind]].format(bid=i) + ".weight", family.gguf_norm(get(f"{prefix}{module}.weight", (width,)))

    vocab = config.vocab_size
    yield names[T.TOKEN_EMBD] + ".weight", get("model.embed_tokens.weight", (vocab, hidden))
    for i, (shape, out) in enumerate(zip(shapes, written, strict=True)):
        p = f"model.layers.{i}."
        q_width, kv_width = out.num_attention_heads * hd, out.num_key_value_heads * hd
        if out.num_attention_heads:
            if shape.num_attention_heads == 0:  # placeholder: zero attention adds nothing, whatever its norm
                layer_norms = [(names[T.ATTN_NORM].format(bid=i) + ".weight", np.ones(hidden, np.float32))]
                q = np.zeros((hd, hidden), np.float32)
                k = v = q
                o, biases = np.zeros((hidden, hd), np.float32), {}
            else:
                layer_norms = list(norms(p, i, "attention"))
                q = rope(get(p + "self_attn.q_proj.weight", (q_width, hidden)))
                k = rope(get(p + "self_attn.k_proj.weight", (kv_width, hidden)))
                v = get(p + "self_attn.v_proj.weight", (kv_width, hidden))
                o = get(p + "self_attn.o_proj.weight", (hidden, q_width))
                biases = {
                    T.ATTN_Q: optional(p + "self_attn.q_proj.bias", (q_width,)),
                    T.ATTN_K: optional(p + "self_attn.k_proj.bias", (kv_width,)),
                    T.ATTN_V: optional(p + "self_attn.v_proj.bias", (kv_width,)),
                    T.ATTN_OUT: optional(p + "self_attn.o_proj.bias", (hidden,)),
                }
                for kind in (T.ATTN_Q, T.ATTN_K):
                    if biases[kind] is not None:
                        biases[kind] = rope(biases[kind])
            yield from layer_norms
            yield names[T.ATTN_Q].format(bid=i) + ".weight", q
            yield names[T.ATTN_K].format(bid=i) + ".weight", k
            yield names[T.ATTN_V].format(bid=i) + ".weight", v
            yield names[T.ATTN_OUT].format(bid=i) + ".weight", o
            for kind, bias in biases.items():
                if bias is not None:
                    yield names[kind].format(bid=i) + ".bias", bias
        ff = out.intermediate_size
        if ff:
            if shape.intermediate_size == 0:  # placeholder: zero MLP adds nothing, whatever its norm
                layer_norms = [(names[T.FFN_NORM].format(bid=i) + ".weight", np.ones(hidden, np.float32))]
                gate = np.zeros((ff, hidden), np.float32)
                up = gate
                down, biases = np.zeros((hidden, ff), np.float32), {}
            else:
                layer_norms = list(norms(p, i, "mlp"))
                gate = get(p + "mlp.gate_proj.weight", (ff, hidden))
                up = get(p + "mlp.up_proj.weight", (ff, hidden))
                down = get(p + "mlp.down_proj.weight", (hidden, ff))
                biases = {
                    T.FFN_GATE: optional(p + "mlp.gate_proj.bias", (ff,)),
                    T.FFN_UP: optional(p + "mlp.up_proj.bias", (ff,)),
                    T.FFN_DOWN: optional(p + "mlp.down_proj.bias", (hidden,)),
                }
            yield from layer_norms
            yield names[T.FFN_GATE].format(bid=i) + ".weight", gate
            yield names[T.FFN_UP].format(bid=i) + ".weight", up
            yield names[T.FFN_DOWN].format(bid=i) + ".weight", down
            for kind, bias in biases.items():
                if bias is not None:
                    yield names[kind].format(bid=i) + ".bias", bias
    yield names[T.OUTPUT_NORM] + ".weight", family.gguf_norm(get("model.norm.weight", (hidden,)))
    if not config.tie_word_embeddings:  # tied: llama.cpp reuses token_embd
        yield names[T.OUTPUT] + ".weight", get("lm_head.weight", (vocab, hidden))


def _write_float_gguf(
    config,
    tensors: dict[str, torch.Tensor],
    tokenizer,
    path: Path,
    quant: str,
    metadata: dict[str, Any],
    progress: bool,
) -> dict[str, Any]:
    import gguf

    family = family_of(config)
    family.check_config(config)
    shapes = layer_shapes(config)
    _check_shapes(shapes)
    arch = family.gguf_architecture(config, shapes)
    per_layer = arch in PER_LAYER_ARCHS
    written, notes = _written_shapes(shapes) if per_layer else (shapes, [])
    permute = arch in NORMAL_ROPE_ARCHS
    hd = head_dim(config)
    if hd % 2:
        raise SaapError(f"head_dim {hd} is odd; RoPE needs an even head size")
    rope_keys, rope_freqs = _rope_settings(config, hd)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(str(metadata.get("name") or "saap model"))
    if family.license:  # the terms a derivative of the family's models carries (Gemma's)
        writer.add_license(family.license)
        writer.add_license_link(family.license_link)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(config.hidden_size)
    if not per_layer:
        writer.add_head_count(shapes[0].num_attention_heads)
        writer.add_head_count_kv(shapes[0].num_key_value_heads)
        writer.add_feed_forward_length(shapes[0].intermediate_size)
    else:
        writer.add_head_count([s.num_attention_heads for s in written])
        writer.add_head_count_kv([s.num_key_value_heads for s in written])
        writer.add_feed_forward_length([s.intermediate_size for s in written])
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", 10000.0)))
    if rope_keys:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_keys["factor"])
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    family.gguf_keys(writer, config)
    writer.add_vocab_size(config.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16}
    writer.add_file_type(file_type.get(quant, gguf.LlamaFileType.MOSTLY_F16))
    tok_info = add_tokenizer(writer, tokenizer, config.vocab_size)

    # Provenance: where the weights came from and how they were pruned.
    if metadata.get("source"):
        writer.add_string("saap.source", json.dumps(metadata["source"], sort_keys=True))
    if metadata.get("source_sha256"):
        writer.add_string("saap.source_weights_sha256", metadata["source_sha256"])
    if metadata.get("saap"):
        writer.add_string("saap.settings", json.dumps(metadata["saap"], sort_keys=True))
    writer.add_array("saap.layer_shapes", [json.dumps(s.as_dict()) for s in shapes])

    count = 0
    if rope_freqs is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_freqs)
        count += 1
    for name, array in _gguf_tensors(config, tensors, shapes, written, permute):
        data, raw_dtype = _cast(array, quant)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()
    return {"architecture": arch, "tensors": count, "placeholders": notes, "tokenizer": tok_info}


def _quantize(src: Path, dst: Path, quant: str, progress: bool) -> None:
    """llama.cpp's own quantizer (the code behind llama-quantize), through llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        raise SaapError(f"--quant {quant} needs llama-cpp-python (pip install llama-cpp-python)") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_QUANTS[quant][0])
    with _quiet_llama(not progress) as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SaapError(f"llama.cpp failed to quantize to {quant} (code {rc}){log.reason()}")


class _quiet_llama:
    """Keep llama.cpp's log (the quantizer's per-tensor lines, the loader's dump) off the terminal for the
    block, unless ``SAAP_VERBOSE`` is set (``saap -v``); ``quiet`` True hides it even then.

    llama-cpp-python prints llama.cpp's log to ``sys.stderr`` below its logger's level, but native code
    can write to fd 2 itself, which no Python setting reaches. So fd 2 points into a temporary file for
    the block, the logger lets everything through into it, and ``lines`` / ``reason()`` keep it for the
    message of a failed call. No Python flush is needed around the swap: llama-cpp-python flushes each
    line it prints, and Python's stderr is line-buffered.
    """

    def __init__(self, quiet: bool = False):
        self.quiet = quiet or not verbose()
        self.lines: list[str] = []

    def __enter__(self):
        self.logger = logging.getLogger("llama-cpp-python")
        self.level = self.logger.level
        if self.quiet:
            self.logger.setLevel(logging.NOTSET)  # all of it into the file: a failure's reason is among it
            self.captured = tempfile.TemporaryFile()
            self.saved_fd = os.dup(2)
            os.dup2(self.captured.fileno(), 2)
        return self

    def __exit__(self, *exc):
        if self.quiet:
            os.dup2(self.saved_fd, 2)
            os.close(self.saved_fd)
            self.captured.seek(0)
            text = self.captured.read().decode("utf-8", errors="replace")
            self.captured.close()
            self.lines = [line.strip() for line in text.splitlines() if line.strip()]
        self.logger.setLevel(self.level)

    def reason(self) -> str:
        """``": <the last error line>"`` of what the block printed (else its last line), or ``""``."""
        errors = [line for line in self.lines if "error" in line.lower() or "failed" in line.lower()]
        last = (errors or self.lines)[-1:]
        return f": {last[0]}" if last else ""


def quant_fallbacks(path: str | Path, quant: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Matrices that got another (larger) type than ``quant``'s mix because their rows do not fit.

    llama.cpp quantizes a row in blocks (32 values for Q8_0/Q4_0, 256 for K-quants); a matrix whose
    row length (ne[0]) is not a multiple falls back to a 32-block type (Q4_K -> Q5_0, Q5_K -> Q5_1,
    Q6_K -> Q8_0) or to F16. Any matrix whose type is outside the mix is listed; 1-D tensors (norms)
    are always float32 and are not counted. Also returns the count of tensors per type.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    types = Counter(t.tensor_type.name for t in reader.tensors)
    if quant not in LLAMA_QUANTS:
        return [], dict(types)
    mix = LLAMA_QUANTS[quant][1]
    fallbacks = []
    for t in reader.tensors:
        ne = [int(n) for n in t.shape]
        if len([n for n in ne if n > 1]) < 2 or t.tensor_type.name in mix:
            continue
        fallbacks.append({"tensor": t.name, "row_length": ne[0], "type": t.tensor_type.name, "requested": mix[0]})
    return fallbacks, dict(types)


def _prepare_output(out: str | Path, quant: str, overwrite: bool) -> Path:
    if quant not in GGUF_QUANTS:
        raise SaapError(f"unknown GGUF quantization '{quant}' (choose from {', '.join(GGUF_QUANTS)})")
    out = Path(out).expanduser()
    if out.is_dir():
        raise SaapError(f"output '{out}' is a directory; give a .gguf file name")
    if out.exists() and not overwrite:
        raise SaapError(f"output '{out}' already exists (pass --overwrite to replace it)")
    if not out.parent.is_dir():
        raise SaapError(f"output directory '{out.parent}' does not exist")
    return out


def write_gguf(
    config,
    tensors: dict[str, torch.Tensor],
    tokenizer,
    out: str | Path,
    quant: str = DEFAULT_QUANT,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a GGUF from a config of a supported family (with optional ``*_per_layer`` shapes, 0 allowed)
    and HF-named tensors.

    The file appears at ``out`` only when complete (temporary sibling, renamed at the end).
    """
    out = _prepare_output(out, quant, overwrite)
    metadata = metadata or {}
    start = time.perf_counter()
    with atomic_file(out, suffix=".gguf") as tmp:
        float_tmp = tmp.with_name(tmp.name + ".f32.gguf")
        try:
            if quant in LLAMA_QUANTS:
                # Quantize from float32 so the weights are rounded once, by llama.cpp.
                info = _write_float_gguf(config, tensors, tokenizer, float_tmp, "f32", metadata, progress)
                _quantize(float_tmp, tmp, quant, progress)
            else:
                info = _write_float_gguf(config, tensors, tokenizer, tmp, quant, metadata, progress)
            fallbacks, types = quant_fallbacks(tmp, quant)
        finally:
            float_tmp.unlink(missing_ok=True)
    return {
        "out": str(out),
        "architecture": info["architecture"],
        "quant": quant,
        "size_bytes": out.stat().st_size,
        "seconds": round(time.perf_counter() - start, 2),
        "fallbacks": fallbacks,
        "tensor_types": types,
        "tensors": info["tensors"],
        "placeholders": info["placeholders"],
        "tokenizer": info["tokenizer"],
        "source_sha256": metadata.get("source_sha256"),
    }


def export_gguf(
    model: str | Path, out: str | Path, quant: str = DEFAULT_QUANT, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Export anything ``saap.runtime.models.load_model`` accepts (checkpoint dir, alias, .gguf, HF dir) to GGUF."""
    from saap.runtime.models import load_model

    _prepare_output(out, quant, overwrite)  # fail on a bad output before the (slow) model load
    loaded = load_model(str(model))
    source = loaded.source
    saap = {k: v for k, v in (loaded.metadata or {}).items() if k != "files"} or None
    metadata = {
        "name": Path(str(source.get("name") or model)).name,
        "source": source,
        "source_sha256": source.get("sha256"),
        "saap": saap,
    }
    state = loaded.model.state_dict()
    return write_gguf(loaded.model.config, state, loaded.tokenizer, out, quant, metadata, overwrite, progress)

"""A fused ONNX decoder graph written op by op, the way onnxruntime-genai's model builder writes it.

``export/onnx.py`` traces the model (unfused attention, a Concat-grown KV cache, RoPE and repeat_kv as
plain ops). This module writes instead the graph ONNX Runtime's LLM path is tuned for, one layer at a
time with that layer's own head counts and widths (``saap.runtime.surgery.layer_shapes``):

    input_ids ─ Gather(embedding) [─ Mul(embedding scale)] ─┐
    per layer, for each block it still has (a block pruned to 0 is simply absent):
      attention: [Skip]SimplifiedLayerNormalization ─ MatMul(q|k|v packed, + bias) [─ Split, q/k norm]
                 ─ GroupQueryAttention (RoPE inside: do_rotary=1, cos/sin caches; KV cache in/out)
                 ─ MatMul(o_proj) [─ SimplifiedLayerNormalization(post-norm)]
      MLP:       SkipSimplifiedLayerNormalization ─ MatMul(gate), MatMul(up) ─ act(gate) * up
                 ─ MatMul(down) [─ SimplifiedLayerNormalization(post-norm)]
    SkipSimplifiedLayerNormalization(final norm) ─ MatMul(lm_head) ─ logits

Each norm after the first is a ``SkipSimplifiedLayerNormalization`` that also adds the previous block's
output into the residual stream (its 4th output is the new residual). ``seqlens_k`` (int32,
``ReduceSum(attention_mask, 1) - 1``) and ``total_sequence_length`` (int32 scalar,
``Shape(attention_mask)[1]``) are computed once and read by every GroupQueryAttention.

What differs between families is read from the family adapter (``runtime.families``), never from its
name: the norm modules by role (a post-norm, Gemma's sandwich, normalises a block's output before the
next Skip norm adds it to the residual) and ``norm_offset`` (Gemma: 1 + weight, folded into every
stored norm weight, the q/k and final norms included); ``qk_norm`` (Qwen3, Gemma 3: q and k split off
the packed projection and RMS-normalised per head, [B, S, heads, head_dim] over head_dim, then given to
GroupQueryAttention unpacked; RoPE stays inside it); ``activation`` (silu: Sigmoid * x; gelu_tanh:
com.microsoft FastGelu); ``embedding_scale`` (a Mul after the lookup, so a tied or quantized table
stays the lm_head's as it is); ``sliding_window`` per layer (GroupQueryAttention's
``local_window_size``, ``local_window_size``'s docstring has the measured convention); ``rotary`` per
layer (one cos/sin pair per distinct rotary module: Gemma 3's sliding layers have their own RoPE base).
The attention scale is the module's own ``scaling`` (Gemma: query_pre_attn_scalar ** -0.5), q/k/v
biases (Qwen2) ride on the packed projection.

Interface (the names onnxruntime-genai's config points to): inputs ``input_ids`` [batch, seq] int64,
``attention_mask`` [batch, total] int64, ``past_key_values.{j}.key/value`` [batch, kv_heads_j,
past_seq, head_dim] float32; outputs ``logits`` [batch, seq, vocab] float32 and
``present.{j}.key/value``. No ``position_ids``: GroupQueryAttention derives positions from
``seqlens_k``. **Cache numbering:** ``j`` counts the layers that still have attention, in order
(``j`` = 0, 1, ... with no gaps), so a layer whose attention was pruned away has no cache at all and
the numbers stay contiguous for any reader (saap's ONNX engine, onnxruntime-genai, which reads each
cache's head count from the graph inputs). The graph's metadata ``saap.kv_layers`` lists, for each
``j``, the decoder layer it belongs to; ``genai_config.json`` declares ``num_hidden_layers`` = the
number of caches.

The graph supports past and present sharing one buffer pre-allocated at ``max_length``
(``past_present_share_buffer: true`` in genai_config.json, as onnxruntime-genai runs its own GQA
graphs), and equally a growing cache (past of length 0 on the first call, as saap's engine feeds it).

Precisions: ``fp32`` (float32 MatMuls); ``int8`` / ``int4`` (weight-only blocks of 32 onto
``MatMulNBits``). Default layout ``offsets``: the scheme of ``export/onnx.py`` (asymmetric min/max
blocks, float per-block offsets added back as ``blocksums(x) @ offsets``, 4-bit kernel with float32
activations, 8 bits as two 4-bit planes; int4 keeps down_proj at 8 bits unless that matrix already
sits exactly on the 4-bit grid, as every projection of the unpruned Q4_1 SmolLM2 does). Weights on the
grid are stored exactly (dense SmolLM2: 100 % top-1 agreement with fp32 at int8 and int4). Layout
``folded``: the same blocks with the offsets moved into the MatMulNBits itself, as extra weight rows over
the block sums (export.onnx.fold_offsets; 3 base-16 digits per offset, 99.9 % agreement): 2 extra nodes
per distinct input instead of 4 per projection, but measured no faster on an AVX2 EPYC, where the
4-bit kernel itself is the cost (benchmarks/results/onnx-fused-smollm2-135m.md). Layout
``zero_points``: plain MatMulNBits with integer (uint4 / uint8) zero points and a chosen
``accuracy_level`` (default 4, int8 activations) - what onnxruntime's own quantizer writes; fast but
measured at 96 % (8 bits) / 73 % (4 bits) agreement on SmolLM2, so only for comparison. int8
activations (accuracy_level 4) in the ``offsets`` layout cost ~3-4 points of agreement as well, hence
accuracy_level 0 there by default (``benchmarks/results/onnx-fused-smollm2-135m.md``); ``saap export onnx
--accuracy-level 4`` chooses them, for CPUs whose float 4-bit kernel is slow.
Embedding and lm_head: the tied table stays one initializer - in fp32 it is
stored once as [hidden, vocab] (read by the lm_head MatMul directly, and by a Gather along axis 1 for
the lookup), quantized it is onnx_quant.py's symmetric 8-bit table shared by GatherBlockQuantized
and MatMulNBits, with the top-8 logits recomputed in float32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from saap.export.onnx_quant import (
    BLOCK,
    EXTERNAL_DATA_FILE,
    EXTERNAL_DATA_THRESHOLD,
    MS_DOMAIN,
    OPSET,
    SCHEMES,
    GraphEditor,
    QuantizedTable,
    blocksum_matrix,
    fold_offsets,
    nibble_planes,
    pack_nibbles,
    quantize_blocks,
)
from saap.runtime.families import family_of
from saap.runtime.onnx_engine import MODEL_FILE
from saap.runtime.surgery import has_attention, has_mlp, head_dim, layer_shapes

PRECISIONS = ("fp32", "int8", "int4")
LAYOUTS = ("offsets", "folded", "zero_points")


def _float(tensor) -> np.ndarray:
    return tensor.detach().to("cpu").float().numpy()


class _Graph:
    """Nodes, initializers and value infos being written; names are unique by construction."""

    def __init__(self):
        self.nodes: list = []
        self.initializers: list = []
        self.names: set[str] = set()
        self.shared: dict[str, str] = {}

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        if name in self.names:
            raise ValueError(f"duplicate initializer {name}")
        self.names.add(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        """A small shared constant initializer."""
        array = np.asarray(values, dtype=dtype)
        key = f"/const/{array.dtype}/{array.shape}/{array.tolist()}"
        if key not in self.shared:
            self.shared[key] = self.init(f"const_{len(self.shared)}", array)
        return self.shared[key]

    def node(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "", **attrs):
        from onnx import helper

        outs = [f"{name}/output_{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    # An add-in for onnx_quant.QuantizedTable, which writes through an editor.
    def add_initializer(self, array: np.ndarray, name: str) -> str:
        return self.init(name, array)

    @staticmethod
    def nbits_node(name, x, weight, scales, out, k: int, n: int, bits: int, accuracy_level: int):
        return GraphEditor.nbits_node(name, x, weight, scales, out, k, n, bits, accuracy_level)


# --- linear layers ----------------------------------------------------------------------------------


def _on_grid(weight: np.ndarray, bits: int) -> bool:
    """Whether min/max blocks of ``bits`` reproduce ``weight`` [K, N] exactly (up to float32 rounding):
    true for a projection of the embedded Q4_1 SmolLM2 that pruning left whole, so int4 keeps such a
    down_proj at 4 bits instead of the 8 it needs once pruning has mixed its blocks."""
    q, scale, low = quantize_blocks(weight, bits, symmetric=False)
    rebuilt = q * scale[..., None] + low[..., None]
    blocks = weight.T.reshape(rebuilt.shape)
    # off the grid a weight is up to scale / 2 away; float32 rounding leaves ~1e-7 of |w|
    return bool((np.abs(rebuilt - blocks).max(-1) <= 1e-3 * scale + 1e-6 * np.abs(blocks).max(-1)).all())


class _Linears:
    """Writes ``x @ weight (+ bias)`` at the requested precision."""

    def __init__(self, graph: _Graph, precision: str, layout: str, accuracy_level):
        self.g, self.precision, self.layout = graph, precision, layout
        self.accuracy_level = accuracy_level
        self.counts: dict[str, int] = {}
        self.projection = ""

    def level(self, default: int) -> int:
        """accuracy_level for the current projection: an int for all, or {projection: level, "default": level}."""
        level = self.accuracy_level
        if isinstance(level, dict):
            level = level.get(self.projection, level.get("default"))
        return default if level is None else int(level)

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def __call__(self, x: str, weight: np.ndarray, bias: np.ndarray | None, name: str, projection: str) -> str:
        """``weight`` is [K, N] (input, output features)."""
        k, n = weight.shape
        if self.precision == "fp32" or k % BLOCK:
            self._count("float32" if self.precision == "fp32" else "float32 (K not a multiple of 32)")
            out = self.g.node("MatMul", [x, self.g.init(f"{name}.weight", weight.astype(np.float32))], f"{name}/MatMul")
        else:
            scheme = SCHEMES[self.precision]
            bits, label = scheme.get(projection, scheme["default"]), self.layout
            if bits > scheme["default"] and self.layout != "zero_points" and _on_grid(weight, scheme["default"]):
                # already on the coarser grid (an unpruned Q4_1 projection): storing it there loses nothing
                bits, label = scheme["default"], f"{self.layout}, {projection} kept on its grid"
            self.projection = projection
            if self.layout == "folded":
                out = self._folded(x, weight, bits, name)
            elif self.layout == "offsets":
                out = self._offsets(x, weight, bits, name)
            else:
                out = self._zero_points(x, weight, bits, name)
            self._count(f"int{bits} {label}")
        if bias is not None:
            out = self.g.node("Add", [out, self.g.init(f"{name}.bias", bias.astype(np.float32))], f"{name}/Add")
        return out

    def _offsets(self, x: str, weight: np.ndarray, bits: int, name: str) -> str:
        k, n = weight.shape
        packed, scales, offsets, planes = nibble_planes(weight, bits)
        g = self.g
        key = f"{x}/blocksums"
        if key not in g.shared:
            blocks = g.node("Reshape", [x, g.const([0, 0, k // BLOCK, BLOCK])], f"{x}/blocks/Reshape")
            g.shared[key] = g.node("ReduceSum", [blocks, g.const([-1])], f"{x}/blocksums/ReduceSum", keepdims=0)
        a = x
        if planes > 1:
            key_x = f"{x}/x{planes}"
            if key_x not in g.shared:
                g.shared[key_x] = g.node("Concat", [x] * planes, f"{x}/x{planes}/Concat", axis=-1)
            a = g.shared[key_x]
        main = self._nbits(name, a, packed, scales, k * planes, n, self.level(0))
        offset = g.node("MatMul", [g.shared[key], g.init(f"{name}.offsets", offsets)], f"{name}/Offset/MatMul")
        return g.node("Add", [main, offset], f"{name}/Offset/Add")

    def _nbits(self, base: str, a: str, packed: np.ndarray, scales: np.ndarray, k: int, n: int, level: int = 0) -> str:
        """``a @ W`` as one 4-bit MatMulNBits (implicit zero point 8) on the initializers ``{base}.qweight`` /
        ``{base}.scales``; returns its output."""
        g = self.g
        out = f"{base}/MatMulNBits/output_0"
        qweight, qscales = g.init(f"{base}.qweight", packed), g.init(f"{base}.scales", scales)
        g.nodes.append(g.nbits_node(f"{base}/MatMulNBits", a, qweight, qscales, out, k, n, 4, level))
        return out

    def _folded(self, x: str, weight: np.ndarray, bits: int, name: str) -> str:
        """The ``offsets`` scheme in one MatMulNBits: the block sums ride along as extra input columns
        (export.onnx.fold_offsets), which replaces a MatMul and an Add per projection."""
        k, n = weight.shape
        q, scales, planes = fold_offsets(weight, bits)
        a = self._with_blocksums(x, k, planes)
        return self._nbits(name, a, pack_nibbles(q), scales, q.shape[1] * BLOCK, n, self.level(0))

    def _with_blocksums(self, x: str, k: int, planes: int) -> str:
        """``[x] * planes + blocksum_matrix(k)(x)``, shared by the projections that read ``x``."""
        g = self.g
        sums = f"{x}/offset_inputs"
        if sums not in g.shared:
            q, scales = blocksum_matrix(k)
            g.shared[sums] = self._nbits(f"{x}.blocksums", x, pack_nibbles(q), scales, k, q.shape[0])
        key = f"{x}/folded{planes}"
        if key not in g.shared:
            g.shared[key] = g.node("Concat", [x] * planes + [g.shared[sums]], f"{x}/folded{planes}/Concat", axis=-1)
        return g.shared[key]

    def _zero_points(self, x: str, weight: np.ndarray, bits: int, name: str) -> str:
        k, n = weight.shape
        levels = 2**bits - 1
        # min/max blocks widened to include 0, as onnxruntime's quantizer does: (q - zero) * scale
        blocks = weight.T.reshape(n, k // BLOCK, BLOCK).astype(np.float64)
        low, high = np.minimum(blocks.min(-1), 0.0), np.maximum(blocks.max(-1), 0.0)
        scale = np.where(high > low, (high - low) / levels, 1.0)
        zero = np.clip(np.rint(-low / scale), 0, levels)
        q = np.clip(np.rint(blocks / scale[..., None]) + zero[..., None], 0, levels).astype(np.uint8)
        zero = zero.astype(np.uint8)
        if bits == 4:
            q = pack_nibbles(q)
            if zero.shape[1] % 2:
                zero = np.concatenate([zero, np.zeros((n, 1), np.uint8)], axis=1)
            zero = zero[:, 0::2] | (zero[:, 1::2] << 4)
        g = self.g
        level = self.level(4)
        attrs = {"accuracy_level": level} if level else {}
        return g.node(
            "MatMulNBits",
            [
                x,
                g.init(f"{name}.qweight", q),
                g.init(f"{name}.scales", scale.astype(np.float32).reshape(-1)),
                g.init(f"{name}.qzeros", zero.reshape(-1)),
            ],
            f"{name}/MatMulNBits",
            domain=MS_DOMAIN,
            K=k,
            N=n,
            bits=bits,
            block_size=BLOCK,
            **attrs,
        )


# --- the graph --------------------------------------------------------------------------------------


def rotary_caches(model, length: int, rotary=None) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin caches [length, head_dim / 2] from a rotary embedding of the model (default its
    ``rotary_emb``; rope scaling and attention scaling included), as GroupQueryAttention reads them for
    non-interleaved RoPE."""
    import torch

    rotary = model.model.rotary_emb if rotary is None else rotary
    hd = head_dim(model.config)
    with torch.no_grad():
        dummy = torch.zeros(1, dtype=torch.float32)
        cos, sin = rotary(dummy, torch.arange(length, dtype=torch.int64)[None])
    cos, sin = _float(cos[0]), _float(sin[0])
    if cos.shape[-1] != hd:
        raise ValueError(f"rotary embedding has width {cos.shape[-1]}, expected head_dim {hd} (partial RoPE?)")
    return cos[:, : hd // 2], sin[:, : hd // 2]


def kv_layers(model) -> list[int]:
    """Decoder layers that keep an attention block (and hence a KV cache), in cache order."""
    return [i for i, layer in enumerate(family_of(model).layers(model)) if has_attention(layer)]


def local_window_size(window: int | None) -> int:
    """GroupQueryAttention's ``local_window_size`` for a family's ``sliding_window`` (None: -1, full
    attention). Both count the current token: HF's window W keeps it and the W - 1 tokens before it, and
    so does ORT's kernel at ``local_window_size`` = W (measured on a one-layer Gemma 3 with W = 8, prefill
    and decode: a token 7 back changes the output, one 8 back does not; W - 1 drops the 7th), which is
    also the value onnxruntime-genai's model builder writes."""
    return -1 if window is None else int(window)


def _gamma(g: _Graph, weight, name: str, offset: float) -> str:
    # Gemma's RMSNorm multiplies by (1 + weight): the offset is folded into the stored weight.
    return g.init(f"{name}.weight", _float(weight) + np.float32(offset))


def _rms_norm(g: _Graph, x: str, gamma: str, name: str, eps: float) -> str:
    return g.node(
        "SimplifiedLayerNormalization", [x, gamma], f"/{name}/SimplifiedLayerNorm", axis=-1, epsilon=eps, stash_type=1
    )


class _Stream:
    """The residual stream: ``residual`` plus the last block's output ``pending``, which the next norm
    adds in (a SkipSimplifiedLayerNormalization, whose 4th output is the sum: the new residual)."""

    def __init__(self, g: _Graph, residual: str, eps: float, offset: float):
        self.g, self.residual, self.pending = g, residual, None
        self.eps, self.offset = eps, offset

    def rms(self, x: str, weight, name: str) -> str:
        """A plain RMSNorm of ``x`` over its last axis, with the family's weight offset."""
        return _rms_norm(self.g, x, _gamma(self.g, weight, name, self.offset), name, self.eps)

    def norm(self, weight, name: str, last: bool = False) -> str:
        """The normalised stream, the input of the next block (``last``: of the lm_head)."""
        if self.pending is None:
            return self.rms(self.residual, weight, name)
        node = f"/{name}/SkipSimplifiedLayerNorm"
        outs = [f"{node}/output_0"] + ([] if last else ["", "", f"{node}/output_3"])
        gamma = _gamma(self.g, weight, name, self.offset)
        inputs = [self.residual, self.pending, gamma]
        self.g.node("SkipSimplifiedLayerNormalization", inputs, node, outs, MS_DOMAIN, epsilon=self.eps)
        if not last:
            self.residual, self.pending = outs[3], None
        return outs[0]

    def add(self, block_out: str, post_norm, name: str) -> None:
        """A block's output joins the stream; a post-norm (Gemma's sandwich) normalises it first, so the
        next Skip norm adds the normalised output, as HF's residual add does."""
        self.pending = block_out if post_norm is None else self.rms(block_out, post_norm.weight, name)


class _AttentionInputs:
    """What every GroupQueryAttention reads besides its q/k/v: ``seqlens_k`` (int32,
    ``ReduceSum(attention_mask, 1) - 1``), ``total_sequence_length`` (int32 scalar,
    ``Shape(attention_mask)[1]``) and, per decoder layer, the cos/sin caches of its rotary embedding
    (one pair per distinct module: Gemma 3's sliding layers have their own RoPE base)."""

    def __init__(self, g: _Graph, model, kv: list[int], length: int):
        from onnx import TensorProto

        mask = "attention_mask"
        total = g.node("ReduceSum", [mask, g.const([1])], "/model/attn_mask/ReduceSum", keepdims=0)
        seqlens = g.node("Sub", [total, g.const(1)], "/model/attn_mask/Sub")
        self.seqlens_k = g.node("Cast", [seqlens], "/model/attn_mask/Sub/Cast", to=TensorProto.INT32)
        shape = g.node("Shape", [mask], "/model/attn_mask/Shape")
        width = g.node("Gather", [shape, g.const(1)], "/model/attn_mask/Gather", axis=0)
        self.total_seq = g.node("Cast", [width], "/model/attn_mask/Gather/Cast", to=TensorProto.INT32)
        family = family_of(model)
        by_module: dict[int, tuple[str, str]] = {}
        self.rotary: dict[int, tuple[str, str]] = {}
        for i in kv:
            module = family.rotary(model, i)
            if id(module) not in by_module:
                suffix = f"_{len(by_module)}" if by_module else ""  # the first pair keeps the plain names
                cos, sin = rotary_caches(model, length, module)
                by_module[id(module)] = (g.init(f"cos_cache{suffix}", cos), g.init(f"sin_cache{suffix}", sin))
            self.rotary[i] = by_module[id(module)]


def _bias(module) -> np.ndarray | None:
    return None if module.bias is None else _float(module.bias)


def _packed_bias(projections) -> np.ndarray | None:
    """The q|k|v bias (Qwen2's), zeros for a projection without one; None where none has one."""
    if all(p.bias is None for p in projections):
        return None
    parts = [np.zeros(p.out_features, np.float32) if p.bias is None else _float(p.bias) for p in projections]
    return np.concatenate(parts)


def _silu(g: _Graph, gate: str, base: str) -> str:
    sig = g.node("Sigmoid", [gate], f"/{base}/mlp/act_fn/Sigmoid")
    return g.node("Mul", [gate, sig], f"/{base}/mlp/act_fn/Mul")


def _gelu_tanh(g: _Graph, gate: str, base: str) -> str:
    # FastGelu is the tanh approximation, HF's gelu_pytorch_tanh (Gemma's GeGLU)
    return g.node("FastGelu", [gate], f"/{base}/mlp/act_fn/FastGelu", domain=MS_DOMAIN)


ACTIVATIONS = {"silu": _silu, "gelu_tanh": _gelu_tanh}  # by Family.activation's names


class _Blocks:
    """Writes one decoder layer's attention and MLP blocks, as the family describes them."""

    def __init__(self, g: _Graph, linear: _Linears, model, side: _AttentionInputs | None, stream: _Stream):
        self.g, self.linear, self.side, self.stream = g, linear, side, stream
        self.config, self.family = model.config, family_of(model)
        self.hd = head_dim(model.config)

    def attention(self, x: str, attn, i: int, j: int, shape) -> str:
        """GroupQueryAttention of layer ``i`` (KV cache ``j``) on ``x``; returns the o_proj output."""
        base = f"model.layers.{i}"
        projections = [attn.q_proj, attn.k_proj, attn.v_proj]
        qkv_w = np.concatenate([_float(p.weight) for p in projections])
        qkv = self.linear(x, qkv_w.T, _packed_bias(projections), f"{base}.attn.qkv_proj", "qkv_proj")
        query = [qkv, "", ""]  # packed; unpacked where q and k are normalised first
        if self.family.qk_norm:
            query = self._qk_norm(qkv, attn, base, [p.out_features for p in projections])
        cos, sin = self.side.rotary[i]
        node = f"/{base}/attn/GroupQueryAttention"
        out = f"{node}/output_0"
        self.g.node(
            "GroupQueryAttention",
            [*query, f"past_key_values.{j}.key", f"past_key_values.{j}.value", self.side.seqlens_k,
             self.side.total_seq, cos, sin],
            node,
            [out, f"present.{j}.key", f"present.{j}.value"],
            MS_DOMAIN,
            num_heads=shape.num_attention_heads,
            kv_num_heads=shape.num_key_value_heads,
            scale=float(getattr(attn, "scaling", self.hd**-0.5)),  # Gemma: query_pre_attn_scalar ** -0.5
            local_window_size=local_window_size(self.family.sliding_window(self.config, i)),
            do_rotary=1,
            rotary_interleaved=0,
        )  # fmt: skip
        return self.linear(out, _float(attn.o_proj.weight).T, _bias(attn.o_proj), f"{base}.attn.o_proj", "o_proj")

    def _qk_norm(self, qkv: str, attn, base: str, widths: list[int]) -> list[str]:
        """q, k, v apart, q and k RMS-normalised per head (Qwen3, Gemma 3): [B, S, heads * hd] is viewed
        as [B, S, heads, hd] and normalised over hd. GroupQueryAttention still applies RoPE after."""
        g = self.g
        q, k, v = g.node("Split", [qkv, g.const(widths)], f"/{base}/attn/qkv/Split", 3, axis=-1)
        normed = []
        for x, name in ((q, "q_norm"), (k, "k_norm")):
            heads = g.node("Reshape", [x, g.const([0, 0, -1, self.hd])], f"/{base}/attn/{name}/Reshape")
            out = self.stream.rms(heads, getattr(attn, name).weight, f"{base}.self_attn.{name}")
            normed.append(g.node("Reshape", [out, g.const([0, 0, -1])], f"/{base}/attn/{name}/Reshape_1"))
        return [*normed, v]

    def mlp(self, x: str, mlp, i: int) -> str:
        """gate activation * up, then down_proj; returns the down_proj output."""
        base, linear = f"model.layers.{i}", self.linear
        gate = linear(x, _float(mlp.gate_proj.weight).T, _bias(mlp.gate_proj), f"{base}.mlp.gate_proj", "gate_proj")
        up = linear(x, _float(mlp.up_proj.weight).T, _bias(mlp.up_proj), f"{base}.mlp.up_proj", "up_proj")
        act = ACTIVATIONS[self.family.activation(self.config)](self.g, gate, base)
        prod = self.g.node("Mul", [act, up], f"/{base}/mlp/Mul")
        return linear(prod, _float(mlp.down_proj.weight).T, _bias(mlp.down_proj), f"{base}.mlp.down_proj", "down_proj")


def _io(model, kv: list[int]) -> tuple[list, list]:
    """The graph's inputs and outputs (see the module docstring)."""
    from onnx import TensorProto, helper

    shapes, hd, vocab = layer_shapes(model.config), head_dim(model.config), model.config.vocab_size
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab])]
    for j, i in enumerate(kv):
        heads = shapes[i].num_key_value_heads
        for kind in ("key", "value"):
            past = ["batch_size", heads, "past_sequence_length", hd]
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{j}.{kind}", TensorProto.FLOAT, past))
            present = ["batch_size", heads, "total_sequence_length", hd]
            outputs.append(helper.make_tensor_value_info(f"present.{j}.{kind}", TensorProto.FLOAT, present))
    return inputs, outputs


def _embed(g: _Graph, model, quantized: bool) -> tuple[str, QuantizedTable | None, str | None]:
    """The embedding lookup's output, the quantized table (if any) and the fp32 tied [hidden, vocab] table
    (if any), both for the lm_head to reuse."""
    config, family = model.config, family_of(model)
    embedding = _float(family.embedding(model).weight)  # [vocab, hidden]
    table = shared = None
    if quantized and config.hidden_size % BLOCK == 0:
        table = QuantizedTable(g, embedding, "model.embed_tokens.weight_Q8")
        g.nodes.extend(table.prologue)
        g.nodes.extend(table.lookup("input_ids", "/model/embed_tokens/output_0", "embed"))
        out = "/model/embed_tokens/output_0"
    elif config.tie_word_embeddings:
        # One [hidden, vocab] copy: the lm_head MatMul reads it as it is, the lookup gathers its columns.
        shared = g.init("model.embed_tokens.weight_T", np.ascontiguousarray(embedding.T))
        columns = g.node("Gather", [shared, "input_ids"], "/model/embed_tokens/Gather", axis=1)
        out = g.node("Transpose", [columns], "/model/embed_tokens/Transpose", perm=[1, 2, 0])
    else:
        weight = g.init("model.embed_tokens.weight", embedding)
        out = g.node("Gather", [weight, "input_ids"], "/model/embed_tokens/Gather")
    scale = family.embedding_scale(config)
    if scale != 1.0:
        # Gemma scales the looked-up rows, not the table, which may also be the (tied) lm_head
        out = g.node("Mul", [out, g.const(scale, np.float32)], "/model/embed_tokens/Mul")
    return out, table, shared


def _lm_head(g: _Graph, model, x: str, quantized: bool, table: QuantizedTable | None, shared: str | None) -> None:
    """``logits`` from the final norm's output ``x``."""
    config, lm_head = model.config, model.lm_head
    lm_bias = getattr(lm_head, "bias", None)
    out = "logits" if lm_bias is None else "/lm_head/logits_nobias"
    if table is not None and config.tie_word_embeddings:
        g.nodes.extend(table.logits(x, out, "/lm_head/MatMulNBits"))
    elif quantized and config.hidden_size % BLOCK == 0:
        head = QuantizedTable(g, _float(lm_head.weight), "lm_head.weight_Q8")
        g.nodes.extend(head.prologue)
        g.nodes.extend(head.logits(x, out, "/lm_head/MatMulNBits"))
    elif shared is not None:
        g.node("MatMul", [x, shared], "/lm_head/MatMul", [out])
    else:
        g.node("MatMul", [x, g.init("lm_head.weight", _float(lm_head.weight).T)], "/lm_head/MatMul", [out])
    if lm_bias is not None:
        g.node("Add", [out, g.init("lm_head.bias", _float(lm_bias))], "/lm_head/Add", ["logits"])


def build_fused_graph(
    model,
    precision: str = "fp32",
    *,
    layout: str = "offsets",
    accuracy_level: int | dict[str, int] | None = None,
    max_positions: int | None = None,
):
    """The fused decoder graph of ``model`` (any family of ``runtime.families``, per-layer shapes
    allowed) as a ModelProto.

    ``layout`` / ``accuracy_level`` choose the MatMulNBits form for int8 / int4 (see the module
    docstring); ``accuracy_level`` is one level for every projection or a dict by projection name
    (``qkv_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``, ``default``); ``max_positions``
    the length of the rotary caches (default: max_position_embeddings).
    """
    from onnx import helper

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}' (choose from {', '.join(LAYOUTS)})")
    config, family = model.config, family_of(model)
    family.check_config(config)
    family.activation(config)  # refuses an activation the graph has no op for, before any work
    quantized = precision != "fp32"
    g = _Graph()
    linear = _Linears(g, precision, layout, accuracy_level)
    kv = kv_layers(model)
    inputs, outputs = _io(model, kv)
    side = _AttentionInputs(g, model, kv, max_positions or config.max_position_embeddings) if kv else None
    residual, table, shared = _embed(g, model, quantized)
    stream = _Stream(g, residual, float(config.rms_norm_eps), family.norm_offset)
    blocks = _Blocks(g, linear, model, side, stream)

    shapes = layer_shapes(config)
    for i, layer in enumerate(family.layers(model)):
        base = f"model.layers.{i}"
        if has_attention(layer):
            x = stream.norm(getattr(layer, family.pre_attention_norm).weight, f"{base}.{family.pre_attention_norm}")
            out = blocks.attention(x, layer.self_attn, i, kv.index(i), shapes[i])
            post = family.post_attention_norm
            stream.add(out, post and getattr(layer, post), f"{base}.{post}")
        if has_mlp(layer):
            x = stream.norm(getattr(layer, family.pre_mlp_norm).weight, f"{base}.{family.pre_mlp_norm}")
            out = blocks.mlp(x, layer.mlp, i)
            post = family.post_mlp_norm
            stream.add(out, post and getattr(layer, post), f"{base}.{post}")
    x = stream.norm(family.final_norm(model).weight, "model.norm", last=True)
    _lm_head(g, model, x, quantized, table, shared)

    graph = helper.make_graph(g.nodes, f"saap-fused-{config.model_type}", inputs, outputs, g.initializers)
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="saap export.onnx_fused",
    )
    proto.ir_version = 9
    record = {
        "precision": precision,
        "layout": layout if quantized else None,
        "accuracy_level": accuracy_level,
        "kv_layers": kv,
        "matmuls": linear.counts,
    }
    helper.set_model_props(proto, {"saap.kv_layers": json.dumps(kv), "saap.fused": json.dumps(record)})
    return proto


# --- writing ----------------------------------------------------------------------------------------


def fused_genai_config(model) -> dict[str, Any]:
    """genai_config.json for the fused graph: export/genai.py's, with the shared KV buffer."""
    from saap.export.genai import genai_config

    config = genai_config(model.config, getattr(model, "generation_config", None), MODEL_FILE)
    decoder = config["model"]["decoder"]
    shapes = layer_shapes(model.config)
    kv = kv_layers(model)
    decoder["num_hidden_layers"] = len(kv)  # caches are numbered by the layers that have attention
    decoder["num_key_value_heads"] = max(shapes[i].num_key_value_heads for i in kv)
    decoder["num_attention_heads"] = max(shapes[i].num_attention_heads for i in kv)
    decoder["inputs"].pop("position_ids", None)  # GroupQueryAttention derives positions from seqlens_k
    config["search"]["past_present_share_buffer"] = True
    return config


def write_fused(model, out_dir, precision: str = "fp32", tokenizer=None, **options) -> Path:
    """Write ``model.onnx`` (+ ``model.onnx_data`` above ~2 GB), ``genai_config.json``, the model's
    config and, when given, its tokenizer (in the form onnxruntime-genai reads) to ``out_dir``."""
    import onnx

    from saap.export.genai import write_genai_files

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    proto = build_fused_graph(model, precision, **options)
    large = proto.ByteSize() > EXTERNAL_DATA_THRESHOLD
    onnx.save(
        proto, str(out / MODEL_FILE), save_as_external_data=large, all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_FILE,
    )  # fmt: skip
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    write_genai_files(out, fused_genai_config(model))
    return out

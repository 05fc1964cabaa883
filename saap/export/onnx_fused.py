"""A fused ONNX decoder graph written op by op, the way onnxruntime-genai's model builder writes Llama.

``export/onnx.py`` traces the model (unfused attention, a Concat-grown KV cache, RoPE and repeat_kv as
plain ops). This module writes instead the graph ONNX Runtime's LLM path is tuned for, one layer at a
time with that layer's own head counts and widths (``saap.runtime.surgery.layer_shapes``):

    input_ids ─ Gather(embedding) ─┐
    per layer, for each block it still has (a block pruned to 0 is simply absent):
      attention: [Skip]SimplifiedLayerNormalization ─ MatMul(q|k|v packed) ─ GroupQueryAttention
                 (RoPE inside: do_rotary=1, cos/sin caches; KV cache in/out) ─ MatMul(o_proj)
      MLP:       SkipSimplifiedLayerNormalization ─ MatMul(gate), MatMul(up) ─ Sigmoid, Mul, Mul
                 ─ MatMul(down)
    SkipSimplifiedLayerNormalization(final norm) ─ MatMul(lm_head) ─ logits

Each norm after the first is a ``SkipSimplifiedLayerNormalization`` that also adds the previous block's
output into the residual stream (its 4th output is the new residual). ``seqlens_k`` (int32,
``ReduceSum(attention_mask, 1) - 1``) and ``total_sequence_length`` (int32 scalar,
``Shape(attention_mask)[1]``) are computed once and read by every GroupQueryAttention.

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


def rotary_caches(model, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin caches [length, head_dim / 2] from the model's own rotary embedding (rope scaling and
    attention scaling included), as GroupQueryAttention reads them for non-interleaved RoPE."""
    import torch

    rotary = model.model.rotary_emb
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
    return [i for i, layer in enumerate(model.model.layers) if has_attention(layer)]


def build_fused_graph(
    model,
    precision: str = "fp32",
    *,
    layout: str = "offsets",
    accuracy_level: int | dict[str, int] | None = None,
    max_positions: int | None = None,
):
    """The fused decoder graph of ``model`` (a LlamaForCausalLM, per-layer shapes allowed) as a ModelProto.

    ``layout`` / ``accuracy_level`` choose the MatMulNBits form for int8 / int4 (see the module
    docstring); ``accuracy_level`` is one level for every projection or a dict by projection name
    (``qkv_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``, ``default``); ``max_positions``
    the length of the rotary caches (default: max_position_embeddings).
    """
    from onnx import TensorProto, helper

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}' (choose from {', '.join(LAYOUTS)})")
    config = model.config
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"only SiLU MLPs are supported, not {config.hidden_act}")
    shapes = layer_shapes(config)
    hd = head_dim(config)
    hidden, vocab, eps = config.hidden_size, config.vocab_size, float(config.rms_norm_eps)
    tied = bool(config.tie_word_embeddings)
    quantized = precision != "fp32"
    g = _Graph()
    linear = _Linears(g, precision, layout, accuracy_level)

    # --- inputs, outputs, the attention-mask side inputs of GroupQueryAttention
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab])]
    kv = kv_layers(model)
    for j, i in enumerate(kv):
        heads = shapes[i].num_key_value_heads
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{j}.{kind}", TensorProto.FLOAT, ["batch_size", heads, "past_sequence_length", hd]
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{j}.{kind}", TensorProto.FLOAT, ["batch_size", heads, "total_sequence_length", hd]
                )
            )
    mask = "attention_mask"
    if kv:
        total = g.node("ReduceSum", [mask, g.const([1])], "/model/attn_mask/ReduceSum", keepdims=0)
        seqlens = g.node("Sub", [total, g.const(1)], "/model/attn_mask/Sub")
        seqlens_k = g.node("Cast", [seqlens], "/model/attn_mask/Sub/Cast", to=TensorProto.INT32)
        shape = g.node("Shape", [mask], "/model/attn_mask/Shape")
        length = g.node("Gather", [shape, g.const(1)], "/model/attn_mask/Gather", axis=0)
        total_seq = g.node("Cast", [length], "/model/attn_mask/Gather/Cast", to=TensorProto.INT32)
        cos, sin = rotary_caches(model, max_positions or config.max_position_embeddings)
        cos_cache, sin_cache = g.init("cos_cache", cos), g.init("sin_cache", sin)

    # --- embedding (and the tied table)
    embedding = _float(model.model.embed_tokens.weight)  # [vocab, hidden]
    table = None
    if quantized and hidden % BLOCK == 0:
        table = QuantizedTable(g, embedding, "model.embed_tokens.weight_Q8")
        g.nodes.extend(table.prologue)
        nodes = table.lookup("input_ids", "/model/embed_tokens/output_0", "embed")
        g.nodes.extend(nodes)
        residual = "/model/embed_tokens/output_0"
    elif tied:
        # One [hidden, vocab] copy: the lm_head MatMul reads it as it is, the lookup gathers its columns.
        shared = g.init("model.embed_tokens.weight_T", np.ascontiguousarray(embedding.T))
        columns = g.node("Gather", [shared, "input_ids"], "/model/embed_tokens/Gather", axis=1)
        residual = g.node("Transpose", [columns], "/model/embed_tokens/Transpose", perm=[1, 2, 0])
    else:
        residual = g.node(
            "Gather", [g.init("model.embed_tokens.weight", embedding), "input_ids"], "/model/embed_tokens/Gather"
        )

    # --- decoder layers: the residual stream is `residual` plus a pending block output `pending`
    pending: str | None = None

    def norm(weight, name: str, last: bool = False) -> str:
        nonlocal residual, pending
        gamma = g.init(f"{name}.weight", _float(weight))
        if pending is None:
            return g.node(
                "SimplifiedLayerNormalization", [residual, gamma], f"/{name}/SimplifiedLayerNorm",
                axis=-1, epsilon=eps, stash_type=1,
            )  # fmt: skip
        node = f"/{name}/SkipSimplifiedLayerNorm"
        outs = [f"{node}/output_0"] + ([] if last else ["", "", f"{node}/output_3"])
        g.node("SkipSimplifiedLayerNormalization", [residual, pending, gamma], node, outs, MS_DOMAIN, epsilon=eps)
        if not last:
            residual, pending = outs[3], None
        return outs[0]

    def bias(module) -> np.ndarray | None:
        return None if module.bias is None else _float(module.bias)

    j = 0
    for i, (layer, shape) in enumerate(zip(model.model.layers, shapes, strict=True)):
        base = f"model.layers.{i}"
        if has_attention(layer):
            attn = layer.self_attn
            x = norm(layer.input_layernorm.weight, f"{base}.input_layernorm")
            qkv_w = np.concatenate([_float(attn.q_proj.weight), _float(attn.k_proj.weight), _float(attn.v_proj.weight)])
            biases = [bias(attn.q_proj), bias(attn.k_proj), bias(attn.v_proj)]
            qkv_b = None
            if any(b is not None for b in biases):
                widths = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
                qkv_b = np.concatenate(
                    [b if b is not None else np.zeros(w, np.float32) for b, w in zip(biases, widths, strict=True)]
                )
            qkv = linear(x, qkv_w.T, qkv_b, f"{base}.attn.qkv_proj", "qkv_proj")
            node = f"/{base}/attn/GroupQueryAttention"
            attn_out = f"{node}/output_0"
            g.node(
                "GroupQueryAttention",
                [qkv, "", "", f"past_key_values.{j}.key", f"past_key_values.{j}.value", seqlens_k, total_seq,
                 cos_cache, sin_cache],
                node,
                [attn_out, f"present.{j}.key", f"present.{j}.value"],
                MS_DOMAIN,
                num_heads=shape.num_attention_heads,
                kv_num_heads=shape.num_key_value_heads,
                scale=float(getattr(attn, "scaling", hd**-0.5)),
                do_rotary=1,
                rotary_interleaved=0,
            )  # fmt: skip
            pending = linear(attn_out, _float(attn.o_proj.weight).T, bias(attn.o_proj), f"{base}.attn.o_proj", "o_proj")
            j += 1
        if has_mlp(layer):
            mlp = layer.mlp
            x = norm(layer.post_attention_layernorm.weight, f"{base}.post_attention_layernorm")
            gate = linear(x, _float(mlp.gate_proj.weight).T, bias(mlp.gate_proj), f"{base}.mlp.gate_proj", "gate_proj")
            up = linear(x, _float(mlp.up_proj.weight).T, bias(mlp.up_proj), f"{base}.mlp.up_proj", "up_proj")
            sig = g.node("Sigmoid", [gate], f"/{base}/mlp/act_fn/Sigmoid")
            act = g.node("Mul", [gate, sig], f"/{base}/mlp/act_fn/Mul")
            prod = g.node("Mul", [act, up], f"/{base}/mlp/Mul")
            pending = linear(
                prod, _float(mlp.down_proj.weight).T, bias(mlp.down_proj), f"{base}.mlp.down_proj", "down_proj"
            )

    x = norm(model.model.norm.weight, "model.norm", last=True)

    # --- lm_head
    lm_bias = getattr(model.lm_head, "bias", None)
    head_out = "logits" if lm_bias is None else "/lm_head/logits_nobias"
    if table is not None and tied:
        g.nodes.extend(table.logits(x, head_out, "/lm_head/MatMulNBits"))
    elif quantized and hidden % BLOCK == 0:
        head = QuantizedTable(g, _float(model.lm_head.weight), "lm_head.weight_Q8")
        g.nodes.extend(head.prologue)
        g.nodes.extend(head.logits(x, head_out, "/lm_head/MatMulNBits"))
    elif tied:
        g.node("MatMul", [x, shared], "/lm_head/MatMul", [head_out])
    else:
        g.node("MatMul", [x, g.init("lm_head.weight", _float(model.lm_head.weight).T)], "/lm_head/MatMul", [head_out])
    if lm_bias is not None:
        g.node("Add", [head_out, g.init("lm_head.bias", _float(lm_bias))], "/lm_head/Add", ["logits"])

    graph = helper.make_graph(g.nodes, "saap-fused-llama", inputs, outputs, g.initializers)
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

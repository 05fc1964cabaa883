"""Weight-only block quantization onto ONNX Runtime's contrib ops, and the file conventions, shared by
both ONNX graphs.

The traced graph (``saap.export.onnx``) rewrites optimum's MatMul / Gather nodes with these; the fused
graph (``saap.export.onnx_fused``) builds its nodes with them directly. Neither imports the other.
"""

from __future__ import annotations

import numpy as np

from saap.runtime.onnx_engine import MODEL_FILE

OPSET = 18
EXTERNAL_DATA_FILE = MODEL_FILE + "_data"  # optimum's name for the weights of a >2 GB graph
# Protobuf cannot hold 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# --- quantization ---------------------------------------------------------------------------------------
#
# Weight-only block quantization onto ONNX Runtime's MatMulNBits / GatherBlockQuantized contrib ops,
# written here rather than through onnxruntime.quantization because the measured alternatives fail
# the accuracy bar on SmolLM2 (top-1 agreement with fp32 on WikiText-2, benchmarks/onnx_agreement.py):
# quantize_dynamic (per-channel int8 weights, per-tensor uint8 activations) ~57 %, because one token's
# massive activation sets the scale of the whole sequence; MatMulNBitsQuantizer at 4 bits (integer
# zero points) ~66 %; its HQQ variant ~99 % but with float zero points, which the CPU kernel only
# runs through a dequantize-then-GEMM path ~4x slower than fp32; 8-bit MatMulNBits is fast only with
# int8 activations (accuracy_level 4), which alone costs ~4 points.
#
# Decoder projections: every block of 32 weights (along the input dimension, per output channel) is
# asymmetric min/max quantized, w = q * scale + low, and stored for MatMulNBits' 4-bit kernel with
# float32 activations (accuracy_level 0: ~20 % slower than int8 activations on an AMX Xeon, ~2x on an
# AVX2 EPYC, whose float 4-bit kernel runs at fp32 MatMul speed; saap export onnx --accuracy-level 4):
#   4 bits: MatMulNBits(x) computes (q - 8) * scale; the rest, (low + 8 * scale), is added back as
#           (block sums of x) @ offsets, a MatMul 1/32 the size of the weight;
#   8 bits: q = 16 * hi + lo is split into two 4-bit planes, stored as one MatMulNBits over
#           [x, x] (K doubled: hi blocks with scale 16 * scale, then lo blocks with scale), again
#           plus block-sum offsets. Same bytes as int8, exact 8-bit weights, the fast 4-bit kernel.
# For weights that already sit on a GGUF Q4_1 grid (the embedded SmolLM2 is one) 4 bits reproduce
# them exactly. Embedding / lm_head: see QuantizedTable.

BLOCK = 32
MS_DOMAIN = "com.microsoft"
# precision -> bits of each decoder projection; down_proj reads the MLP's outlier-heavy activations and
# loses most at 4 bits (measured: alone it drops agreement to ~80-88 %), so int4 keeps it at 8.
SCHEMES = {
    "int8": {"default": 8},
    "int4": {"default": 4, "down_proj": 8},
}
EMBEDDING_BITS = 8  # the (tied) embedding / lm_head: symmetric 8-bit, one copy shared by both ops
TABLE_ACCURACY_LEVEL = 4  # lm_head: int8 activations (its fp32 8-bit path is ~4x slower), then refined
REFINE_TOP_K = 8  # logits recomputed in float32 per position (see QuantizedTable.logits)


def quantize_blocks(weight: np.ndarray, bits: int, symmetric: bool, block: int = BLOCK):
    """Quantize ``weight`` [K, N] in blocks of ``block`` along K, for each of the N output channels.

    Returns unpacked ``(q [N, K/block, block] uint8, scales [N, K/block] float32, low)`` with
    ``w ~= q * scale + low`` (asymmetric, ``low`` [N, K/block]) or ``w ~= (q - 2**(bits-1)) * scale``
    (symmetric, ``low`` None).
    """
    k, n = weight.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the block size {block}")
    blocks = weight.T.reshape(n, k // block, block).astype(np.float64)
    if symmetric:
        z0 = 2 ** (bits - 1)
        scale = np.abs(blocks).max(-1) / (z0 - 1)
        scale = np.where(scale > 0, scale, 1.0)
        q = np.clip(np.rint(blocks / scale[..., None]), 1 - z0, z0 - 1) + z0
        low = None
    else:
        levels = 2**bits - 1
        low, high = blocks.min(-1), blocks.max(-1)
        scale = np.where(high > low, (high - low) / levels, 1.0)
        q = np.clip(np.rint((blocks - low[..., None]) / scale[..., None]), 0, levels)
    return q.astype(np.uint8), scale, low


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """4-bit values [..., block] -> bytes [..., block/2], the even element in the low nibble (MatMulNBits)."""
    return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4))


def nibble_planes(weight: np.ndarray, bits: int):
    """``weight`` [K, N] as 4-bit MatMulNBits inputs: ``(packed, scales, offsets [K/32, N], planes)``.

    ``x @ weight == MatMulNBits([x] * planes) + blocksums(x) @ offsets`` up to the quantization error.
    """
    q, scale, low = quantize_blocks(weight, bits, symmetric=False)
    if bits == 4:
        planes, scales, offsets = q, scale, low + 8 * scale
    elif bits == 8:  # q = 16 hi + lo: (hi - 8) * 16 s + (lo - 8) * s + (low + 136 s) == q * s + low
        planes = np.concatenate([q >> 4, q & 15], axis=1)
        scales = np.concatenate([16 * scale, scale], axis=1)
        offsets = low + 136 * scale
    else:
        raise ValueError(f"unsupported bit width {bits}")
    return pack_nibbles(planes), scales.astype(np.float32), offsets.T.astype(np.float32), bits // 4


OFFSET_DIGITS = 3  # base-16 digits of each folded offset: error <= max |offset| of the column / 3822


def _offset_width(k: int) -> int:
    """Input columns the folded layout appends for a K-wide input: a digit per block, padded to a block."""
    return -(-OFFSET_DIGITS * (k // BLOCK) // BLOCK) * BLOCK


def blocksum_matrix(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Unpacked 4-bit MatMulNBits weights [W, K/32, 32] and scales of ``x -> [16^2 bs, 16 bs, bs, 0...]``
    (``bs``: the K/32 block sums of x; one group per offset digit, most significant first), exact with
    the implicit zero point 8: q = 9 on the summed block, scale 16^d; everything else q = 8, i.e. 0."""
    blocks = k // BLOCK
    q = np.full((_offset_width(k), blocks, BLOCK), 8, np.uint8)
    scales = np.ones(q.shape[:2], np.float32)
    for digit in range(OFFSET_DIGITS):
        for j in range(blocks):
            q[digit * blocks + j, j] = 9
            scales[digit * blocks + j, j] = 16.0 ** (OFFSET_DIGITS - 1 - digit)
    return q, scales


def fold_offsets(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``weight`` [K, N] as one 4-bit MatMulNBits over ``[x] * planes + blocksum_matrix(K)(x)``: unpacked
    q [N, blocks, 32], scales [N, blocks], planes. nibble_planes' per-block offsets become weight rows:
    ``u = rint(offset / step)`` on one step per output column, ``u + C`` written in OFFSET_DIGITS base-16
    digits ``d``; the rows of digit i hold ``(d - 8) * step`` and read ``16^(D-1-i) * bs``, so together
    they add ``step * u * bs`` (C = 8 (16^D - 1) / 15 cancels the implicit zero point 8 of every digit)."""
    k, n = weight.shape
    packed, scales, offsets, planes = nibble_planes(weight, bits)
    q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, -1, BLOCK)  # unpack
    offsets = offsets.T.astype(np.float64)  # [N, K/32]
    bias = 8 * (16**OFFSET_DIGITS - 1) // 15
    step = np.abs(offsets).max(-1) / (16**OFFSET_DIGITS - 1 - bias)
    step = np.where(step > 0, step, 1.0)
    code = (np.rint(offsets / step[:, None]) + bias).astype(np.int64)
    blocks = k // BLOCK
    rows = np.full((n, _offset_width(k)), 8, np.uint8)
    for digit in range(OFFSET_DIGITS):
        rows[:, digit * blocks : (digit + 1) * blocks] = (code // 16 ** (OFFSET_DIGITS - 1 - digit)) % 16
    q = np.concatenate([q, rows.reshape(n, -1, BLOCK)], axis=1)
    step_blocks = np.repeat(step[:, None], rows.shape[1] // BLOCK, axis=1)
    return q, np.concatenate([scales, step_blocks], axis=1).astype(np.float32), planes


class GraphEditor:
    """Replaces MatMul / Gather nodes of a ModelProto in place, keeping the node order valid."""

    def __init__(self, graph):
        from onnx import numpy_helper

        self.model = graph
        self.graph = graph.graph
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.to_array = numpy_helper.to_array
        self.from_array = numpy_helper.from_array
        self.shared: dict[str, str] = {}
        # The node wrappers are held here so that their ids stay unique keys until commit().
        self.nodes = list(self.graph.node)
        self.replacements: dict[int, list] = {}  # id(old node) -> new nodes

    def add_initializer(self, array: np.ndarray, name: str) -> str:
        self.graph.initializer.append(self.from_array(array, name))
        return name

    def drop_initializer(self, name: str) -> None:
        if not any(name in node.input for node in self.nodes if id(node) not in self.replacements):
            self.graph.initializer.remove(self.initializers.pop(name))

    def _shared(self, key: str, build) -> str:
        """One tensor per (input, purpose), shared by q/k/v and gate/up which read the same input."""
        if key not in self.shared:
            self.shared[key] = build()
        return self.shared[key]

    def matmul_nbits(self, node, weight: np.ndarray, bits: int) -> list:
        """The nodes computing ``node`` (x @ weight) from 4-bit planes plus block-sum offsets."""
        from onnx import helper

        k, n = weight.shape
        packed, scales, offsets, planes = nibble_planes(weight, bits)
        x, name, nodes = node.input[0], f"{node.name}_Q{bits}", []

        def block_sums() -> str:
            out = f"{x}_blocksums"
            shape = self.add_initializer(np.array([0, 0, k // BLOCK, BLOCK], dtype=np.int64), f"{out}_shape")
            axes = self.add_initializer(np.array([-1], dtype=np.int64), f"{out}_axes")
            nodes.append(helper.make_node("Reshape", [x, shape], [f"{out}_blocks"], name=f"{out}_Reshape"))
            nodes.append(helper.make_node("ReduceSum", [f"{out}_blocks", axes], [out], name=out, keepdims=0))
            return out

        def repeated() -> str:
            out = f"{x}_x{planes}"
            nodes.append(helper.make_node("Concat", [x] * planes, [out], name=f"{out}_Concat", axis=-1))
            return out

        sums = self._shared(f"{x}/sums", block_sums)
        a = x if planes == 1 else self._shared(f"{x}/x{planes}", repeated)
        b = self.add_initializer(packed, f"{name}_weight")
        s = self.add_initializer(scales, f"{name}_scales")
        c = self.add_initializer(offsets, f"{name}_offsets")
        # accuracy_level 0: float32 activations through the 4-bit kernel (exact weights stay exact).
        nodes.append(self.nbits_node(name, a, b, s, f"{name}_main", k * planes, n, 4, accuracy_level=0))
        nodes.append(helper.make_node("MatMul", [sums, c], [f"{name}_offset"], name=f"{name}_Offset"))
        nodes.append(helper.make_node("Add", [f"{name}_main", f"{name}_offset"], [node.output[0]], name=f"{name}_Add"))
        return nodes

    @staticmethod
    def nbits_node(name, x, weight, scales, out, k: int, n: int, bits: int, accuracy_level: int):
        from onnx import helper

        attributes = {"accuracy_level": accuracy_level} if accuracy_level else {}
        return helper.make_node(
            "MatMulNBits",
            [x, weight, scales],
            [out],
            name=name,
            domain=MS_DOMAIN,
            K=k,
            N=n,
            bits=bits,
            block_size=BLOCK,
            **attributes,
        )

    def replace(self, node, nodes: list) -> None:
        self.replacements[id(node)] = nodes

    def commit(self) -> None:
        from onnx import NodeProto, helper

        new_nodes = []
        for node in self.nodes:
            for kept in self.replacements.get(id(node), [node]):
                copy = NodeProto()
                copy.CopyFrom(kept)  # detached from the field cleared below
                new_nodes.append(copy)
        self.graph.ClearField("node")
        self.graph.node.extend(new_nodes)
        if not any(op.domain == MS_DOMAIN for op in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def projection_of(node_name: str) -> str:
    """'/model/layers.3/mlp/down_proj/MatMul' -> 'down_proj'."""
    parts = node_name.strip("/").split("/")
    return parts[-2] if len(parts) >= 2 else node_name


class QuantizedTable:
    """A [rows, hidden] matrix as symmetric 8-bit blocks, readable both ways without a second copy.

    MatMulNBits takes it as B ([N=rows, K/32, 32]); GatherBlockQuantized takes the same initializer
    to look rows up (the embedding, or the lm_head rows whose logits get refined).
    """

    def __init__(self, editor: GraphEditor, table: np.ndarray, base: str):
        from onnx import helper

        self.editor, self.base = editor, base
        self.rows, self.hidden = table.shape
        q, scales, _ = quantize_blocks(table.T, EMBEDDING_BITS, symmetric=True)
        self.data = editor.add_initializer(q, base)
        self.scales = editor.add_initializer(scales.astype(np.float32), f"{base}_scales")
        shape = editor.add_initializer(np.array([self.rows, self.hidden // BLOCK, 1], dtype=np.int64), f"{base}_s3")
        # GatherBlockQuantized wants scales of the data's rank; a Reshape (folded at load) keeps one copy.
        self.scales_3d = f"{base}_scales_3d"
        self.prologue = [helper.make_node("Reshape", [self.scales, shape], [self.scales_3d], name=f"{base}_Scales3d")]
        self.row_shape = editor.add_initializer(np.array([0, 0, self.hidden], dtype=np.int64), f"{base}_rowshape")
        self.rows_shape = editor.add_initializer(np.array([0, 0, 0, self.hidden], dtype=np.int64), f"{base}_rowsshape")

    def lookup(self, ids: str, out: str, tag: str, shape: str | None = None) -> list:
        """Rows ``ids`` of the table, dequantized, as float32 ``[..., hidden]``."""
        from onnx import helper

        raw = f"{self.base}_{tag}_blocks"
        return [
            helper.make_node(
                "GatherBlockQuantized",
                [self.data, ids, self.scales_3d],
                [raw],
                name=f"{self.base}_{tag}_Gather",
                domain=MS_DOMAIN,
                gather_axis=0,
                quantize_axis=2,
                block_size=BLOCK,
                bits=EMBEDDING_BITS,
            ),
            helper.make_node("Reshape", [raw, shape or self.row_shape], [out], name=f"{self.base}_{tag}_Reshape"),
        ]

    def logits(self, x: str, out: str, name: str) -> list:
        """``x @ table.T`` with int8 activations, then the REFINE_TOP_K largest logits redone in float32.

        The 8-bit weights are exact for a Q8_0-derived table; what the fast path loses is the int8
        rounding of ``x``, and that flips near-tied top-1 tokens (measured ~1.5 points of agreement).
        Recomputing the top candidates from the dequantized rows costs ~REFINE_TOP_K / vocab of the head.
        """
        from onnx import helper

        approx, values, index = f"{name}_approx", f"{name}_topk_values", f"{name}_topk_index"
        k = self.editor.add_initializer(np.array([REFINE_TOP_K], dtype=np.int64), f"{name}_k")
        axis = self.editor.add_initializer(np.array([-1], dtype=np.int64), f"{name}_axis")
        nodes = [
            self.editor.nbits_node(
                name, x, self.data, self.scales, approx, self.hidden, self.rows, EMBEDDING_BITS, TABLE_ACCURACY_LEVEL
            ),
            helper.make_node("TopK", [approx, k], [values, index], name=f"{name}_TopK", axis=-1),
            *self.lookup(index, f"{name}_rows", "refine", self.rows_shape),
            helper.make_node("Unsqueeze", [x, axis], [f"{name}_x"], name=f"{name}_Unsqueeze"),
            helper.make_node("MatMul", [f"{name}_rows", f"{name}_x"], [f"{name}_dots"], name=f"{name}_Dots"),
            helper.make_node("Squeeze", [f"{name}_dots", axis], [f"{name}_exact"], name=f"{name}_Squeeze"),
            helper.make_node(
                "ScatterElements", [approx, index, f"{name}_exact"], [out], name=f"{name}_Scatter", axis=-1
            ),
        ]
        return nodes

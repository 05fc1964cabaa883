"""The export formats and their types, defined once for ``saap export``, the run config and the bench."""

from __future__ import annotations

from dataclasses import dataclass

from saap.pipeline.options import option

ONNX_PRECISIONS = ("fp32", "fp16", "int8", "int4")
GGUF_QUANTS = ("f16", "f32", "bf16", "q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m")
DEFAULT_PRECISION = "fp32"  # saap export onnx
# saap export onnx --graph: fused = ONNX Runtime's contrib ops (export/onnx_fused.py), traced = optimum's
# trace (export/onnx.py); auto = fused wherever it has the precision (all but fp16)
ONNX_GRAPHS = ("auto", "fused", "traced")
DEFAULT_GRAPH = "auto"
# saap export onnx --accuracy-level: ONNX Runtime's MatMulNBits accuracy_level for the fused graph's quantized
# decoder projections. 0 = float32 activations: exact weights stay exact (100 % top-1 agreement on SmolLM2);
# 4 = int8 activations, the onnxruntime-genai builder's CPU setting: faster where the float kernel is slow
# (~1.8x on an AVX2 EPYC) but ~96 % agreement (benchmarks/results/onnx-speed-smollm2-135m.md).
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
DEFAULT_ACCURACY_LEVEL = 0
DEFAULT_QUANT = "f16"  # saap export gguf: the default of llama.cpp's own convert_hf_to_gguf.py


@dataclass
class ExportSettings:
    """The run's export stages: one ONNX directory per precision, one GGUF file per quantization."""

    onnx: list[str] = option(help="ONNX precisions", factory=lambda: ["fp32", "int8"], choices=ONNX_PRECISIONS)
    gguf: list[str] = option(help="GGUF quantizations", factory=lambda: ["f16", "q8_0"], choices=GGUF_QUANTS)

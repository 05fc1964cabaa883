"""What a bench measures: its settings, one planned run, one benchmarked model, and the constants."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from saap.export.formats import DEFAULT_PRECISION, DEFAULT_QUANT, GGUF_QUANTS, ONNX_PRECISIONS
from saap.pipeline.options import option
from saap.runtime.errors import SaapError

PROJECT = Path(__file__).resolve().parents[3]  # a checkout's root (the git revision); site-packages when installed
TARGETS_DIR = Path(__file__).resolve().parent / "targets"  # package data: the device targets of --target
SCHEMA = "saap-bench/1"
# engine -> the artifact format it runs: a checkpoint, an ONNX export directory, a .gguf file
ENGINE_FORMATS = {"torch": "checkpoint", "onnx": "onnx", "onnx-genai": "onnx", "gguf": "gguf"}
FORMAT_QUANTS = {"checkpoint": ("fp32",), "onnx": ONNX_PRECISIONS, "gguf": GGUF_QUANTS}
ENGINE_QUANTS = {engine: FORMAT_QUANTS[fmt] for engine, fmt in ENGINE_FORMATS.items()}
FORMAT_DEFAULT_QUANTS = {"checkpoint": "fp32", "onnx": DEFAULT_PRECISION, "gguf": DEFAULT_QUANT}
DEFAULT_QUANTS = {engine: [FORMAT_DEFAULT_QUANTS[fmt]] for engine, fmt in ENGINE_FORMATS.items()}
ENGINE_DEVICES = {
    "torch": ("cpu", "cuda", "mps"),
    "onnx": ("cpu", "cuda", "tensorrt"),
    "onnx-genai": ("cpu", "cuda"),
    "gguf": ("cpu", "cuda", "metal"),
}
SLOWDOWN_ENV = "SAAP_BENCH_INJECT_SLOWDOWN"  # CI self-test: pruned models decode this many times slower
LLAMACPP_REF = " [llama.cpp file]"
GENAI_REF = " [onnxruntime-genai builder]"
REFERENCE_SUFFIXES = (LLAMACPP_REF, GENAI_REF)


@dataclass
class BenchSettings:
    """What ``saap bench`` measures (its flags and the run config's ``bench:`` section come from these)."""

    models: list[str] = option(
        help="smollm2-135m, checkpoint dirs, .gguf files, ONNX dirs; NAME=PATH labels one", factory=list
    )
    engines: list[str] = option(help="engines to run", factory=lambda: ["torch"], choices=ENGINE_FORMATS)
    devices: list[str] = option(help="cpu, cuda, mps (torch), tensorrt (onnx), metal (gguf)", factory=lambda: ["cpu"])
    threads: list[int | None] = option(help="CPU thread counts (default: physical cores)", factory=lambda: [None])
    onnx_precision: list[str] = option(
        help=f"ONNX precisions (default: {DEFAULT_PRECISION})", factory=list, choices=ONNX_PRECISIONS
    )
    gguf_quant: list[str] = option(help=f"GGUF types (default: {DEFAULT_QUANT})", factory=list, choices=GGUF_QUANTS)
    # engine -> quantizations: filled from the two lists above; library callers may set it directly.
    quantizations: dict[str, list[str]] = option(cli=False, yaml=False, factory=dict)
    prompt_tokens: list[int] = option(help="prompt lengths (prefill)", factory=lambda: [128])
    gen_tokens: int = option(128, "decode steps per run")
    repeats: int = option(5, "measured runs per model (median, min, max)")
    warmup: int = option(1, "unmeasured runs per model first")
    target: str | None = option(
        None, "a target shipped with saap (laptop-cpu, jetson-orin, server-gpu) or a .yaml; replaces engines, "
        "devices, threads and quantizations",
    )  # fmt: skip
    n_gpu_layers: int = option(-1, "llama.cpp layers offloaded on a GPU device (-1: all)")
    llamacpp_reference: bool = option(False, "also run llama.cpp's own GGUF of each alias, requantized alike")
    genai_reference: str | None = option(
        None, "a Python with onnxruntime-genai's model builder (transformers >= 5): also run the builder's "
        "export of each alias (int4 / fp32 / fp16, for the CPU) beside ours on the ONNX engines",
    )  # fmt: skip
    exports: list[str] = option(
        help="ready ONNX export dirs / .gguf files of the models' weights: measured as they are, not exported again",
        factory=list,
        yaml=False,  # the run passes its export stages' outputs
    )
    slowdown: float = option(1.0, cli=False, yaml=False)  # >1: pruned models decode slower (CI's injected fault)

    def __post_init__(self) -> None:
        for fmt, quants in (("onnx", self.onnx_precision), ("gguf", self.gguf_quant)):
            for engine in [e for e, f in ENGINE_FORMATS.items() if f == fmt and quants]:
                self.quantizations.setdefault(engine, list(quants))


@dataclass
class RunConfig:
    engine: str
    device: str
    quant: str
    threads: int
    n_gpu_layers: int = 0

    @property
    def key(self) -> str:
        return f"{self.engine}/{self.device}/{self.quant}/t{self.threads}"


@dataclass
class BenchModel:
    label: str
    spec: str
    kind: str  # alias | checkpoint | hf | gguf | onnx | llamacpp-ref | genai-ref
    parent: str | None = None  # label of the dense parent among the benchmarked models
    reference_of: str | None = None  # llamacpp-ref / genai-ref: the alias it stands beside
    builder: str | None = None  # genai-ref: the Python that runs onnxruntime-genai's builder
    weights_id: str | None = None  # sha256[:16] of the weights, names the export cache
    weights_sha256: str | None = None  # of the weights it loads from, matched to --exports' sources


def validate(settings: BenchSettings) -> None:
    if not settings.models:
        raise SaapError("no models to benchmark (--models)")
    if not settings.prompt_tokens or any(p < 1 for p in settings.prompt_tokens):
        raise SaapError("--prompt-tokens must be positive token counts")
    if settings.gen_tokens < 1:
        raise SaapError("--gen-tokens must be positive")
    if settings.repeats < 1:
        raise SaapError("--repeats must be at least 1")
    if settings.warmup < 0:
        raise SaapError("--warmup must be 0 or more")
    if settings.slowdown < 1:
        raise SaapError(f"{SLOWDOWN_ENV} must be 1 or more")


def slowdown_from_env() -> float:
    value = os.environ.get(SLOWDOWN_ENV)
    if not value:
        return 1.0
    try:
        return float(value)
    except ValueError:
        raise SaapError(f"{SLOWDOWN_ENV} must be a number, not '{value}'") from None

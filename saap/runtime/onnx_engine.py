"""The ONNX Runtime engine: runs an exported decoder graph (``saap export --format onnx``) with a KV cache.

The graph takes ``input_ids``, ``attention_mask``, ``position_ids`` (the traced graph only) and
``past_key_values.{i}.key/value`` and returns ``logits`` and ``present.{i}.key/value``. A pruned model has
a different KV-head count per layer, so the cache shapes are read from the graph's own input
declarations, never from a config.

Two ways to keep the cache, chosen by the export's ``genai_config.json`` (``past_present_share_buffer``):
- the fused graph (GroupQueryAttention) reads and writes one pre-allocated buffer per cache, bound to
  both its past input and its present output with I/O binding, so a decode step copies no cache
  (``SharedKvCache``); this is how onnxruntime-genai runs such graphs;
- the traced graph grows its cache by ``Concat``: each step feeds the last step's present as numpy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saap.runtime.engine import Engine, EngineSettings
from saap.runtime.errors import SaapError

MODEL_FILE = "model.onnx"
GENAI_CONFIG_FILE = "genai_config.json"
FIRST_CAPACITY = 256  # tokens a shared KV buffer holds at first; it doubles (one copy) when outgrown
RECORD_FILE = "saap-onnx.json"  # not saap.json: that name marks a torch checkpoint for runtime.models
PAST_INPUT = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")

# settings.device -> the ONNX Runtime execution providers to ask for, in priority order
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
PROVIDER_NAMES = {"CUDAExecutionProvider": "CUDA", "TensorrtExecutionProvider": "TensorRT"}
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


@dataclass(frozen=True)
class PastSpec:
    """One cache input of the graph: ``[batch, kv_heads, past_len, head_dim]``."""

    name: str
    output: str
    kv_heads: int
    head_dim: int
    dtype: type


def resolve_onnx_path(path: str | Path) -> Path:
    """The .onnx file named by ``path``: the file itself, or ``model.onnx`` inside an export directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / MODEL_FILE
        if not path.is_file():
            raise SaapError(f"'{path.parent}' is not an ONNX export directory (no {MODEL_FILE})")
    elif not path.is_file():
        raise SaapError(f"ONNX model '{path}' does not exist")
    elif path.suffix != ".onnx":
        raise SaapError(f"'{path}' is not an .onnx file or an ONNX export directory")
    return path


def check_recorded_sizes(directory: Path) -> None:
    """Cheap integrity check against the export record: a truncated copy fails here with its name."""
    record_path = directory / RECORD_FILE
    if not record_path.is_file():
        return
    try:
        files = json.loads(record_path.read_text()).get("files", {})
    except (OSError, json.JSONDecodeError) as e:
        raise SaapError(f"cannot read '{record_path}': {e}") from None
    for name, entry in files.items():
        file = directory / name
        if not file.is_file():
            raise SaapError(f"ONNX export '{directory}' is incomplete: {name} is missing")
        if file.stat().st_size != entry.get("bytes", file.stat().st_size):
            raise SaapError(
                f"ONNX export '{directory}' is corrupt: {name} has {file.stat().st_size} bytes, "
                f"{RECORD_FILE} says {entry['bytes']}"
            )


def past_specs(session, head_size: int | None = None) -> list[PastSpec]:
    """The cache inputs of ``session`` in layer order, with each layer's KV-head count and head size
    (``head_size`` where the graph leaves that axis symbolic, as onnxruntime-genai's builder does)."""
    found: dict[tuple[int, str], PastSpec] = {}
    for node in session.get_inputs():
        match = PAST_INPUT.match(node.name)
        if not match:
            continue
        shape = list(node.shape)
        if len(shape) == 4 and not isinstance(shape[3], int) and head_size:
            shape[3] = head_size
        if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise SaapError(f"ONNX input {node.name} has shape {shape}: expected [batch, kv_heads, past, head_dim]")
        layer, kind = int(match.group(1)), match.group(2)
        dtype = NUMPY_TYPES.get(node.type)
        if dtype is None:
            raise SaapError(f"ONNX input {node.name} has unsupported type {node.type}")
        found[(layer, kind)] = PastSpec(node.name, f"present.{layer}.{kind}", shape[1], shape[3], dtype)
    layers = sorted({layer for layer, _ in found})
    if layers != list(range(len(layers))) or any((i, k) not in found for i in layers for k in ("key", "value")):
        raise SaapError(f"ONNX graph has an incomplete set of past_key_values inputs (layers {layers})")
    return [found[(i, k)] for i in layers for k in ("key", "value")]


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def create_session(model_file: Path, settings: EngineSettings):
    """An InferenceSession on the requested device; refuses instead of silently running on the CPU."""
    import onnxruntime as ort

    if settings.device not in PROVIDERS:
        raise SaapError(f"the onnx engine runs on {', '.join(PROVIDERS)}, not '{settings.device}'")
    wanted = PROVIDERS[settings.device]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        raise SaapError(
            f"onnxruntime here has no {PROVIDER_NAMES.get(wanted[0], wanted[0])} execution provider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu for device '{settings.device}'"
        )
    options = ort.SessionOptions()
    providers = [(p, provider_options(p, model_file)) for p in wanted if p in available]
    if settings.threads:
        options.intra_op_num_threads = settings.threads
    options.log_severity_level = 3  # errors only: ORT's warnings are about graph fusions, not the user's input
    try:
        session = ort.InferenceSession(str(model_file), options, providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/RuntimeException types
        raise SaapError(f"cannot load ONNX model '{model_file}': {_first_line(e)}") from None
    # A provider that failed to initialise (e.g. missing CUDA libraries) is dropped by ORT with only a warning.
    if wanted[0] not in session.get_providers():
        raise SaapError(
            f"onnxruntime could not start its {PROVIDER_NAMES.get(wanted[0], wanted[0])} execution provider "
            f"for '{model_file}' (it would run on {', '.join(session.get_providers())})"
        )
    return session


def provider_options(provider: str, model_file: Path) -> dict[str, str]:
    """Per-provider options: TensorRT builds fp16 engines (cached beside the model, the build takes
    minutes); the CUDA provider runs whatever precision the graph has (export fp16 for GPUs)."""
    if provider == "TensorrtExecutionProvider":
        return {
            "trt_fp16_enable": "True",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(model_file.parent / "trt-cache"),
        }
    if provider == "CUDAExecutionProvider":
        return {"device_id": "0"}
    return {}


class OnnxSession:
    """A decoder graph plus the bookkeeping to feed it: empty caches, masks, positions."""

    def __init__(self, session, head_size: int | None = None):
        self.session = session
        self.past = past_specs(session, head_size)
        self.input_names = {node.name for node in session.get_inputs()}
        self.output_names = ["logits", *(spec.output for spec in self.past)]
        missing = {"input_ids", "logits"} - self.input_names - {o.name for o in session.get_outputs()}
        if missing:
            raise SaapError(f"ONNX graph lacks {sorted(missing)}: not a decoder exported by saap/optimum")

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        return [np.zeros((batch, s.kv_heads, 0, s.head_dim), dtype=s.dtype) for s in self.past]

    def run(self, input_ids: np.ndarray, cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits ``[batch, n, vocab]`` (float32) for ``input_ids`` ``[batch, n]`` after ``cache``; the new cache."""
        batch, n = input_ids.shape
        past_len = cache[0].shape[2] if cache else 0
        feed = {"input_ids": input_ids.astype(np.int64)}
        if "attention_mask" in self.input_names:
            feed["attention_mask"] = np.ones((batch, past_len + n), dtype=np.int64)
        if "position_ids" in self.input_names:
            feed["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + n, dtype=np.int64), (batch, n))
        feed.update((spec.name, tensor) for spec, tensor in zip(self.past, cache, strict=True))
        logits, *present = self.session.run(self.output_names, feed)
        return logits.astype(np.float32, copy=False), present


def genai_settings(directory: Path) -> dict:
    """The export's genai_config.json (every saap ONNX export has one, as onnxruntime-genai's builder
    writes one); {} without."""
    try:
        return json.loads((directory / GENAI_CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


class SharedKvCache:
    """One buffer ``[1, kv_heads, capacity, head_dim]`` per cache input, bound as both the past input and
    the present output of every run (GroupQueryAttention writes the new positions in place and reads
    ``attention_mask``'s length as the sequence so far), on the session's device."""

    def __init__(self, graph: OnnxSession, device: str = "cpu"):
        self.graph, self.device = graph, device
        self.length, self.capacity = 0, 0
        self.buffers: list = []

    def _grow(self, total: int) -> None:
        import onnxruntime as ort

        capacity = max(FIRST_CAPACITY, self.capacity)
        while capacity < total:
            capacity *= 2
        grown = []
        for i, spec in enumerate(self.graph.past):
            array = np.zeros((1, spec.kv_heads, capacity, spec.head_dim), dtype=spec.dtype)
            if self.buffers and self.length:
                array[:, :, : self.length] = self.buffers[i].numpy()[:, :, : self.length]
            # on the CPU the OrtValue wraps `array` itself (and holds a reference to it): no copy
            grown.append(ort.OrtValue.ortvalue_from_numpy(array, self.device, 0))
        self.buffers, self.capacity = grown, capacity

    def run(self, input_ids: np.ndarray, restart: bool) -> np.ndarray:
        """Logits ``[n, vocab]`` of ``input_ids`` ``[n]`` after the cached tokens (none if ``restart``)."""
        if restart:
            self.length = 0
        total = self.length + len(input_ids)
        if total > self.capacity:
            self._grow(total)
        session = self.graph.session
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", np.asarray(input_ids, dtype=np.int64)[None])
        binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        binding.bind_output("logits")
        for spec, buffer in zip(self.graph.past, self.buffers, strict=True):
            binding.bind_ortvalue_input(spec.name, buffer)
            binding.bind_ortvalue_output(spec.output, buffer)
        session.run_with_iobinding(binding)
        self.length = total
        return binding.get_outputs()[0].numpy()[0].astype(np.float32, copy=False)


class OnnxEngine(Engine):
    """An exported .onnx decoder under ONNX Runtime, with the tokenizer saved beside it."""

    name = "onnx"

    def __init__(self, path: str, settings: EngineSettings):
        model_file = resolve_onnx_path(path)
        check_recorded_sizes(model_file.parent)
        self.model_file = model_file
        genai = genai_settings(model_file.parent)
        head_size = genai.get("model", {}).get("decoder", {}).get("head_size")
        self.graph = OnnxSession(create_session(model_file, settings), head_size)
        self.tokenizer = _load_tokenizer(model_file.parent)
        self.eos_token_ids = _eos_token_ids(model_file.parent, self.tokenizer)
        self.cache: list[np.ndarray] = self.graph.empty_cache()
        self.shared: SharedKvCache | None = None
        if genai.get("search", {}).get("past_present_share_buffer", False):
            self.shared = SharedKvCache(self.graph, "cpu" if settings.device == "cpu" else "cuda")

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _forward(self, ids: Sequence[int], restart: bool) -> np.ndarray:
        if self.shared is not None:
            return self.shared.run(np.asarray(list(ids), dtype=np.int64), restart)
        if restart:
            self.cache = self.graph.empty_cache()
        logits, self.cache = self.graph.run(np.asarray([list(ids)], dtype=np.int64), self.cache)
        return logits[0]

    def prefill(self, input_ids: Sequence[int]) -> np.ndarray:
        if len(input_ids) == 0:
            raise SaapError("prefill needs at least one token")
        return self._forward(input_ids, restart=True)

    def decode_step(self, token_id: int) -> np.ndarray:
        return self._forward([token_id], restart=False)[-1]


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # transformers raises OSError/ValueError/... for a missing or damaged tokenizer
        raise SaapError(f"no usable tokenizer beside the ONNX model in '{directory}': {_first_line(e)}") from None


def _eos_token_ids(directory: Path, tokenizer) -> set[int]:
    """End-of-sequence ids from generation_config.json (as the torch engine uses), else the tokenizer's."""
    for name in ("generation_config.json", "config.json"):
        try:
            eos = json.loads((directory / name).read_text()).get("eos_token_id")
        except (OSError, json.JSONDecodeError):
            continue
        if eos is not None:
            return set(eos if isinstance(eos, list) else [eos])
    return {tokenizer.eos_token_id} - {None}

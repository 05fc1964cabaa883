"""``saap bench``: prefill / decode throughput of dense and pruned models on each engine, and a
regression check against a stored baseline.

Public API (the ``saap bench`` command and the ``saap run`` orchestrator use these):

    settings = BenchSettings(models=["smollm2-135m", "artifacts/saap-p20"], engines=["torch", "gguf"],
                             quantizations={"gguf": ["q8_0"]}, prompt_tokens=[128], gen_tokens=64)
    doc = run_bench(settings, progress=True)      # the JSON document (schema in the README)
    write_outputs(doc, "bench.json")              # bench.json + bench.md (table) + bench.png (bar chart)
    print(format_table(doc))                      # the terminal table
    regressions = compare(doc, baseline_doc, tolerance=0.10)   # [] when nothing regressed
    print(format_regressions(regressions))
    load_target("jetson-orin")                    # benchmarks/targets/jetson-orin.yaml as a dict

Pure helpers, unit-tested: ``summarize`` (median/min/max), ``paired_speedup``, ``gguf_decode_bytes``,
``onnx_decode_bytes``, ``torch_decode_bytes``, ``flatten_metrics``, ``hardware_fingerprint``.

How it measures. Each (model, engine, device, quantization, threads) runs in its own child process
(``pipeline.bench_worker``), so its peak RSS (VmHWM) is its own. Within one (engine, device, quantization,
threads) group one child per model stays alive and the repeats alternate between them (A B A B ...,
reversed every other round), after ``warmup`` unmeasured runs each: slow phases of a shared machine
hit every model alike, and the per-repeat ratio of a pruned model to its dense parent cancels them.
Every model gets the same fixed token ids (prefill P, then G decode steps of fixed ids, not its own
argmax), so dense and pruned do exactly the same work.

The ideal speed-up is the quotient of the weight bytes read per generated token (dense / pruned) at
the engine's quantization: memory-bound decode cannot beat it. It is read from the artifact itself
(GGUF tensor sizes, ONNX initializers; for torch ``decode_parameter_count`` x 4 bytes): every matrix
of every layer, the final norm and the output projection, but not the embedding table, of which a
decode step reads one row (when the embedding is tied it is the output projection and is read whole).
Efficiency = measured / ideal.

Checkpoints (and the ``smollm2-135m`` alias) are exported for onnx / gguf once per quantization into
``<cache>/exports/<weights sha256[:16]>/`` and reused; ready artifacts (a .gguf file, an ONNX export
directory) run only on their own engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from runtime.errors import SaapError

PROJECT = Path(__file__).resolve().parents[1]
TARGETS_DIR = PROJECT / "benchmarks" / "targets"
SCHEMA = "saap-bench/1"
ENGINE_QUANTS = {
    "torch": ("fp32",),
    "onnx": ("fp32", "fp16", "int8", "int4"),
    "gguf": ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m"),
}
DEFAULT_QUANTS = {"torch": ["fp32"], "onnx": ["fp32"], "gguf": ["f16"]}
ENGINE_DEVICES = {
    "torch": ("cpu", "cuda", "mps"),
    "onnx": ("cpu", "cuda", "tensorrt"),
    "gguf": ("cpu", "cuda", "metal"),
}
WORKER_ARGS = ["-m", "pipeline.bench_worker"]  # the child's command line after the interpreter
SLOWDOWN_ENV = "SAAP_BENCH_INJECT_SLOWDOWN"  # CI self-test: pruned models decode this many times slower
LLAMACPP_REF = " [llama.cpp file]"


@dataclass
class BenchSettings:
    models: list[str]
    engines: list[str] = field(default_factory=lambda: ["torch"])
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    threads: list[int | None] = field(default_factory=lambda: [None])  # None: physical cores
    quantizations: dict[str, list[str]] = field(default_factory=dict)  # engine -> quants; default DEFAULT_QUANTS
    prompt_tokens: list[int] = field(default_factory=lambda: [128])
    gen_tokens: int = 128
    repeats: int = 5
    warmup: int = 1
    target: str | None = None  # benchmarks/targets/<target>.yaml replaces engines/devices/threads/quants
    n_gpu_layers: int = -1  # gguf on a GPU device
    llamacpp_reference: bool = False  # also run llama.cpp's own file of each alias, requantized (gguf)
    slowdown: float = 1.0  # >1: pruned models decode this much slower (the CI check's injected fault)


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
    kind: str  # alias | checkpoint | hf | gguf | onnx | llamacpp-ref
    parent: str | None = None  # label of the dense parent among the benchmarked models
    reference_of: str | None = None  # llamacpp-ref: the alias it stands beside
    weights_id: str | None = None  # sha256[:16] of the weights, names the export cache


# --- statistics -----------------------------------------------------------------------------------------


def summarize(values: list[float], digits: int = 3) -> dict[str, float]:
    """Median with min and max (the median of few noisy repeats is robust to one disturbed run)."""
    if not values:
        raise ValueError("no values to summarize")
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def paired_speedup(pruned: list[float], dense: list[float]) -> dict[str, float]:
    """Per-repeat ratios of pruned / dense throughput (measured back to back), summarized."""
    if len(pruned) != len(dense) or not pruned:
        raise ValueError("paired speed-up needs the same, non-zero number of repeats")
    return summarize([p / d for p, d in zip(pruned, dense, strict=True)], 4)


# --- weight bytes read per decoded token --------------------------------------------------------------


def total_parameter_count(config) -> int:
    from runtime.surgery import layer_parameter_count, layer_shapes

    embed = config.vocab_size * config.hidden_size
    head = 0 if getattr(config, "tie_word_embeddings", True) else embed
    return sum(layer_parameter_count(config, s) for s in layer_shapes(config)) + embed + head + config.hidden_size


def torch_decode_bytes(config, dtype_bytes: int = 4) -> int:
    from runtime.surgery import decode_parameter_count, layer_shapes

    return decode_parameter_count(config, layer_shapes(config)) * dtype_bytes


def gguf_decode_bytes(tensors: list[tuple[str, int, int]]) -> int:
    """``tensors``: (name, bytes, rows). Everything is read per token except the embedding table when a
    separate ``output.weight`` exists (then one embedding row is read)."""
    total = sum(n for _, n, _ in tensors)
    names = {name: (n, rows) for name, n, rows in tensors}
    if "output.weight" in names and "token_embd.weight" in names:
        n, rows = names["token_embd.weight"]
        total -= n - n // max(rows, 1)
    return total


def read_gguf_tensors(path: Path) -> list[tuple[str, int, int]]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return [(t.name, int(t.n_bytes), int(t.shape[-1]) if len(t.shape) > 1 else 1) for t in reader.tensors]


def onnx_decode_bytes(initializers: dict[str, int], consumers: dict[str, set[str]]) -> int:
    """``initializers``: name -> bytes; ``consumers``: name -> op types using it. A table used only by
    Gather ops (an untied embedding) is a lookup, not a read of the whole table."""
    lookups = {"Gather", "GatherBlockQuantized"}
    return sum(n for name, n in initializers.items() if not consumers.get(name) or not consumers[name] <= lookups)


def read_onnx_initializers(model_file: Path) -> tuple[dict[str, int], dict[str, set[str]]]:
    import onnx
    from onnx import external_data_helper

    graph = onnx.load(str(model_file), load_external_data=False).graph
    sizes = {}
    for init in graph.initializer:
        if external_data_helper.uses_external_data(init):
            info = {e.key: e.value for e in init.external_data}
            sizes[init.name] = int(info.get("length", 0))
        else:
            sizes[init.name] = len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            if name in sizes:
                consumers.setdefault(name, set()).add(node.op_type)
    return sizes, consumers


# --- models and artifacts -------------------------------------------------------------------------------


def _label(spec: str, taken: set[str]) -> str:
    base = spec if not Path(spec).exists() else Path(spec).resolve().name
    label, n = base, 2
    while label in taken:
        label, n = f"{base}#{n}", n + 1
    return label


def classify(spec: str) -> BenchModel:
    """What a ``--models`` entry is: an alias, a checkpoint / HF dir, a .gguf file or an ONNX export dir."""
    from runtime.checkpoint import is_checkpoint
    from runtime.models import ALIASES
    from runtime.onnx_engine import MODEL_FILE

    if spec in ALIASES:
        return BenchModel(spec, spec, "alias")
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" or (path.is_file() and path.suffix != ".onnx"):
        from runtime.gguf_engine import check_gguf_file

        check_gguf_file(path)
        return BenchModel(spec, str(path), "gguf")
    if path.suffix == ".onnx" or (path.is_dir() and (path / MODEL_FILE).is_file()):
        from runtime.onnx_engine import check_recorded_sizes, resolve_onnx_path

        check_recorded_sizes(resolve_onnx_path(path).parent)
        return BenchModel(spec, str(path), "onnx")
    if path.is_dir() and is_checkpoint(path):
        return BenchModel(spec, str(path), "checkpoint")
    if path.is_dir() and (path / "config.json").is_file():
        return BenchModel(spec, str(path), "hf")
    if not path.exists():
        raise SaapError(f"model '{spec}' does not exist (give smollm2-135m, a checkpoint dir, .gguf or ONNX dir)")
    raise SaapError(f"'{spec}' is not a model: no saap.json, config.json, model.onnx, and not a .gguf file")


def resolve_models(specs: list[str]) -> list[BenchModel]:
    """Classify every spec, label it, and link each pruned checkpoint to its dense parent if present."""
    from runtime.checkpoint import read_metadata

    models: list[BenchModel] = []
    for spec in specs:
        model = classify(spec)
        model.label = _label(spec, {m.label for m in models})
        models.append(model)
    by_name = {m.spec: m for m in models} | {str(Path(m.spec).resolve()): m for m in models if m.kind != "alias"}
    for model in models:
        source = None
        if model.kind == "checkpoint":
            meta = read_metadata(model.spec)
            if meta.get("kind") == "pruned":
                source = meta.get("source", {})
            elif meta.get("kind") == "finetuned":  # a fine-tuned prune: its dense parent is the prune's source
                parent = meta.get("parent", {}).get("model")
                if parent and (Path(parent) / "saap.json").is_file():
                    parent_meta = read_metadata(parent)
                    source = parent_meta.get("source") if parent_meta.get("kind") == "pruned" else None
        elif model.kind == "onnx":
            record = Path(model.spec) / "saap-onnx.json"
            if record.is_file():
                parent_dir = json.loads(record.read_text()).get("source", {}).get("path")
                if parent_dir and Path(parent_dir).is_dir() and (Path(parent_dir) / "saap.json").is_file():
                    meta = read_metadata(parent_dir)
                    source = meta.get("source") if meta.get("kind") == "pruned" else None
        if source:
            for key in (source.get("name"), source.get("path")):
                parent = by_name.get(key) or (by_name.get(str(Path(key).resolve())) if key else None)
                if parent is not None and parent is not model:
                    model.parent = parent.label
                    break
    return models


def _weights_id(model: BenchModel) -> str:
    from runtime.checkpoint import WEIGHTS_FILE, read_metadata, sha256_file
    from runtime.models import resolve_alias

    if model.kind in ("alias", "llamacpp-ref"):
        path = resolve_alias(model.reference_of or model.spec)
        return hashlib.sha256(f"{path.stat().st_size}:{path}".encode()).hexdigest()[:16]
    if model.kind == "checkpoint":
        return read_metadata(model.spec)["files"][WEIGHTS_FILE][:16]
    weights = sorted(Path(model.spec).glob("*.safetensors"))
    digest = hashlib.sha256()
    for w in weights:
        digest.update(sha256_file(w).encode())
    return digest.hexdigest()[:16]


def export_cache() -> Path:
    from runtime.models import cache_dir

    return cache_dir() / "exports"


def fits(model: BenchModel, engine: str) -> bool:
    if model.kind == "gguf" or model.kind == "llamacpp-ref":
        return engine == "gguf"
    if model.kind == "onnx":
        return engine == "onnx"
    return True


def prepare_artifact(model: BenchModel, run: RunConfig, progress: bool = False) -> Path:
    """The file or directory ``run.engine`` loads for ``model`` at ``run.quant``: exported once, then reused."""
    if model.kind in ("gguf", "onnx"):
        return Path(model.spec)
    if run.engine == "torch":
        return Path(model.spec)
    model.weights_id = model.weights_id or _weights_id(model)
    directory = export_cache() / model.weights_id
    directory.mkdir(parents=True, exist_ok=True)
    if model.kind == "llamacpp-ref":
        out = directory / f"llamacpp-{run.quant}.gguf"
        if not out.is_file():
            requantize_llamacpp(model.reference_of or model.spec, out, run.quant)
        return out
    if run.engine == "gguf":
        from export.gguf import export_gguf

        out = directory / f"gguf-{run.quant}.gguf"
        if not out.is_file():
            export_gguf(model.spec, out, run.quant, progress=progress)
        return out
    from export.onnx import export_onnx
    from runtime.onnx_engine import RECORD_FILE

    out = directory / f"onnx-{run.quant}"
    if not (out / RECORD_FILE).is_file():
        export_onnx(model.spec, out, run.quant, overwrite=True, progress=progress, agreement_windows_count=0)
    return out


def requantize_llamacpp(alias: str, out: Path, quant: str) -> None:
    """llama.cpp's own GGUF of ``alias`` (converted by llama.cpp's tooling), requantized by llama.cpp's
    quantizer to ``quant``, so it can be compared with our export at the same type."""
    import ctypes

    import llama_cpp

    from export.gguf import LLAMA_QUANTS, _quiet_llama
    from runtime.models import resolve_alias

    source = resolve_alias(alias)
    if quant not in LLAMA_QUANTS:
        raise SaapError(f"llama.cpp reference files are requantized to {', '.join(LLAMA_QUANTS)}, not {quant}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_QUANTS[quant][0])
    params.allow_requantize = True
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with _quiet_llama(True):
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise SaapError(f"llama.cpp failed to requantize '{source}' to {quant} (code {rc})")
    os.replace(tmp, out)


def model_config(model: BenchModel, artifact: Path):
    """A config with the per-layer shapes of ``model`` (for parameter counts)."""
    from transformers import LlamaConfig

    if model.kind in ("gguf", "llamacpp-ref") or artifact.suffix == ".gguf":
        return gguf_config(artifact)
    if artifact.is_dir() and (artifact / "saap-onnx.json").is_file():
        return LlamaConfig.from_pretrained(artifact)  # the export keeps the per-layer config
    if model.kind == "alias":
        from runtime.models import load_model

        return load_model(model.spec).model.config  # cached as a checkpoint after the first load
    return LlamaConfig.from_pretrained(model.spec)


def gguf_config(path: Path) -> SimpleNamespace:
    """Llama-config fields from a GGUF's metadata (``llama``, or ``deci`` with per-layer arrays)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = reader.fields

    def get(key: str, default=None):
        f = fields.get(key)
        if f is None:
            return default
        value = f.contents()
        return value

    arch = get("general.architecture")
    layers = int(get(f"{arch}.block_count"))
    heads, kv, ffn = (
        get(f"{arch}.{k}") for k in ("attention.head_count", "attention.head_count_kv", "feed_forward_length")
    )
    hidden = int(get(f"{arch}.embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = len(get("tokenizer.ggml.tokens", [])) or next(
        int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight"
    )

    def per_layer(value) -> list[int]:
        return [int(v) for v in value] if isinstance(value, list) else [int(value)] * layers

    heads_l, kv_l, ffn_l = per_layer(heads), per_layer(kv if kv is not None else heads), per_layer(ffn)
    head_dim = int(get(f"{arch}.attention.key_length", 0)) or hidden // max(heads_l)
    return SimpleNamespace(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(heads_l),
        num_key_value_heads=max(kv_l),
        intermediate_size=max(ffn_l),
        num_attention_heads_per_layer=heads_l,
        num_key_value_heads_per_layer=kv_l,
        intermediate_size_per_layer=ffn_l,
        head_dim=head_dim,
        vocab_size=vocab,
        tie_word_embeddings="output.weight" not in names,
    )


def artifact_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        from runtime.checkpoint import WEIGHTS_FILE

        weights = [
            p for p in path.iterdir() if p.is_file() and (p.name.startswith("model.onnx") or p.name == WEIGHTS_FILE)
        ]
        weights = weights or [p for p in path.glob("*.safetensors")]
        return sum(p.stat().st_size for p in weights)
    return 0


def torch_artifact(model: BenchModel) -> Path:
    """What the torch engine reads from disk: the checkpoint's weights, or the alias's cached conversion."""
    from runtime.checkpoint import is_checkpoint, sha256_file
    from runtime.models import cache_dir, resolve_alias

    if model.kind != "alias":
        return Path(model.spec)
    path = resolve_alias(model.spec)
    cached = cache_dir() / f"{path.stem}-{sha256_file(path)[:16]}"
    return cached if is_checkpoint(cached) else path


def decode_bytes(run: RunConfig, artifact: Path, config) -> int:
    if run.engine == "gguf":
        return gguf_decode_bytes(read_gguf_tensors(artifact))
    if run.engine == "onnx":
        from runtime.onnx_engine import resolve_onnx_path

        return onnx_decode_bytes(*read_onnx_initializers(resolve_onnx_path(artifact)))
    return torch_decode_bytes(config)


# --- targets and the plan -------------------------------------------------------------------------------


def physical_cores() -> int:
    """Physical cores (threads = physical cores is the usual best for memory-bound decode)."""
    try:
        cores, current = set(), {}
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("physical id", "core id"):
                current[key] = value.strip()
            elif not key and current:
                cores.add((current.get("physical id"), current.get("core id")))
                current = {}
        if current:
            cores.add((current.get("physical id"), current.get("core id")))
        if len(cores) > 1 or (cores and None not in next(iter(cores))):
            return len(cores)
    except OSError:
        pass
    with contextlib.suppress(Exception):
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return os.cpu_count() or 1


def list_targets() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.yaml"))


def load_target(name: str) -> dict[str, Any]:
    import yaml

    path = Path(name) if name.endswith((".yaml", ".yml")) else TARGETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SaapError(f"unknown target '{name}' (choose from {', '.join(list_targets())}, or give a .yaml file)")
    try:
        target = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SaapError(f"cannot read target '{path}': {str(e).splitlines()[0]}") from None
    if not isinstance(target, dict) or not isinstance(target.get("runs"), list) or not target["runs"]:
        raise SaapError(f"target '{path}' has no 'runs' list")
    return target


def plan(settings: BenchSettings) -> list[RunConfig]:
    """Every (engine, device, quantization, threads) group to measure, validated."""
    from runtime.engine import ENGINES

    for engine in settings.engines:
        if engine not in ENGINES:
            raise SaapError(f"unknown engine '{engine}' (choose from {', '.join(ENGINES)})")
    runs: list[RunConfig] = []
    if settings.target:
        target = load_target(settings.target)
        for entry in target["runs"]:
            engine = entry.get("engine")
            if engine not in ENGINES:
                raise SaapError(f"target '{settings.target}': unknown engine '{engine}'")
            if engine not in settings.engines:
                continue
            threads = entry.get("threads", ["physical"])
            for t in threads if isinstance(threads, list) else [threads]:
                for quant in entry.get("quantizations", DEFAULT_QUANTS[engine]):
                    runs.append(
                        RunConfig(
                            engine,
                            entry.get("device", "cpu"),
                            str(quant),
                            physical_cores() if t in ("physical", None) else int(t),
                            int(entry.get("n_gpu_layers", -1 if entry.get("device", "cpu") != "cpu" else 0)),
                        )
                    )
        if not runs:
            raise SaapError(f"target '{settings.target}' has no runs for engines {', '.join(settings.engines)}")
    else:
        for engine in settings.engines:
            quants = settings.quantizations.get(engine) or DEFAULT_QUANTS[engine]
            for device in settings.devices:
                for t in settings.threads:
                    for quant in quants:
                        layers = settings.n_gpu_layers if engine == "gguf" and device != "cpu" else 0
                        runs.append(RunConfig(engine, device, quant, t or physical_cores(), layers))
    for run in runs:
        if run.device not in ENGINE_DEVICES[run.engine]:
            raise SaapError(
                f"engine {run.engine} runs on {', '.join(ENGINE_DEVICES[run.engine])}, not device '{run.device}'"
            )
        if run.quant not in ENGINE_QUANTS[run.engine]:
            raise SaapError(
                f"engine {run.engine} has no quantization '{run.quant}' "
                f"(choose from {', '.join(ENGINE_QUANTS[run.engine])})"
            )
        if run.threads < 1:
            raise SaapError(f"thread count must be at least 1, not {run.threads}")
    return runs


def preflight(runs: list[RunConfig], target: str | None = None) -> None:
    """Refuse a GPU run this machine cannot do, before any export or load (no silent CPU fallback)."""
    where = f"target '{target}' needs" if target else "the benchmark needs"
    for run in runs:
        if run.device == "cpu":
            continue
        if run.engine == "torch":
            import torch

            if run.device == "cuda" and not torch.cuda.is_available():
                raise SaapError(f"{where} a CUDA GPU for torch, but this torch build sees none")
            if run.device == "mps" and not torch.backends.mps.is_available():
                raise SaapError(f"{where} Metal (MPS) for torch, which is not available here")
        elif run.engine == "onnx":
            import onnxruntime as ort

            from runtime.onnx_engine import PROVIDERS

            wanted = PROVIDERS[run.device][0]
            if wanted not in ort.get_available_providers():
                raise SaapError(
                    f"{where} onnxruntime's {wanted}, which this onnxruntime lacks (install onnxruntime-gpu"
                    f"{' with TensorRT' if run.device == 'tensorrt' else ''}; available: "
                    f"{', '.join(ort.get_available_providers())})"
                )
        elif run.engine == "gguf":
            import llama_cpp

            if not llama_cpp.llama_supports_gpu_offload():
                raise SaapError(
                    f"{where} llama.cpp GPU offload ({run.device}), but this llama-cpp-python was built without "
                    f'{run.device.upper()} (reinstall with CMAKE_ARGS="-DGGML_{run.device.upper()}=on")'
                )


# --- the environment ------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0 and out.stdout.strip():
            return "; ".join(line.strip() for line in out.stdout.splitlines())
    except (OSError, subprocess.SubprocessError):
        pass
    with contextlib.suppress(Exception):
        import torch

        if torch.backends.mps.is_available():
            return "Apple GPU (MPS)"
    return None


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def hardware_fingerprint(env: dict[str, Any]) -> str:
    """What absolute tokens/s depend on: CPU model, core count, architecture, GPU."""
    key = "|".join(str(env.get(k)) for k in ("cpu", "logical_cores", "machine", "gpu"))
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def environment(runs: list[RunConfig]) -> dict[str, Any]:
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=PROJECT, capture_output=True, text=True)
    env = {
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "physical_cores": physical_cores(),
        "logical_cores": os.cpu_count(),
        "threads_used": sorted({r.threads for r in runs}),
        "gpu": _gpu(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": {
            n: _version(n)
            for n in ("torch", "transformers", "onnxruntime", "onnxruntime-gpu", "llama_cpp_python", "gguf")
        },
        "git_revision": revision.stdout.strip() or None,
        "git_dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    env["libraries"] = {k: v for k, v in env["libraries"].items() if v}
    if any(r.engine == "gguf" for r in runs):
        from runtime.gguf_engine import build_info

        env["llama_cpp_build"] = build_info()  # the kernels compiled in: what a gguf speed depends on
    env["hardware_fingerprint"] = hardware_fingerprint(env)
    return env


# --- running --------------------------------------------------------------------------------------------


class WorkerDied(SaapError):
    """A worker ended without answering: killed by a signal (a native crash) or exited mid-protocol."""


class Worker:
    """A ``pipeline.bench_worker`` child holding one loaded engine."""

    def __init__(self, config: dict[str, Any], site: Path | None = None):
        """``site``: a directory of packages imported ahead of this environment's (another llama-cpp-python
        build, for benchmarks/llama_cpp_builds.py)."""
        from runtime.native import child_env

        self.config = config
        self.stderr = tempfile.TemporaryFile(mode="w+")
        env = child_env(config["threads"])
        if site is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
        env.pop(SLOWDOWN_ENV, None)  # the fault is injected only through config["slowdown"]
        self.proc = subprocess.Popen(
            [sys.executable, *WORKER_ARGS, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
        )
        self.ready = self._read()
        if not self.ready.get("ok"):
            raise SaapError(self.ready.get("error", "benchmark worker failed"))

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerDied(self._death())
        return json.loads(line)

    def _death(self) -> str:
        """What ended the child, in one line (with the rebuild command if llama.cpp was killed)."""
        self.proc.wait()
        what = f"{self.config['engine']} '{self.config['artifact']}'"
        if self.config["engine"] == "gguf" and self.proc.returncode < 0:
            from runtime.gguf_engine import crash_message

            return crash_message(f"(benchmark worker for {what})", self.proc.returncode)
        from runtime.native import exit_description

        self.stderr.seek(0)
        tail = [ln for ln in self.stderr.read().splitlines() if ln.strip()][-1:] or ["no output"]
        return f"benchmark worker for {what} died ({exit_description(self.proc.returncode)}): {tail[0]}"

    def _send(self, message: Any) -> None:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:  # it died since the last answer
            raise WorkerDied(self._death()) from None

    def measure(self, prompt_tokens: int, gen_tokens: int) -> dict[str, float]:
        self._send({"prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens})
        result = self._read()
        if result.get("ok") is False:
            raise SaapError(result["error"])
        return result

    def close(self) -> dict[str, float | None]:
        """Stop the child; its peak RSS (MB, from the kernel's accounting) and peak GPU memory."""
        self._send("quit")
        final = self._read()
        self.proc.wait()
        self.stderr.close()
        # the child's own high-water mark: wait4's ru_maxrss would include this parent's RSS at fork
        return {"peak_rss_mb": final.get("peak_rss_mb"), "peak_gpu_mb": final.get("peak_gpu_mb")}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="bench", unit="run", file=sys.stderr, dynamic_ncols=True)


def validate(settings: BenchSettings) -> None:
    if not settings.models:
        raise SaapError("no models to benchmark (--models)")
    if not settings.prompt_tokens or any(p < 1 for p in settings.prompt_tokens):
        raise SaapError("--prompt-tokens must be positive token counts")
    if settings.gen_tokens < 1:
        raise SaapError("--gen-tokens must be at least 1")
    if settings.repeats < 1:
        raise SaapError("--repeats must be at least 1")
    if settings.warmup < 0:
        raise SaapError("--warmup must be 0 or more")
    if settings.slowdown < 1:
        raise SaapError(f"{SLOWDOWN_ENV} must be 1 or more")


def run_bench(settings: BenchSettings, progress: bool = True) -> dict[str, Any]:
    """Measure every model on every planned run; return the JSON document."""
    validate(settings)
    runs = plan(settings)
    preflight(runs, settings.target)
    models = resolve_models(settings.models)
    engines = {r.engine for r in runs}
    for model in models:
        if model.kind in ("gguf", "onnx") and model.kind not in engines:
            raise SaapError(
                f"'{model.spec}' is a {model.kind.upper()} artifact: it runs on engine {model.kind}, "
                f"which is not among --engines {','.join(sorted(engines))}"
            )
    if settings.llamacpp_reference:
        for alias in [m for m in models if m.kind == "alias"]:
            models.append(BenchModel(alias.label + LLAMACPP_REF, alias.spec, "llamacpp-ref", reference_of=alias.spec))
    n_ctx = max(settings.prompt_tokens) + settings.gen_tokens + 8
    groups = [(run, [m for m in models if fits(m, run.engine)]) for run in runs]
    # llama.cpp's own file is requantized by llama.cpp, which writes only its quantized types
    groups = [
        (run, [m for m in ms if m.kind != "llamacpp-ref" or run.quant in _llamacpp_quants()]) for run, ms in groups
    ]
    groups = [(run, ms) for run, ms in groups if ms]
    total = sum(len(ms) * len(settings.prompt_tokens) * (settings.warmup + settings.repeats) for _, ms in groups)
    bar = _progress(total, progress)
    started = time.time()
    env = environment(runs)
    results, info = [], {}
    try:
        for run, group in groups:
            results.extend(_run_group(run, group, settings, n_ctx, info, bar, progress))
    finally:
        if bar is not None:
            bar.close()
    doc = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": round(time.time() - started, 1),
        "settings": {k: v for k, v in asdict(settings).items()},
        "environment": env,
        "models": {
            m.label: info.get(m.label, {}) | {"spec": m.spec, "kind": m.kind, "parent": m.parent} for m in models
        },
        "results": results,
    }
    doc["speedups"] = speedups(doc)
    doc["references"] = references(doc)
    return doc


def _llamacpp_quants() -> tuple[str, ...]:
    from export.gguf import LLAMA_QUANTS

    return tuple(LLAMA_QUANTS)


def _run_group(
    run: RunConfig, models: list[BenchModel], settings: BenchSettings, n_ctx: int, info: dict, bar, progress: bool
) -> list[dict[str, Any]]:
    prepared = []
    for model in models:
        if bar is not None:
            bar.set_description(f"prepare {model.label} {run.key}")
        artifact = prepare_artifact(model, run, progress=progress)
        if run.engine == "torch":
            config = model_config(model, artifact)
            size = artifact_bytes(torch_artifact(model))
        else:
            config = model_config(model, artifact) if model.kind != "alias" or model.label not in info else None
            size = artifact_bytes(artifact)
        if model.label not in info and config is not None:
            from runtime.surgery import decode_parameter_count, layer_shapes

            info[model.label] = {
                "params": total_parameter_count(config),
                "decode_params": decode_parameter_count(config, layer_shapes(config)),
            }
        prepared.append((model, artifact, size, decode_bytes(run, artifact, config)))
    workers: dict[str, Worker] = {}
    failed: dict[str, str] = {}  # label -> why its worker died; the other models go on
    try:
        _start_workers(run, prepared, settings, n_ctx, bar, workers, failed)
        samples = _measure_rounds(run, workers, [m.label for m, *_ in prepared], settings, failed, bar)
        memory = _stop_workers(workers, failed)
    finally:
        for w in workers.values():
            w.kill()
    out = []
    for model, artifact, size, weight_bytes in prepared:
        row = {
            "model": model.label,
            "engine": run.engine,
            "device": run.device,
            "quant": run.quant,
            "threads": run.threads,
            "n_gpu_layers": run.n_gpu_layers,
            "artifact": str(artifact),
            "artifact_bytes": size,
            "decode_weight_bytes": weight_bytes,
        }
        if model.label in failed:
            out.append(row | {"failed": failed[model.label], "by_prompt": {}})
            continue
        row |= {"load_s": workers[model.label].ready.get("load_s"), **memory[model.label]}
        out.append(row | {"by_prompt": _by_prompt(samples[model.label], settings)})
    return out


def _start_workers(
    run: RunConfig, prepared: list, settings: BenchSettings, n_ctx: int, bar, workers: dict, failed: dict
) -> None:
    """One loaded worker per model into ``workers``; a worker that dies while loading joins ``failed``."""
    for model, artifact, _, _ in prepared:
        if bar is not None:
            bar.set_description(f"load {model.label} {run.key}")
        config = {
            "engine": run.engine,
            "artifact": str(artifact),
            "device": run.device,
            "threads": run.threads,
            "n_ctx": n_ctx,
            "n_gpu_layers": run.n_gpu_layers,
            "slowdown": settings.slowdown if model.parent else 1.0,
        }
        try:
            workers[model.label] = Worker(config)
        except WorkerDied as e:
            failed[model.label] = str(e)


def _measure_rounds(
    run: RunConfig, workers: dict[str, Worker], order: list[str], settings: BenchSettings, failed: dict, bar
) -> dict[str, dict[int, dict[str, list[float]]]]:
    """Every prompt length, warm-up and repeat: each live model once, A B A B, reversed every other
    round so neither model always runs right after the other. A worker that dies joins ``failed``."""
    samples = {
        label: {p: {"prefill_s": [], "decode_s": [], "ttft_s": []} for p in settings.prompt_tokens} for label in order
    }
    for p in settings.prompt_tokens:
        for round_ in range(settings.warmup + settings.repeats):
            for label in order if round_ % 2 == 0 else order[::-1]:
                if bar is not None:
                    bar.set_description(f"{label} {run.key} p{p}")
                if label not in failed:
                    try:
                        result = workers[label].measure(p, settings.gen_tokens)
                    except WorkerDied as e:
                        failed[label] = str(e)
                    else:
                        if round_ >= settings.warmup:
                            for k in samples[label][p]:
                                samples[label][p][k].append(result[k])
                if bar is not None:
                    bar.update(1)
    return samples


def _stop_workers(workers: dict[str, Worker], failed: dict[str, str]) -> dict[str, dict[str, float | None]]:
    """Each live worker's peak memory as it quits."""
    memory = {}
    for label, w in workers.items():
        if label not in failed:
            try:
                memory[label] = w.close()
            except WorkerDied as e:
                failed[label] = str(e)
    return memory


def _by_prompt(samples: dict[int, dict[str, list[float]]], settings: BenchSettings) -> dict[str, dict[str, Any]]:
    """Per prompt length: medians with min-max of the measured repeats, and the raw per-repeat rates."""
    by_prompt = {}
    for p, s in samples.items():
        by_prompt[str(p)] = {
            "prefill_tok_s": summarize([p / t for t in s["prefill_s"]], 2),
            "decode_tok_s": summarize([settings.gen_tokens / t for t in s["decode_s"]], 2),
            "ttft_ms": summarize([t * 1000 for t in s["ttft_s"]], 2),
            "decode_tok_s_runs": [round(settings.gen_tokens / t, 3) for t in s["decode_s"]],
            "prefill_tok_s_runs": [round(p / t, 3) for t in s["prefill_s"]],
        }
    return by_prompt


def failures(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The result rows whose worker died (their ``failed`` says why)."""
    return [r for r in doc["results"] if r.get("failed")]


def _run_key(r: dict[str, Any]) -> tuple:
    return (r["engine"], r["device"], r["quant"], r["threads"])


def speedups(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each pruned model against its dense parent on the same run: measured (paired), ideal, efficiency."""
    by_key = {(r["model"], *_run_key(r)): r for r in doc["results"]}
    rows = []
    for r in doc["results"]:
        parent = doc["models"].get(r["model"], {}).get("parent")
        dense = by_key.get((parent, *_run_key(r))) if parent else None
        if dense is None or dense.get("failed") or r.get("failed"):
            continue
        ideal = dense["decode_weight_bytes"] / r["decode_weight_bytes"]
        for p, stats in r["by_prompt"].items():
            measured = paired_speedup(stats["decode_tok_s_runs"], dense["by_prompt"][p]["decode_tok_s_runs"])
            prefill = paired_speedup(stats["prefill_tok_s_runs"], dense["by_prompt"][p]["prefill_tok_s_runs"])
            rows.append(
                {
                    "model": r["model"],
                    "parent": parent,
                    "engine": r["engine"],
                    "device": r["device"],
                    "quant": r["quant"],
                    "threads": r["threads"],
                    "prompt_tokens": int(p),
                    "decode_speedup": measured,
                    "prefill_speedup": prefill,
                    "ideal_speedup": round(ideal, 4),
                    "efficiency": round(measured["median"] / ideal, 4),
                }
            )
    return rows


def references(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Our GGUF export of a dense alias against llama.cpp's own file of it, requantized to the same type."""
    by_key = {(r["model"], *_run_key(r)): r for r in doc["results"]}
    rows = []
    for r in doc["results"]:
        if not r["model"].endswith(LLAMACPP_REF):
            continue
        ours = by_key.get((r["model"][: -len(LLAMACPP_REF)], *_run_key(r)))
        if ours is None or ours.get("failed") or r.get("failed"):
            continue
        for p, stats in r["by_prompt"].items():
            ratio = paired_speedup(ours["by_prompt"][p]["decode_tok_s_runs"], stats["decode_tok_s_runs"])
            rows.append(
                {
                    "ours": ours["model"],
                    "reference": r["model"],
                    "engine": r["engine"],
                    "device": r["device"],
                    "quant": r["quant"],
                    "threads": r["threads"],
                    "prompt_tokens": int(p),
                    "ours_decode_tok_s": ours["by_prompt"][p]["decode_tok_s"]["median"],
                    "reference_decode_tok_s": stats["decode_tok_s"]["median"],
                    "decode_ratio": ratio,
                }
            )
    return rows


# --- outputs --------------------------------------------------------------------------------------------


def _mb(n: float | None) -> str:
    return "" if n is None else f"{n / 1e6:.1f}"


def format_table(doc: dict[str, Any], markdown: bool = False) -> str:
    """One row per (model, engine, device, quantization, threads, prompt length)."""
    speed = {
        (s["model"], s["engine"], s["device"], s["quant"], s["threads"], str(s["prompt_tokens"])): s
        for s in doc["speedups"]
    }
    header = [
        "model", "engine", "device", "quant", "thr", "prompt", "prefill tok/s", "decode tok/s (min-max)",
        "TTFT ms", "RSS MB", "size MB", "decode MB/token", "speed-up", "ideal", "efficiency",
    ]  # fmt: skip
    rows = []
    for r in doc["results"]:
        if r.get("failed"):  # its worker died: the reason is listed under the table
            rows.append([r["model"], r["engine"], r["device"], r["quant"], str(r["threads"]), "", "FAILED", "FAILED"])
            rows[-1] += [""] * (len(header) - len(rows[-1]))
        for p, s in r["by_prompt"].items():
            sp = speed.get((r["model"], r["engine"], r["device"], r["quant"], r["threads"], p))
            d = s["decode_tok_s"]
            rows.append(
                [
                    r["model"],
                    r["engine"],
                    r["device"],
                    r["quant"],
                    str(r["threads"]),
                    p,
                    f"{s['prefill_tok_s']['median']:.0f}",
                    f"{d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f})",
                    f"{s['ttft_ms']['median']:.0f}",
                    "" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}",
                    _mb(r["artifact_bytes"]),
                    _mb(r["decode_weight_bytes"]),
                    f"{sp['decode_speedup']['median']:.3f}" if sp else "",
                    f"{sp['ideal_speedup']:.3f}" if sp else "",
                    f"{sp['efficiency']:.2f}" if sp else "",
                ]  # fmt: skip
            )
    failed = [f"FAILED {r['model']} {r['engine']} {r['quant']}: {r['failed']}" for r in failures(doc)]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines + ([""] + [f"- {line}" for line in failed] if failed else []))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines + failed)


def format_references(doc: dict[str, Any]) -> str:
    lines = []
    for r in doc.get("references", []):
        lines.append(
            f"{r['ours']} vs {r['reference']} ({r['engine']} {r['quant']}, {r['threads']} threads, prompt "
            f"{r['prompt_tokens']}): {r['ours_decode_tok_s']:.1f} vs {r['reference_decode_tok_s']:.1f} decode tok/s, "
            f"ratio {r['decode_ratio']['median']:.3f} ({r['decode_ratio']['min']:.3f}-{r['decode_ratio']['max']:.3f})"
        )
    return "\n".join(lines)


def markdown_report(doc: dict[str, Any], title: str | None = None, notes: str = "") -> str:
    env, st = doc["environment"], doc["settings"]
    lines = [
        f"# {title or 'saap bench'}",
        "",
        notes,
        "",
        f"Machine: {env['cpu']} ({env['physical_cores']} physical / {env['logical_cores']} logical cores), "
        f"GPU: {env['gpu'] or 'none'}, threads {env['threads_used']}, git {env['git_revision']}"
        f"{' (dirty)' if env.get('git_dirty') else ''}; libraries: "
        + ", ".join(f"{k} {v}" for k, v in env["libraries"].items())
        + ".",
        "",
        f"Prompt {st['prompt_tokens']} tokens, {st['gen_tokens']} decode steps, {st['repeats']} measured repeats "
        f"after {st['warmup']} warm-up; medians with (min-max). Speed-up = median over repeats of pruned / dense "
        "decode tok/s measured back to back; ideal = dense / pruned weight bytes read per token; "
        "efficiency = speed-up / ideal.",
        "",
        format_table(doc, markdown=True),
        "",
    ]
    if doc.get("references"):
        lines += ["## Our GGUF export vs llama.cpp's own file", ""]
        lines += ["- " + line for line in format_references(doc).splitlines()] + [""]
    return "\n".join(lines)


def plot(doc: dict[str, Any], out_png: Path) -> None:
    """Bar chart: decode tok/s (median, min-max whiskers) per engine/quant, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    prompt = str(min(doc["settings"]["prompt_tokens"]))
    measured = [r for r in doc["results"] if not r.get("failed")]  # a failed run has no bar
    runs = sorted({f"{r['engine']} {r['quant']}\n{r['device']} t{r['threads']}" for r in measured})
    models = list(dict.fromkeys(r["model"] for r in measured))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(runs) * max(1, len(models)) / 2), 4.5))
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(runs))
    for i, model in enumerate(models):
        med, lo, hi = [], [], []
        for run in runs:
            r = next(
                (
                    r
                    for r in measured
                    if r["model"] == model and f"{r['engine']} {r['quant']}\n{r['device']} t{r['threads']}" == run
                ),
                None,
            )
            d = r["by_prompt"][prompt]["decode_tok_s"] if r else {"median": 0, "min": 0, "max": 0}
            med.append(d["median"])
            lo.append(d["median"] - d["min"])
            hi.append(d["max"] - d["median"])
        ax.bar(x + (i - (len(models) - 1) / 2) * width, med, width, yerr=[lo, hi], capsize=2, label=model)
    ax.set_xticks(x, runs, fontsize=8)
    ax.set_ylabel("decode tokens/s (median, min-max)")
    ax.set_title(f"saap bench: decode throughput, prompt {prompt} tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)


def write_outputs(doc: dict[str, Any], out_json: str | Path, title: str | None = None, notes: str = "") -> list[Path]:
    """``out_json`` plus a markdown report (``.md``) and a bar chart (``.png``) beside it, each atomically."""
    from runtime.checkpoint import write_json_atomic, write_text_atomic

    out_json = Path(out_json)
    if out_json.parent and not out_json.parent.exists():
        out_json.parent.mkdir(parents=True)
    write_json_atomic(out_json, doc)
    write_text_atomic(out_json.with_suffix(".md"), markdown_report(doc, title, notes))
    plot(doc, out_json.with_suffix(".png"))
    return [out_json, out_json.with_suffix(".md"), out_json.with_suffix(".png")]


# --- regression check -----------------------------------------------------------------------------------


@dataclass
class Metric:
    value: float
    higher_is_better: bool
    machine_independent: bool


def flatten_metrics(doc: dict[str, Any]) -> dict[str, Metric]:
    """Every comparable number of a document, keyed by a stable name."""
    metrics: dict[str, Metric] = {}
    for s in doc.get("speedups", []):
        run = f"{s['engine']}/{s['device']}/{s['quant']}/t{s['threads']}/p{s['prompt_tokens']}"
        key = f"{s['model']} vs {s['parent']} {run}"
        metrics[f"decode speed-up {key}"] = Metric(s["decode_speedup"]["median"], True, True)
    for r in doc.get("results", []):
        key = f"{r['model']} {r['engine']}/{r['device']}/{r['quant']}/t{r['threads']}"
        metrics[f"artifact bytes {key}"] = Metric(r["artifact_bytes"], False, True)
        metrics[f"decode weight bytes {key}"] = Metric(r["decode_weight_bytes"], False, True)
        for p, s in r["by_prompt"].items():
            metrics[f"decode tok/s {key}/p{p}"] = Metric(s["decode_tok_s"]["median"], True, False)
            metrics[f"prefill tok/s {key}/p{p}"] = Metric(s["prefill_tok_s"]["median"], True, False)
            metrics[f"TTFT ms {key}/p{p}"] = Metric(s["ttft_ms"]["median"], False, False)
        if r.get("peak_rss_mb") is not None:
            metrics[f"peak RSS MB {key}"] = Metric(r["peak_rss_mb"], False, False)
    for label, m in doc.get("models", {}).items():
        if m.get("params") is not None:
            metrics[f"params {label}"] = Metric(m["params"], False, True)
    return metrics


def compare(
    current: dict[str, Any], baseline: dict[str, Any], tolerance: float, absolute: bool = True
) -> list[dict[str, Any]]:
    """Metrics of ``current`` worse than ``baseline`` by more than ``tolerance`` (a fraction), or missing.

    Machine-independent metrics (speed-up ratios measured within one run, sizes, parameter counts) are
    always compared; absolute speeds, TTFT and RSS only when both runs have the same hardware fingerprint
    (and ``absolute`` is true: a shared CI box may match the fingerprint yet not the load).
    """
    if not 0 <= tolerance < 1:
        raise SaapError(f"--tolerance must be in [0, 1), not {tolerance}")
    for name, doc in (("current run", current), ("baseline", baseline)):
        if doc.get("schema") != SCHEMA:
            raise SaapError(f"{name} is not a saap bench document (schema {doc.get('schema')!r}, expected {SCHEMA})")
    same_hardware = absolute and current["environment"].get("hardware_fingerprint") == baseline["environment"].get(
        "hardware_fingerprint"
    )
    now, before = flatten_metrics(current), flatten_metrics(baseline)
    regressions = []
    for name, base in before.items():
        if not base.machine_independent and not same_hardware:
            continue
        cur = now.get(name)
        if cur is None:
            regressions.append({"metric": name, "baseline": base.value, "current": None, "change": None})
            continue
        change = (cur.value - base.value) / base.value if base.value else 0.0
        worse = -change if base.higher_is_better else change
        if worse > tolerance:
            regressions.append(
                {"metric": name, "baseline": base.value, "current": cur.value, "change": round(change, 4)}
            )
    return regressions


def format_regressions(regressions: list[dict[str, Any]], tolerance: float) -> str:
    if not regressions:
        return f"no metric regressed beyond {tolerance:.0%}"
    width = max(len(r["metric"]) for r in regressions)
    lines = [
        f"{len(regressions)} metric(s) regressed beyond {tolerance:.0%}:",
        f"{'metric'.ljust(width)}  baseline    current     change",
    ]
    for r in regressions:
        cur = "missing" if r["current"] is None else f"{r['current']:.4g}"
        change = "" if r["change"] is None else f"{r['change']:+.1%}"
        lines.append(f"{r['metric'].ljust(width)}  {r['baseline']:<10.4g}  {cur:<10}  {change}")
    return "\n".join(lines)


def load_document(path: str | Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SaapError(f"baseline '{path}' does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise SaapError(f"cannot read '{path}': {e}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise SaapError(f"'{path}' is not a saap bench JSON document (schema {SCHEMA})")
    return doc


def slowdown_from_env() -> float:
    value = os.environ.get(SLOWDOWN_ENV)
    if not value:
        return 1.0
    try:
        return float(value)
    except ValueError:
        raise SaapError(f"{SLOWDOWN_ENV} must be a number, not '{value}'") from None

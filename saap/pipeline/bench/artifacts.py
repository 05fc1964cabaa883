"""The file each engine loads for a model: the model itself, a given export of its weights, or its export
in ``<cache>/exports/<weights sha256[:16]>/`` (made once per quantization, then reused); and what is read
from an artifact (its per-layer config, its size on disk)."""

from __future__ import annotations

import ctypes
import hashlib
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFReader

from saap.pipeline.bench.exports import ExportIndex, given_export
from saap.pipeline.bench.settings import ENGINE_FORMATS, BenchModel, RunConfig
from saap.runtime.errors import SaapError
from saap.runtime.io import atomic_file
from saap.runtime.onnx_engine import RECORD_FILE

# runtime.checkpoint / runtime.models / export.* import torch and transformers, llama_cpp is native:
# all are imported where used, so that `import pipeline.bench` stays light.

EXPORTED, GIVEN = "exported", "given"  # a result row's artifact_origin


@dataclass(frozen=True)
class Artifact:
    path: Path
    origin: str  # EXPORTED: the bench wrote it (now or in an earlier run) into its cache; GIVEN: it did not


def _weights_id(model: BenchModel) -> str:
    from saap.runtime.checkpoint import WEIGHTS_FILE, read_metadata, sha256_file
    from saap.runtime.models import resolve_alias

    if model.kind in ("alias", "llamacpp-ref", "genai-ref"):
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
    from saap.runtime.models import cache_dir

    return cache_dir() / "exports"


def fits(model: BenchModel, engine: str) -> bool:
    """A ready artifact runs only on the engines of its format; a checkpoint is exported for any."""
    kind = {"llamacpp-ref": "gguf", "genai-ref": "onnx"}.get(model.kind, model.kind)
    return ENGINE_FORMATS[engine] == kind if kind in ("gguf", "onnx") else True


def prepare_artifact(
    model: BenchModel, run: RunConfig, progress: bool = False, given: ExportIndex | None = None
) -> Artifact:
    """What ``run.engine`` loads for ``model`` at ``run.quant``: the model itself (torch, a ready artifact),
    a given export of the same weights at that engine and quantization, else the cached export."""
    if model.kind in ("gguf", "onnx") or run.engine == "torch":
        return Artifact(Path(model.spec), GIVEN)
    found = given_export(given or {}, model, run)
    if found is not None:  # looked up before the cache directory is made: a given export writes nothing
        return Artifact(found, GIVEN)
    return Artifact(_cached_export(model, run, progress), EXPORTED)


def _cached_export(model: BenchModel, run: RunConfig, progress: bool) -> Path:
    model.weights_id = model.weights_id or _weights_id(model)
    directory = export_cache() / model.weights_id
    directory.mkdir(parents=True, exist_ok=True)
    if model.kind == "llamacpp-ref":
        out = directory / f"llamacpp-{run.quant}.gguf"
        if not out.is_file():
            requantize_llamacpp(model.reference_of or model.spec, out, run.quant)
        return out
    if model.kind == "genai-ref":
        from saap.export.genai_builder import build_reference, builder_source

        source = builder_source(model.reference_of or model.spec, directory)
        return build_reference(model.builder, source, directory / f"genai-builder-{run.quant}", run.quant)
    if ENGINE_FORMATS[run.engine] == "gguf":
        from saap.export.gguf import export_gguf

        out = directory / f"gguf-{run.quant}.gguf"
        if not out.is_file():
            export_gguf(model.spec, out, run.quant, progress=progress)
        return out
    from saap.export.formats import DEFAULT_GRAPH
    from saap.export.onnx import export_onnx, resolve_graph

    out = directory / f"onnx-{resolve_graph(DEFAULT_GRAPH, run.quant)}-{run.quant}"  # the graph changes the speed
    if not (out / RECORD_FILE).is_file():
        export_onnx(model.spec, out, run.quant, overwrite=True, progress=progress, agreement_windows_count=0)
    return out


def requantize_llamacpp(alias: str, out: Path, quant: str) -> None:
    """llama.cpp's own GGUF of ``alias`` (converted by llama.cpp's tooling), requantized by llama.cpp's
    quantizer to ``quant``, so it can be compared with our export at the same type."""
    import llama_cpp

    from saap.export.gguf import LLAMA_QUANTS, _quiet_llama
    from saap.runtime.models import resolve_alias

    source = resolve_alias(alias)
    if quant not in LLAMA_QUANTS:
        raise SaapError(f"llama.cpp reference files are requantized to {', '.join(LLAMA_QUANTS)}, not {quant}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_QUANTS[quant][0])
    params.allow_requantize = True
    with atomic_file(out, suffix=".gguf") as tmp:
        with _quiet_llama(False) as log:  # its per-tensor lines only with SAAP_VERBOSE
            rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise SaapError(f"llama.cpp failed to requantize '{source}' to {quant} (code {rc}){log.reason()}")


def model_config(model: BenchModel, artifact: Path):
    """A config with the per-layer shapes of ``model`` (for parameter counts)."""
    from transformers import AutoConfig

    if model.kind in ("gguf", "llamacpp-ref") or artifact.suffix == ".gguf":
        return gguf_config(artifact)
    if artifact.is_dir() and (artifact / RECORD_FILE).is_file():
        return AutoConfig.from_pretrained(artifact)  # the export keeps the per-layer config
    if model.kind in ("alias", "genai-ref"):  # the builder's export holds no config.json: the alias's own
        from saap.runtime.models import load_model

        return load_model(model.reference_of or model.spec).model.config  # cached after the first load
    return AutoConfig.from_pretrained(model.spec)


def gguf_config(path: Path):
    """The config of a GGUF's model from its metadata (per-layer arrays of ``deci`` included), as its
    family's transformers config: enough to count parameters, not to load weights."""
    from transformers import AutoConfig

    from saap.runtime.families import family_for_gguf

    reader = GGUFReader(str(path))

    def get(key: str, default=None):
        found = reader.fields.get(key)
        return default if found is None else found.contents()

    def per_layer(value) -> list[int]:
        return [int(v) for v in value] if isinstance(value, list) else [int(value)] * layers

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
    heads_l, kv_l, ffn_l = per_layer(heads), per_layer(kv if kv is not None else heads), per_layer(ffn)
    head_dim = int(get(f"{arch}.attention.key_length", 0)) or hidden // max(heads_l)
    config = AutoConfig.for_model(
        family_for_gguf(arch).model_type,
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
        attention_bias=any(name.endswith("attn_q.bias") for name in names),
    )
    return config


def artifact_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        from saap.runtime.checkpoint import WEIGHTS_FILE

        weights = [
            p for p in path.iterdir() if p.is_file() and (p.name.startswith("model.onnx") or p.name == WEIGHTS_FILE)
        ]
        weights = weights or [p for p in path.glob("*.safetensors")]
        return sum(p.stat().st_size for p in weights)
    return 0


def torch_artifact(model: BenchModel) -> Path:
    """What the torch engine reads from disk: the checkpoint's weights, or the alias's cached conversion."""
    from saap.runtime.checkpoint import is_checkpoint, sha256_file
    from saap.runtime.models import cache_dir, resolve_alias

    if model.kind != "alias":
        return Path(model.spec)
    path = resolve_alias(model.spec)
    cached = cache_dir() / f"{path.stem}-{sha256_file(path)[:16]}"
    return cached if is_checkpoint(cached) else path

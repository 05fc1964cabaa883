"""Export a (pruned) decoder model to an ONNX decoder with a KV cache, optionally quantized for ONNX Runtime.

Two graph writers (``GRAPHS``): ``fused`` (the default wherever it has the precision: ONNX Runtime's
GroupQueryAttention / SkipSimplifiedLayerNormalization / MatMulNBits contrib ops, written layer by layer
in ``export/onnx_fused.py``) and ``traced``, described here. The traced graph comes from optimum-onnx's
exporter (torch.onnx underneath) with a Llama ONNX config whose dummy cache has each layer's own KV-head
count, so a pruned model exports as it is: inputs
``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value`` and outputs
``logits``, ``present.{i}.key/value``, with dynamic batch / sequence / past-sequence axes. Optimum's
stock config assumes one KV-head count for every layer (and cannot load a per-layer checkpoint from
disk), hence the in-memory model and the config subclass.

Output directory (written to a temporary sibling, renamed into place at the end):

    model.onnx (+ model.onnx_data above ~2 GB)   the graph, fp32 / fp16 / int8 / int4 weights
    config.json, generation_config.json           the model's config, per-layer shapes included
    tokenizer files                               as the Hugging Face tokenizer writes them
    saap-onnx.json                                provenance: source sha256, precision, settings, checks, file sha256s

Precisions: ``fp32``; ``fp16`` (float16 weights and compute, float32 inputs/outputs; meant for GPUs,
still loads on the CPU provider); ``int8`` and ``int4`` (weight-only block quantization onto ONNX
Runtime's MatMulNBits / GatherBlockQuantized ops, see the quantization section below: every decoder
projection in 8 bits, or in 4 bits except down_proj in 8; the tied embedding / lm_head in 8 bits,
stored once). Each export records its fp32 graph's logit difference to torch and, when quantized,
its top-1 agreement with the fp32 graph on WikiText-2.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saap.export.formats import (
    ACCURACY_LEVELS,
    DEFAULT_ACCURACY_LEVEL,
    DEFAULT_GRAPH,
    DEFAULT_PRECISION,
    ONNX_GRAPHS,
    ONNX_PRECISIONS,
)
from saap.export.genai import genai_config, write_genai_files
from saap.export.onnx_fused import build_fused_graph, fused_genai_config
from saap.export.onnx_quant import (
    BLOCK,
    EMBEDDING_BITS,
    EXTERNAL_DATA_FILE,
    EXTERNAL_DATA_THRESHOLD,
    OPSET,
    REFINE_TOP_K,
    SCHEMES,
    GraphEditor,
    QuantizedTable,
    projection_of,
)
from saap.runtime.checkpoint import sha256_file
from saap.runtime.errors import SaapError
from saap.runtime.families import family_of
from saap.runtime.io import atomic_dir, write_json_atomic
from saap.runtime.onnx_engine import MODEL_FILE, RECORD_FILE, OnnxSession
from saap.runtime.surgery import head_dim, layer_shapes

FORMAT_VERSION = 1
AGREEMENT_WINDOWS, AGREEMENT_SEQ_LEN = 8, 128


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[onnx] {message}", file=sys.stderr, flush=True)


def _check_family(graph: str, model) -> None:
    """The traced graph is optimum's Llama exporter; other families have only the fused graph."""
    family = family_of(model)
    if graph == "traced" and not family.traced_onnx:
        have = ", ".join(GRAPHS["fused"].precisions)
        raise SaapError(
            f"the traced ONNX graph (optimum's Llama exporter) does not handle {family.display} models; "
            f"--graph fused does ({have})"
        )


def _check_arguments(out: Path, precision: str, graph: str, overwrite: bool, accuracy_level: int) -> str:
    """Refuses bad input before any work; returns the graph writer's name (``auto`` resolved)."""
    if precision not in ONNX_PRECISIONS:
        raise SaapError(f"unknown ONNX precision '{precision}' (choose from {', '.join(ONNX_PRECISIONS)})")
    graph = resolve_graph(graph, precision)
    if accuracy_level not in ACCURACY_LEVELS:
        raise SaapError(f"unknown accuracy level {accuracy_level} (choose from {', '.join(map(str, ACCURACY_LEVELS))})")
    if accuracy_level != DEFAULT_ACCURACY_LEVEL and (graph != "fused" or precision == "fp32"):
        raise SaapError("--accuracy-level applies to the fused graph's int8 / int4 MatMulNBits only")
    if not out.parent.is_dir():
        raise SaapError(f"cannot write '{out}': its parent directory '{out.parent}' does not exist")
    if out.exists() and not overwrite:
        raise SaapError(f"output '{out}' already exists (pass --overwrite to replace it)")
    return graph


# --- the fp32 graph -------------------------------------------------------------------------------------


def _onnx_config(config):
    """optimum's Llama ONNX config with a dummy cache that has every layer's own KV-head count."""
    from optimum.exporters.onnx.model_configs import LlamaOnnxConfig
    from optimum.utils.input_generators import DummyTextInputGenerator, MistralDummyPastKeyValuesGenerator

    class PerLayerPastKeyValuesGenerator(MistralDummyPastKeyValuesGenerator):
        def __init__(self, task, normalized_config, **kwargs):
            super().__init__(task, normalized_config, **kwargs)
            self.kv_heads = [shape.num_key_value_heads for shape in layer_shapes(normalized_config.config)]
            self.head_dim = head_dim(normalized_config.config)

        def generate(self, input_name, framework="pt", int_dtype="int64", float_dtype="fp32"):
            return [
                tuple(
                    self.random_float_tensor(
                        (self.batch_size, kv_heads, self.sequence_length, self.head_dim),
                        framework=framework,
                        dtype=float_dtype,
                    )
                    for _ in ("key", "value")
                )
                for kv_heads in self.kv_heads
            ]

    class PerLayerLlamaOnnxConfig(LlamaOnnxConfig):
        DEFAULT_ONNX_OPSET = OPSET
        DUMMY_INPUT_GENERATOR_CLASSES = (DummyTextInputGenerator, PerLayerPastKeyValuesGenerator)
        DUMMY_PKV_GENERATOR_CLASS = PerLayerPastKeyValuesGenerator

    return PerLayerLlamaOnnxConfig(config, task="text-generation", use_past=True, use_past_in_inputs=True)


def _trace(model, path: Path) -> None:
    import torch
    from optimum.exporters.onnx.convert import export

    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about every Python-level shape check in transformers; they are the expected ones.
        warnings.simplefilter("ignore")
        export(model, _onnx_config(model.config), path, opset=OPSET, disable_dynamic_axes_fix=True)


def _store_tied_embedding_once(graph, model) -> bool:
    """The tracer stores a tied lm_head twice (the embedding and its transpose): keep the embedding only.

    The MatMul then reads ``Transpose(embedding)``, as optimum's own deduplication does; ONNX Runtime
    folds that at load time. Returns whether the graph now holds exactly one copy of the table.
    """
    from onnx import helper, numpy_helper

    embedding = model.model.embed_tokens.weight.detach().numpy()
    initializers = {init.name: init for init in graph.graph.initializer}
    reference = next((n for n, i in initializers.items() if tuple(i.dims) == embedding.shape), None)
    duplicate = next(
        (
            name
            for name, init in initializers.items()
            if tuple(init.dims) == embedding.shape[::-1] and np.array_equal(numpy_helper.to_array(init), embedding.T)
        ),
        None,
    )
    if reference is not None and duplicate is not None:
        transposed = f"{reference}_transposed"
        first = min(i for i, node in enumerate(graph.graph.node) if duplicate in node.input)
        for node in graph.graph.node:
            if duplicate in node.input:
                node.input[:] = [transposed if name == duplicate else name for name in node.input]
        graph.graph.node.insert(first, helper.make_node("Transpose", [reference], [transposed], name="TiedLmHead_T"))
        graph.graph.initializer.remove(initializers[duplicate])
    shapes = {embedding.shape, embedding.shape[::-1]}
    return sum(tuple(init.dims) in shapes for init in graph.graph.initializer) == 1


def _save(graph, path: Path) -> None:
    """Save a ModelProto, with its weights in one external file only when protobuf cannot hold them."""
    import onnx

    large = graph.ByteSize() > EXTERNAL_DATA_THRESHOLD
    onnx.save(graph, str(path), save_as_external_data=large, all_tensors_to_one_file=True, location=EXTERNAL_DATA_FILE)


def _quantize_embedding(editor: GraphEditor, tied: bool) -> dict[str, Any]:
    """Embedding lookup -> GatherBlockQuantized; a tied lm_head -> MatMulNBits on the same bytes."""
    gather = next((n for n in editor.nodes if n.op_type == "Gather" and n.input[0] in editor.initializers), None)
    if gather is None:
        return {"embedding": "float32 (no Gather on an initializer found)"}
    name = gather.input[0]
    table = editor.to_array(editor.initializers[name])  # [vocab, hidden]
    if table.shape[1] % BLOCK:
        return {"embedding": f"float32 (hidden size {table.shape[1]} is not a multiple of {BLOCK})"}
    quantized = QuantizedTable(editor, table, f"{name}_Q{EMBEDDING_BITS}")
    editor.replace(gather, [*quantized.prologue, *quantized.lookup(gather.input[1], gather.output[0], "embed")])
    record = {"embedding": f"int{EMBEDDING_BITS} symmetric blocks of {BLOCK} (GatherBlockQuantized)"}
    if tied:
        transpose = next((n for n in editor.nodes if n.op_type == "Transpose" and n.input[0] == name), None)
        head = transpose and next((n for n in editor.nodes if transpose.output[0] in n.input), None)
        if head is not None and head.op_type == "MatMul" and head.input[1] == transpose.output[0]:
            editor.replace(transpose, [])
            editor.replace(head, quantized.logits(head.input[0], head.output[0], f"{head.name}_Q{EMBEDDING_BITS}"))
            record["lm_head"] = (
                f"tied: the same int{EMBEDDING_BITS} blocks through MatMulNBits, top-{REFINE_TOP_K} logits in float32"
            )
    editor.drop_initializer(name)
    return record


def _quantize_lm_head(editor: GraphEditor, node, weight: np.ndarray) -> dict[str, Any]:
    """An untied lm_head ([hidden, vocab] initializer): the same scheme as a tied one, on its own table."""
    quantized = QuantizedTable(editor, weight.T, f"{node.input[1]}_Q{EMBEDDING_BITS}")
    editor.replace(node, [*quantized.prologue, *quantized.logits(node.input[0], node.output[0], node.name + "_Q8")])
    editor.drop_initializer(node.input[1])
    return {"lm_head": f"int{EMBEDDING_BITS} symmetric blocks of {BLOCK}, top-{REFINE_TOP_K} logits in float32"}


def quantize_graph(graph, precision: str, tied: bool) -> dict[str, Any]:
    """Rewrite the fp32 ``graph`` in place to ``precision`` (int8 / int4); returns what was done."""
    scheme = SCHEMES[precision]
    editor = GraphEditor(graph)
    counts: dict[str, int] = {}
    record: dict[str, Any] = {}
    lm_head = _lm_head_nodes(graph)
    for node in editor.nodes:
        if node.op_type != "MatMul" or node.input[1] not in editor.initializers:
            continue
        weight = editor.to_array(editor.initializers[node.input[1]])
        if weight.ndim != 2:
            continue
        if weight.shape[0] % BLOCK:
            # Offsets need whole blocks; a ragged K (only unaligned pruning makes one) keeps float32.
            counts["float32 (K not a multiple of 32)"] = counts.get("float32 (K not a multiple of 32)", 0) + 1
            continue
        if node.name in lm_head:
            record.update(_quantize_lm_head(editor, node, weight))
            continue
        bits = scheme.get(projection_of(node.name), scheme["default"])
        editor.replace(node, editor.matmul_nbits(node, weight, bits))
        counts[f"int{bits}"] = counts.get(f"int{bits}", 0) + 1
        editor.drop_initializer(node.input[1])
    record.update(_quantize_embedding(editor, tied))
    editor.commit()
    return {
        "method": "saap block quantization onto onnxruntime MatMulNBits / GatherBlockQuantized",
        "weights": f"asymmetric min/max blocks of {BLOCK} along the input dimension, float offsets",
        "kernel": "MatMulNBits 4-bit, float32 activations (8-bit weights as two 4-bit planes)",
        "block_size": BLOCK,
        "projection_bits": dict(scheme),
        "matmuls": counts,
        **record,
    }


def _lm_head_nodes(graph) -> list[str]:
    """The MatMul producing the logits, when it reads a weight initializer directly (an untied lm_head)."""
    producers = {out: node for node in graph.graph.node for out in node.output}
    node = producers.get("logits")
    while node is not None and node.op_type != "MatMul" and node.input:
        node = producers.get(node.input[0])
    initializers = {init.name for init in graph.graph.initializer}
    return [node.name] if node is not None and node.op_type == "MatMul" and node.input[1] in initializers else []


def _to_fp16(fp32_path: Path, out_path: Path, tied: bool) -> dict[str, Any]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    graph = onnx.load(str(fp32_path))
    # Inputs/outputs (ids, mask, cache, logits) stay float32, so callers feed every precision alike.
    # Shape inference only finds value types to keep; large graphs cannot go through it in memory.
    fp16 = convert_float_to_float16(graph, keep_io_types=True, disable_shape_infer=graph.ByteSize() > 2**31 - 1)
    _save(fp16, out_path)
    return {"method": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True}


def _to_blocks(precision: str):
    def convert(fp32_path: Path, out_path: Path, tied: bool) -> dict[str, Any]:
        import onnx

        graph = onnx.load(str(fp32_path))
        record = quantize_graph(graph, precision, tied)
        _save(graph, out_path)
        return record

    return convert


CONVERTERS = {"fp16": _to_fp16, "int8": _to_blocks("int8"), "int4": _to_blocks("int4")}


# --- checks ---------------------------------------------------------------------------------------------


def _session(path: Path):
    from saap.runtime.engine import EngineSettings
    from saap.runtime.onnx_engine import create_session

    return OnnxSession(create_session(path, EngineSettings()))


def max_abs_diff_vs_torch(model, graph: OnnxSession, prompt_len: int = 12, steps: int = 3, seed: int = 0) -> float:
    """Largest logit difference between ``model`` and the graph: a prefill, then decode steps on the cache."""
    import torch

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.config.vocab_size, size=prompt_len + steps)
    with torch.no_grad():
        expected = model(torch.tensor(ids[None])).logits[0].float().numpy()
    logits, cache = graph.run(ids[None, :prompt_len], graph.empty_cache())
    worst = float(np.abs(logits[0] - expected[:prompt_len]).max())
    for t in range(prompt_len, prompt_len + steps):
        logits, cache = graph.run(ids[None, t : t + 1], cache)
        worst = max(worst, float(np.abs(logits[0, 0] - expected[t]).max()))
    return worst


def agreement_windows(tokenizer, num_windows: int, seq_len: int) -> tuple[np.ndarray, str] | None:
    """The first WikiText-2 test windows (LLM-Pruner's protocol), or None where the data set is absent."""
    from saap.pipeline.data import PERPLEXITY_SETS, perplexity_text, resolve_data_file

    try:
        path = resolve_data_file("wikitext2", PERPLEXITY_SETS)
    except SaapError:
        return None
    # Tokenizing a generous prefix gives the same first windows as the whole text, much faster.
    text = perplexity_text(path, "wikitext2")[: num_windows * seq_len * 8 + 10_000]
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    n = min(num_windows, len(ids) // seq_len)
    return (ids[: n * seq_len].reshape(n, seq_len), str(path)) if n else None


def window_logits(graph: OnnxSession, windows: np.ndarray):
    """Logits of every window, one at a time (batch 1 keeps peak memory at one window's logits)."""
    for window in windows:
        logits, _ = graph.run(window[None], graph.empty_cache())
        yield logits[0]


def top1_agreement(reference: OnnxSession, candidate: OnnxSession, windows: np.ndarray) -> float:
    same = total = 0
    for ref, cand in zip(window_logits(reference, windows), window_logits(candidate, windows), strict=True):
        same += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        total += ref.shape[0]
    return same / total


# --- the export -----------------------------------------------------------------------------------------


def _write_traced(
    model, precision: str, fp32_path: Path, out_path: Path, progress: bool, timings, accuracy_level: int
) -> dict:
    """optimum's trace at fp32, then (quantized / fp16) this module's converter over that graph
    (float32 activations: ``accuracy_level`` is always the default here, _check_arguments sees to it)."""
    import onnx

    _log(progress, f"tracing the fp32 graph (optimum-onnx, opset {OPSET})")
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=fp32_path.parent) as stage:
        _trace(model, Path(stage) / MODEL_FILE)  # optimum writes beside it; only the loaded graph is kept
        graph = onnx.load(str(Path(stage) / MODEL_FILE))
    tied = model.config.tie_word_embeddings
    tied_once = _store_tied_embedding_once(graph, model) if tied else None
    _save(graph, fp32_path)
    del graph
    timings["trace_s"] = round(time.perf_counter() - t, 2)
    quantization = None
    if precision != "fp32":
        _log(progress, f"converting to {precision}")
        t = time.perf_counter()
        quantization = CONVERTERS[precision](fp32_path, out_path, tied)
        timings[f"{precision}_s"] = round(time.perf_counter() - t, 2)
    return {"tied_embedding_stored_once": tied_once, "quantization": quantization}


def _write_fused(
    model, precision: str, fp32_path: Path, out_path: Path, progress: bool, timings, accuracy_level: int
) -> dict:
    """export/onnx_fused.py's graph, at fp32 (the reference of the checks) and at ``precision``, whose
    decoder projections' MatMulNBits run at ``accuracy_level``."""
    record = {}
    for target, path in {"fp32": fp32_path, precision: out_path}.items():
        _log(progress, f"writing the fused {target} graph (GroupQueryAttention, MatMulNBits; opset {OPSET})")
        t = time.perf_counter()
        proto = build_fused_graph(model, target, accuracy_level=None if target == "fp32" else accuracy_level)
        record = json.loads(next(p.value for p in proto.metadata_props if p.key == "saap.fused"))
        _save(proto, path)
        del proto
        timings[f"fused_{target}_s"] = round(time.perf_counter() - t, 2)
    return {"tied_embedding_stored_once": True if model.config.tie_word_embeddings else None, "fused": record}


@dataclass(frozen=True)
class GraphWriter:
    """One way to write ``model.onnx``: ``write(model, precision, fp32_path, out_path, progress, timings,
    accuracy_level)`` leaves the fp32 graph at ``fp32_path`` and the ``precision`` one at ``out_path`` (the
    same path for fp32) and returns its part of the record; ``genai_config(model)`` is its genai_config.json."""

    precisions: tuple[str, ...]
    write: Callable[..., dict]
    genai_config: Callable[[Any], dict]


def _traced_genai_config(model) -> dict:
    return genai_config(model.config, model.generation_config, MODEL_FILE)


def _fused_genai_config(model) -> dict:
    return fused_genai_config(model)


GRAPHS = {
    "fused": GraphWriter(("fp32", "int8", "int4"), _write_fused, _fused_genai_config),
    "traced": GraphWriter(ONNX_PRECISIONS, _write_traced, _traced_genai_config),
}


def resolve_graph(graph: str, precision: str) -> str:
    """``auto``: the fused graph wherever it has ``precision``, else the traced one; a named graph must have it."""
    if graph == "auto":
        return next(name for name, writer in GRAPHS.items() if precision in writer.precisions)
    if graph not in GRAPHS:
        raise SaapError(f"unknown ONNX graph '{graph}' (choose from {', '.join(ONNX_GRAPHS)})")
    if precision not in GRAPHS[graph].precisions:
        have = ", ".join(GRAPHS[graph].precisions)
        raise SaapError(f"the {graph} ONNX graph has no {precision} form (it has {have}; --graph traced has all)")
    return graph


def _agreement(reference: OnnxSession, path: Path, tokenizer, windows_count: int, timings) -> dict | None:
    """Top-1 agreement of the graph at ``path`` with ``reference`` on the first WikiText-2 windows."""
    windows = agreement_windows(tokenizer, windows_count, AGREEMENT_SEQ_LEN) if windows_count > 0 else None
    if windows is None:
        return None
    t = time.perf_counter()
    value = top1_agreement(reference, _session(path), windows[0])
    timings["agreement_s"] = round(time.perf_counter() - t, 2)
    return {
        "top1_vs_fp32": round(value, 4),
        "windows": len(windows[0]),
        "seq_len": AGREEMENT_SEQ_LEN,
        "text": "wikitext2 test, first windows",
    }


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def export_onnx(
    model: str | Path,
    out: str | Path,
    precision: str = DEFAULT_PRECISION,
    graph: str = DEFAULT_GRAPH,
    overwrite: bool = False,
    progress: bool = True,
    agreement_windows_count: int = AGREEMENT_WINDOWS,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
) -> dict:
    """Export ``model`` (anything ``load_model`` accepts) to the ONNX directory ``out``; returns the report.

    For a quantized precision the report carries the top-1 agreement of its logits with the fp32 graph
    on the first ``agreement_windows_count`` WikiText-2 windows of 128 tokens (when the data set is
    present; 0 skips it). ``graph`` chooses the writer (``GRAPHS``; ``auto``: see ``resolve_graph``);
    ``accuracy_level`` the fused graph's MatMulNBits compute (export/formats.py ``ACCURACY_LEVELS``).
    """
    from saap.runtime.models import load_model

    started = time.perf_counter()
    out = Path(out).expanduser()
    graph = _check_arguments(out, precision, graph, overwrite, accuracy_level)
    _log(progress, f"loading {model}")
    loaded = load_model(str(model))
    torch_model, tokenizer = loaded.model, loaded.tokenizer
    _check_family(graph, torch_model)
    timings: dict[str, float] = {}

    with atomic_dir(out, overwrite) as tmp, tempfile.TemporaryDirectory(dir=tmp) as stage_dir:
        fp32_path = tmp / MODEL_FILE if precision == "fp32" else Path(stage_dir) / "fp32" / MODEL_FILE
        fp32_path.parent.mkdir(exist_ok=True)
        written = GRAPHS[graph].write(
            torch_model, precision, fp32_path, tmp / MODEL_FILE, progress, timings, accuracy_level
        )

        fp32_session = _session(fp32_path)
        fp32_diff = max_abs_diff_vs_torch(torch_model, fp32_session)
        _log(progress, f"fp32 graph: max |logits - torch| = {fp32_diff:.2e}")
        agreement = None
        if precision != "fp32":
            agreement = _agreement(fp32_session, tmp / MODEL_FILE, tokenizer, agreement_windows_count, timings)
            if agreement is not None:
                value, n = agreement["top1_vs_fp32"], agreement["windows"]
                _log(progress, f"{precision}: top-1 agreement with fp32 = {value:.1%} over {n} windows")
        del fp32_session

        torch_model.config.save_pretrained(tmp)
        if torch_model.generation_config is not None:
            torch_model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        family_of(torch_model).write_notice(tmp)
        write_genai_files(tmp, GRAPHS[graph].genai_config(torch_model))

        files = {
            p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir()) if p.is_file()
        }
        record = {
            "format_version": FORMAT_VERSION,
            "format": "onnx",
            "precision": precision,
            "graph": graph,
            "accuracy_level": accuracy_level,
            "opset": OPSET,
            "source": loaded.source,
            "layers": [shape.as_dict() for shape in layer_shapes(torch_model.config)],
            "head_dim": head_dim(torch_model.config),
            **written,
            "checks": {"fp32_max_abs_logit_diff_vs_torch": fp32_diff, "agreement": agreement},
            "exporter": {
                "optimum-onnx": _package_version("optimum-onnx"),
                "torch": _package_version("torch"),
                "onnx": _package_version("onnx"),
                "onnxruntime": _package_version("onnxruntime"),
            },
            "timings": timings,
            "files": files,
        }
        write_json_atomic(tmp / RECORD_FILE, record)

    seconds = round(time.perf_counter() - started, 1)
    model_bytes = sum(v["bytes"] for k, v in files.items() if k.startswith(MODEL_FILE))
    _log(progress, f"wrote {out} ({model_bytes / 1e6:.1f} MB of weights) in {seconds} s")
    return {**record, "path": str(out), "seconds": seconds, "model_bytes": model_bytes}

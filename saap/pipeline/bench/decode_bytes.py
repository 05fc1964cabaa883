"""Weight bytes read per decoded token, from the artifact itself: the ideal speed-up's numerator and
denominator. Every matrix of every layer, the final norm and the output projection are read per token;
of the embedding table one row is (when it is tied it is the output projection and is read whole)."""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFReader

from saap.pipeline.bench.settings import ENGINE_FORMATS, RunConfig
from saap.runtime.onnx_engine import resolve_onnx_path


def total_parameter_count(config) -> int:
    from saap.runtime.surgery import layer_parameter_count, layer_shapes  # torch: only when counting

    embed = config.vocab_size * config.hidden_size
    head = 0 if getattr(config, "tie_word_embeddings", True) else embed
    return sum(layer_parameter_count(config, s) for s in layer_shapes(config)) + embed + head + config.hidden_size


def parameter_counts(config) -> dict[str, int]:
    """A model's entry in the document: all its parameters, and those read per decoded token."""
    from saap.runtime.surgery import decode_parameter_count, layer_shapes  # torch: only when counting

    return {
        "params": total_parameter_count(config),
        "decode_params": decode_parameter_count(config, layer_shapes(config)),
    }


def torch_decode_bytes(config, dtype_bytes: int = 4) -> int:
    from saap.runtime.surgery import decode_parameter_count, layer_shapes  # torch: only when counting

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
    reader = GGUFReader(str(path))
    return [(t.name, int(t.n_bytes), int(t.shape[-1]) if len(t.shape) > 1 else 1) for t in reader.tensors]


def onnx_decode_bytes(initializers: dict[str, int], consumers: dict[str, set[str]]) -> int:
    """``initializers``: name -> bytes; ``consumers``: name -> op types using it. A table used only by
    Gather ops (an untied embedding) is a lookup, not a read of the whole table."""
    lookups = {"Gather", "GatherBlockQuantized"}
    return sum(n for name, n in initializers.items() if not consumers.get(name) or not consumers[name] <= lookups)


def read_onnx_initializers(model_file: Path) -> tuple[dict[str, int], dict[str, set[str]]]:
    import onnx  # protobuf and its generated modules: only ONNX runs pay for them
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


def decode_bytes(run: RunConfig, artifact: Path, config) -> int:
    if ENGINE_FORMATS[run.engine] == "gguf":
        return gguf_decode_bytes(read_gguf_tensors(artifact))
    if ENGINE_FORMATS[run.engine] == "onnx":
        return onnx_decode_bytes(*read_onnx_initializers(resolve_onnx_path(artifact)))
    return torch_decode_bytes(config)

"""Ready exports handed to the bench (``BenchSettings.exports``, ``saap bench --exports``): a file that the
run's export stages already wrote is measured as it is, instead of exporting its checkpoint once more.

An export is matched to a benchmarked model by the sha256 of the weights it was exported from, which both
formats record: ONNX in ``saap-onnx.json`` (``source.sha256``; its ``precision`` is the quantization), GGUF
in its metadata (``saap.source_weights_sha256``, else the ``sha256`` inside ``saap.source``).

A GGUF records its quantization only as llama.cpp does, so it is derived: ``general.file_type`` names it
(saap's writer sets it for f32/f16/bf16, llama.cpp's quantizer to the type it was asked for), confirmed
by a matrix of that type among the tensors. A small or oddly pruned model can have every matrix fall back
to another type (rows not a multiple of the block), and another tool's file_type may be wrong: then the
file name's ``-<quant>.gguf`` (``model-q8_0.gguf``, as the run's export stage names it) decides. A file
with neither is refused rather than guessed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import gguf

from saap.pipeline.bench.settings import ENGINE_FORMATS, ENGINE_QUANTS, BenchModel, RunConfig
from saap.runtime.errors import SaapError
from saap.runtime.gguf_engine import check_gguf_file
from saap.runtime.onnx_engine import RECORD_FILE

FILE_TYPES = {  # general.file_type -> the quantization that writes it
    gguf.LlamaFileType.ALL_F32: "f32",
    gguf.LlamaFileType.MOSTLY_F16: "f16",
    gguf.LlamaFileType.MOSTLY_BF16: "bf16",
    gguf.LlamaFileType.MOSTLY_Q8_0: "q8_0",
    gguf.LlamaFileType.MOSTLY_Q4_0: "q4_0",
    gguf.LlamaFileType.MOSTLY_Q4_1: "q4_1",
    gguf.LlamaFileType.MOSTLY_Q4_K_M: "q4_k_m",
    gguf.LlamaFileType.MOSTLY_Q5_K_M: "q5_k_m",
}
GUESSED = gguf.LlamaFileType.GUESSED  # a flag or-ed into file_type by converters that guessed it
NOMINAL_TYPES = {  # quantization -> the tensor type of its matrices whose rows fit the blocks
    "f32": "F32",
    "f16": "F16",
    "bf16": "BF16",
    "q8_0": "Q8_0",
    "q4_0": "Q4_0",
    "q4_1": "Q4_1",
    "q4_k_m": "Q4_K",
    "q5_k_m": "Q5_K",
}
QUANT_IN_NAME = re.compile(r"-(" + "|".join(ENGINE_QUANTS["gguf"]) + r")\.gguf$")


@dataclass(frozen=True)
class GivenExport:
    path: Path
    engine: str  # onnx | gguf
    quant: str
    source_sha256: str


ExportIndex = dict[tuple[str, str, str], GivenExport]  # (source weights sha256, engine, quant) -> export


def read_export(spec: str) -> GivenExport:
    path = Path(spec).expanduser()
    if path.is_dir() and (path / RECORD_FILE).is_file():
        return _onnx_export(path)
    if path.suffix == ".gguf" or path.is_file():
        return _gguf_export(path)
    if not path.exists():
        raise SaapError(f"export '{spec}' does not exist")
    raise SaapError(f"export '{spec}' is neither a .gguf file nor an ONNX export directory (no {RECORD_FILE})")


def _onnx_export(path: Path) -> GivenExport:
    try:
        record = json.loads((path / RECORD_FILE).read_text())
    except (OSError, ValueError) as e:
        raise SaapError(f"cannot read '{path / RECORD_FILE}': {e}") from None
    sha = (record.get("source") or {}).get("sha256")
    precision = record.get("precision")
    if not sha:
        raise SaapError(f"export '{path}' does not record the sha256 of its source weights ({RECORD_FILE})")
    if precision not in ENGINE_QUANTS["onnx"]:
        raise SaapError(f"export '{path}' has no known precision in {RECORD_FILE} ({precision!r})")
    return GivenExport(path, "onnx", precision, sha)


def _field(reader: gguf.GGUFReader, key: str):
    found = reader.fields.get(key)
    return None if found is None else found.contents()


def _gguf_export(path: Path) -> GivenExport:
    check_gguf_file(path)  # missing or truncated: its own one-line error
    reader = gguf.GGUFReader(str(path))
    sha = _field(reader, "saap.source_weights_sha256")
    if not sha and _field(reader, "saap.source"):
        sha = json.loads(_field(reader, "saap.source")).get("sha256")
    if not sha:
        raise SaapError(f"export '{path}' does not record the sha256 of its source weights (not a saap export)")
    return GivenExport(path, "gguf", gguf_quant(reader, path), sha)


def gguf_quant(reader: gguf.GGUFReader, path: Path) -> str:
    """The quantization of a GGUF file (see the module docstring for why in this order)."""
    file_type = _field(reader, "general.file_type")
    by_type = FILE_TYPES.get(int(file_type) & ~GUESSED) if file_type is not None else None
    match = QUANT_IN_NAME.search(path.name)
    by_name = match.group(1) if match else None
    if by_type and (by_name is None or by_name == by_type or _has_matrix_of(reader, NOMINAL_TYPES[by_type])):
        return by_type
    if by_name:
        return by_name
    raise SaapError(
        f"cannot tell the quantization of '{path}': its general.file_type ({file_type}) is none of "
        f"{', '.join(ENGINE_QUANTS['gguf'])} and its name does not end in -<quant>.gguf"
    )


def _has_matrix_of(reader: gguf.GGUFReader, tensor_type: str) -> bool:
    return any(t.tensor_type.name == tensor_type for t in reader.tensors if len([n for n in t.shape if n > 1]) >= 2)


def index_exports(specs: list[str]) -> ExportIndex:
    """Every given export by (source weights sha256, engine, quant); two different files for one key are
    ambiguous and refused (the same file named twice is one)."""
    index: ExportIndex = {}
    for spec in specs:
        export = read_export(spec)
        key = (export.source_sha256, export.engine, export.quant)
        other = index.get(key)
        if other is not None and other.path.resolve() != export.path.resolve():
            raise SaapError(
                f"exports '{other.path}' and '{export.path}' are both {export.engine} {export.quant} "
                "of the same weights: give one"
            )
        index[key] = export
    return index


def weights_sha256(model: BenchModel) -> str | None:
    """The sha256 of the weights ``model`` is loaded from, as ``saap.runtime.models.load_model`` records it in
    an export's source (None for a ready artifact, which is measured as it is)."""
    from saap.runtime.checkpoint import WEIGHTS_FILE, read_metadata, sha256_file  # torch
    from saap.runtime.models import resolve_alias

    if model.weights_sha256 is None:
        if model.kind == "checkpoint":
            model.weights_sha256 = read_metadata(model.spec)["files"][WEIGHTS_FILE]
        elif model.kind == "alias":
            model.weights_sha256 = sha256_file(resolve_alias(model.spec))
        elif model.kind == "hf":
            weights = sorted(Path(model.spec).glob("*.safetensors"))
            model.weights_sha256 = sha256_file(weights[0]) if len(weights) == 1 else None
    return model.weights_sha256


def check_sources(index: ExportIndex, models: list[BenchModel]) -> None:
    """Every given export must be of one of the benchmarked models: one that is not would silently not
    be measured, which is a mistake in the command (a stale file, the wrong run's directory)."""
    if not index:
        return
    known = {weights_sha256(m) for m in models if m.kind in ("checkpoint", "alias", "hf")} - {None}
    for export in index.values():
        if export.source_sha256 not in known:
            labels = ", ".join(m.label for m in models)
            raise SaapError(
                f"export '{export.path}' was made from weights {export.source_sha256[:16]}, "
                f"which are none of the benchmarked models' ({labels})"
            )


def given_export(index: ExportIndex, model: BenchModel, run: RunConfig) -> Path | None:
    """The given export of ``model`` for ``run``'s engine and quantization, if there is one."""
    if not index or model.kind not in ("checkpoint", "alias", "hf"):
        return None
    export = index.get((weights_sha256(model), ENGINE_FORMATS[run.engine], run.quant))
    return export.path if export else None

"""The Python API: each pipeline stage as one call, for notebooks and scripts.

Every function here is a thin front to the stage the ``saap`` command runs, with the same defaults
(each defined once, in the stage's settings class) and the same ``SaapError`` on bad input::

    import saap

    model = saap.load("smollm2-135m")                        # the embedded SmolLM2-135M-Instruct
    pruned = saap.prune(model, ratio=0.2, out="pruned")      # SAAP, 20 % of the parameters; saved
    saap.perplexity(pruned.model, pruned.tokenizer, "wikitext2", limit=32)   # shipped WikiText-2
    saap.export_gguf("pruned", "pruned.gguf", "q8_0")        # llama.cpp
    saap.export_onnx("pruned", "pruned-onnx", "int8")        # ONNX Runtime / onnxruntime-genai
    saap.run()                                               # the whole default pipeline (``saap run``)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from saap.export.gguf import export_gguf
from saap.export.onnx import export_onnx
from saap.pipeline.bench import BenchSettings, run_bench
from saap.pipeline.config import DEFAULT_CONFIG, check_semantics, find_config, load_config
from saap.pipeline.evaluate import perplexity
from saap.pipeline.finetune import FinetuneSettings
from saap.pipeline.finetune import finetune as _finetune
from saap.pipeline.prune import PruneSettings
from saap.pipeline.prune import prune as _prune
from saap.runtime.checkpoint import save_checkpoint
from saap.runtime.models import LoadedModel
from saap.runtime.models import load_model as load

__all__ = ["Pruned", "bench", "export_gguf", "export_onnx", "finetune", "load", "perplexity", "prune", "run"]


class Pruned(NamedTuple):
    """What ``prune`` returns: the pruned model (its matrices physically smaller) and its record."""

    loaded: LoadedModel
    record: dict[str, Any]  # saap.json: budget, per-layer shapes, parameters before and after

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer


def prune(
    model: str | LoadedModel,
    ratio: float | None = None,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **settings: Any,
) -> Pruned:
    """Prune ``model`` (anything ``load`` accepts, or a loaded model, pruned in place).

    ``settings``: any ``saap prune`` flag with ``-`` written ``_`` (``method="flap"``, ``align=32``,
    ``target_speedup=1.5, engine="gguf:q8_0"``). ``out``: also save the checkpoint there."""
    loaded = load(model) if isinstance(model, str | Path) else model
    chosen = PruneSettings(**({"ratio": ratio} if ratio is not None else {}), **settings)
    record = _prune(loaded, chosen, progress=progress)
    if out is not None:
        save_checkpoint(loaded.model, loaded.tokenizer, out, record, overwrite=overwrite)
    return Pruned(loaded, record)


def finetune(
    model: str | Path,
    data: str | list[str],
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Recover a pruned checkpoint (``saap finetune``): ``teacher="parent"`` distils from its dense parent.
    Returns the record written to ``out/saap.json``."""
    return _finetune(str(model), data, str(out), FinetuneSettings(**settings), progress, overwrite)


def bench(models: list[str], *, progress: bool = True, **settings: Any) -> dict[str, Any]:
    """Interleaved throughput of ``models`` (``saap bench``); ``settings``: its flags (``engines=["gguf"]``)."""
    return run_bench(BenchSettings(models=list(models), **settings), progress=progress)


def run(config: str | Path = DEFAULT_CONFIG, **options: Any) -> list[dict]:
    """The whole pipeline of a run config (a file, or the name of one that ships with saap), resumable;
    ``options``: ``from_stage``, ``until_stage``, ``force``, ``verbose``. One summary row per stage."""
    from saap.pipeline.run import run_pipeline

    path = find_config(config)
    loaded = load_config(path)
    check_semantics(loaded, str(path))
    return run_pipeline(loaded, path, **options)

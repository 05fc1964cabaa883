"""``saap bench``: prefill / decode throughput of dense and pruned models on each engine, and a
regression check against a stored baseline.

Public API (the ``saap bench`` command and the ``saap run`` orchestrator use these):

    settings = BenchSettings(models=["smollm2-135m", "p20=artifacts/saap-p20"], engines=["torch", "gguf"],
                             quantizations={"gguf": ["q8_0"]}, prompt_tokens=[128], gen_tokens=64,
                             exports=["artifacts/run/export-gguf/model-q8_0.gguf"])
    doc = run_bench(settings, progress=True)      # the JSON document (schema in the README)
    write_outputs(doc, "bench.json")              # bench.json + bench.md (table) + bench.png (bar chart)
    print(format_table(doc))                      # the terminal table, failures and noise warnings under it
    regressions = compare(doc, baseline_doc, tolerance=0.10)   # [] when nothing regressed
    print(format_regressions(regressions))
    load_target("jetson-orin")                    # saap/pipeline/bench/targets/jetson-orin.yaml as a dict

Pure helpers, unit-tested: ``summarize`` (median/min/max), ``paired_speedup``, ``gguf_decode_bytes``,
``onnx_decode_bytes``, ``torch_decode_bytes``, ``flatten_metrics``, ``hardware_fingerprint``,
``row_warnings``, ``split_label``.

How it measures. Each (model, engine, device, quantization, threads) runs in its own child process
(``saap.pipeline.bench.worker``), so its peak RSS (VmHWM) is its own. Within one (engine, device, quantization,
threads) group one child per model stays alive and the repeats alternate between them (A B A B ...,
reversed every other round), after ``warmup`` unmeasured runs each: slow phases of a shared machine
hit every model alike, and the per-repeat ratio of a pruned model to its dense parent cancels them.
Every model gets the same fixed token ids (prefill P, then G decode steps of fixed ids, not its own
argmax), so dense and pruned do exactly the same work. A row is warned about when the 1-min load
average passed the core count while it was measured, or its repeats' decode tok/s spread over 10 %.

The ideal speed-up is the quotient of the weight bytes read per generated token (dense / pruned) at
the engine's quantization: memory-bound decode cannot beat it. It is read from the artifact itself
(GGUF tensor sizes, ONNX initializers; for torch ``decode_parameter_count`` x 4 bytes): every matrix
of every layer, the final norm and the output projection, but not the embedding table, of which a
decode step reads one row (when the embedding is tied it is the output projection and is read whole).
Efficiency = measured / ideal.

Artifacts. A ``--models`` entry is an alias, a checkpoint or HF dir, or a ready artifact (a .gguf file,
an ONNX export directory, which runs only on its own engine); ``NAME=PATH`` labels it. For onnx / gguf a
checkpoint (and the ``smollm2-135m`` alias) is measured through a given export of the same weights
(``exports``, matched by the source sha256 each export records) or else exported once per quantization
into ``<cache>/exports/<weights sha256[:16]>/`` and reused. Each result row says which file it measured
(``artifact``) and whether the bench ``exported`` it or it was ``given``.

The package, one module per concern: ``settings`` (BenchSettings, RunConfig, BenchModel, constants),
``stats``, ``decode_bytes``, ``models`` (what an entry is, labels, parents), ``exports`` (the index of
given exports), ``artifacts`` (what each engine loads), ``plan`` (targets, the plan, preflight),
``environment``, ``running`` (workers, the interleaved rounds, the document), ``results`` (speed-ups,
references), ``noise`` (warnings), ``outputs`` (table, markdown, chart) and ``regression``.
"""

from __future__ import annotations

from saap.pipeline.bench.artifacts import (
    Artifact,
    artifact_bytes,
    export_cache,
    fits,
    gguf_config,
    model_config,
    prepare_artifact,
    requantize_llamacpp,
    torch_artifact,
)
from saap.pipeline.bench.decode_bytes import (
    decode_bytes,
    gguf_decode_bytes,
    onnx_decode_bytes,
    parameter_counts,
    read_gguf_tensors,
    read_onnx_initializers,
    torch_decode_bytes,
    total_parameter_count,
)
from saap.pipeline.bench.environment import environment, hardware_fingerprint, load_average_1m
from saap.pipeline.bench.exports import ExportIndex, GivenExport, check_sources, gguf_quant, index_exports, read_export
from saap.pipeline.bench.models import classify, resolve_models, split_label
from saap.pipeline.bench.noise import SPREAD_LIMIT, row_warnings, warning_lines
from saap.pipeline.bench.outputs import format_references, format_table, markdown_report, plot, write_outputs
from saap.pipeline.bench.plan import list_targets, load_target, physical_cores, plan, preflight
from saap.pipeline.bench.regression import Metric, compare, flatten_metrics, format_regressions, load_document
from saap.pipeline.bench.results import failures, references, speedups
from saap.pipeline.bench.running import Worker, WorkerDied, run_bench  # WORKER_ARGS: patch it in .running
from saap.pipeline.bench.settings import (
    DEFAULT_QUANTS,
    ENGINE_DEVICES,
    ENGINE_QUANTS,
    GENAI_REF,
    LLAMACPP_REF,
    PROJECT,
    SCHEMA,
    SLOWDOWN_ENV,
    TARGETS_DIR,
    BenchModel,
    BenchSettings,
    RunConfig,
    slowdown_from_env,
    validate,
)
from saap.pipeline.bench.stats import paired_speedup, relative_spread, summarize

__all__ = [
    "DEFAULT_QUANTS",
    "ENGINE_DEVICES",
    "ENGINE_QUANTS",
    "GENAI_REF",
    "LLAMACPP_REF",
    "PROJECT",
    "SCHEMA",
    "SLOWDOWN_ENV",
    "SPREAD_LIMIT",
    "TARGETS_DIR",
    "Artifact",
    "BenchModel",
    "BenchSettings",
    "ExportIndex",
    "GivenExport",
    "Metric",
    "RunConfig",
    "Worker",
    "WorkerDied",
    "artifact_bytes",
    "check_sources",
    "classify",
    "compare",
    "decode_bytes",
    "environment",
    "export_cache",
    "failures",
    "fits",
    "flatten_metrics",
    "format_references",
    "format_regressions",
    "format_table",
    "gguf_config",
    "gguf_decode_bytes",
    "gguf_quant",
    "hardware_fingerprint",
    "index_exports",
    "list_targets",
    "load_average_1m",
    "load_document",
    "load_target",
    "markdown_report",
    "model_config",
    "onnx_decode_bytes",
    "paired_speedup",
    "parameter_counts",
    "physical_cores",
    "plan",
    "plot",
    "preflight",
    "prepare_artifact",
    "read_export",
    "read_gguf_tensors",
    "read_onnx_initializers",
    "references",
    "relative_spread",
    "requantize_llamacpp",
    "resolve_models",
    "row_warnings",
    "run_bench",
    "slowdown_from_env",
    "speedups",
    "split_label",
    "summarize",
    "torch_artifact",
    "torch_decode_bytes",
    "total_parameter_count",
    "validate",
    "warning_lines",
    "write_outputs",
]

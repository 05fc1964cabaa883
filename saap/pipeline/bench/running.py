"""Running the plan: one ``saap.pipeline.bench.worker`` child per (model, group), the repeats interleaved
between them, and the JSON document."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from saap.pipeline.bench.artifacts import Artifact, artifact_bytes, fits, model_config, prepare_artifact, torch_artifact
from saap.pipeline.bench.decode_bytes import decode_bytes, parameter_counts
from saap.pipeline.bench.environment import environment, load_average_1m
from saap.pipeline.bench.exports import ExportIndex, check_sources, index_exports
from saap.pipeline.bench.models import resolve_models
from saap.pipeline.bench.noise import row_warnings
from saap.pipeline.bench.plan import plan, preflight
from saap.pipeline.bench.results import references, speedups
from saap.pipeline.bench.settings import (
    ENGINE_FORMATS,
    GENAI_REF,
    LLAMACPP_REF,
    SCHEMA,
    SLOWDOWN_ENV,
    BenchModel,
    BenchSettings,
    RunConfig,
    validate,
)
from saap.pipeline.bench.stats import summarize
from saap.runtime.errors import SaapError
from saap.runtime.gguf_engine import crash_message
from saap.runtime.native import child_env, exit_description, verbose

WORKER_ARGS = ["-m", "saap.pipeline.bench.worker"]  # the child's command line after the interpreter


class WorkerDied(SaapError):
    """A worker ended without answering: killed by a signal (a native crash) or exited mid-protocol."""


class Worker:
    """A ``saap.pipeline.bench.worker`` child holding one loaded engine. Its stderr (llama.cpp's load log
    among it) goes to a file: the last line says why a child died, and ``SAAP_VERBOSE`` shows it all."""

    def __init__(self, config: dict[str, Any], site: Path | None = None):
        """``site``: a directory of packages imported ahead of this environment's (another llama-cpp-python
        build, for benchmarks/llama_cpp_builds.py)."""
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
            return crash_message(f"(benchmark worker for {what})", self.proc.returncode)
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
        self._release_stderr()
        # the child's own high-water mark: wait4's ru_maxrss would include this parent's RSS at fork
        return {"peak_rss_mb": final.get("peak_rss_mb"), "peak_gpu_mb": final.get("peak_gpu_mb")}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._release_stderr()

    def _release_stderr(self) -> None:
        if self.stderr.closed:
            return
        if verbose():
            self.stderr.seek(0)
            sys.stderr.write(self.stderr.read())
            sys.stderr.flush()
        self.stderr.close()


@dataclass
class Prepared:
    """A model ready to measure in a group: what its engine loads, and what that costs per token."""

    model: BenchModel
    artifact: Artifact
    size: int  # bytes on disk
    weight_bytes: int  # read per decoded token


@dataclass
class Group:
    """One (engine, device, quantization, threads) group as it runs."""

    run: RunConfig
    prepared: list[Prepared]
    workers: dict[str, Worker] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # label -> why its worker died; the others go on
    samples: dict[str, dict[int, dict[str, list[float]]]] = field(default_factory=dict)
    memory: dict[str, dict[str, float | None]] = field(default_factory=dict)
    load_average_1m: float | None = None  # the highest seen after a measured round

    @property
    def labels(self) -> list[str]:
        return [p.model.label for p in self.prepared]


def _progress(total: int, enabled: bool) -> tqdm | None:
    return tqdm(total=total, desc="bench", unit="run", file=sys.stderr, dynamic_ncols=True) if enabled else None


def _describe(bar: tqdm | None, text: str) -> None:
    if bar is not None:
        bar.set_description(text)


def run_bench(settings: BenchSettings, progress: bool = True) -> dict[str, Any]:
    """Measure every model on every planned run; return the JSON document."""
    validate(settings)
    runs = plan(settings)
    preflight(runs, settings.target)
    models = _models(settings, runs)
    given = index_exports(settings.exports)
    check_sources(given, models)  # a stray export fails here, before anything is measured
    groups = _groups(runs, models, settings)
    n_ctx = max(settings.prompt_tokens) + settings.gen_tokens + 8
    total = sum(len(ms) * len(settings.prompt_tokens) * (settings.warmup + settings.repeats) for _, ms in groups)
    bar = _progress(total, progress)
    started = time.time()
    env = environment(runs)
    results, info = [], {}
    try:
        for run, group in groups:
            results.extend(_run_group(run, group, settings, n_ctx, info, bar, progress, given))
    finally:
        if bar is not None:
            bar.close()
    return _document(settings, env, models, info, results, started)


def _models(settings: BenchSettings, runs: list[RunConfig]) -> list[BenchModel]:
    """The benchmarked models, each ready artifact on an engine that is run, plus llama.cpp's own files."""
    models = resolve_models(settings.models)
    engines = {r.engine for r in runs}
    for model in models:
        runs_on = [e for e, fmt in ENGINE_FORMATS.items() if fmt == model.kind]
        if model.kind in ("gguf", "onnx") and not engines & set(runs_on):
            raise SaapError(
                f"'{model.spec}' is a {model.kind.upper()} artifact: it runs on engine {' or '.join(runs_on)}, "
                f"which is not among --engines {','.join(sorted(engines))}"
            )
    aliases = [m for m in models if m.kind == "alias"]
    if settings.llamacpp_reference:
        for alias in aliases:
            models.append(BenchModel(alias.label + LLAMACPP_REF, alias.spec, "llamacpp-ref", reference_of=alias.spec))
    if settings.genai_reference:
        from saap.export.genai_builder import check_builder

        check_builder(settings.genai_reference)  # before anything is measured
        for alias in aliases:
            models.append(
                BenchModel(
                    alias.label + GENAI_REF,
                    alias.spec,
                    "genai-ref",
                    reference_of=alias.spec,
                    builder=settings.genai_reference,
                )
            )
    return models


def _groups(
    runs: list[RunConfig], models: list[BenchModel], settings: BenchSettings
) -> list[tuple[RunConfig, list[BenchModel]]]:
    # A reference runs only at the types its own tool makes: llama.cpp's file is requantized by llama.cpp to
    # its quantized types, onnxruntime-genai's builder has its own precisions (no int8).
    made_at: dict[str, Collection[str]] = {}
    if settings.llamacpp_reference:
        from saap.export.gguf import LLAMA_QUANTS  # torch

        made_at["llamacpp-ref"] = LLAMA_QUANTS
    if settings.genai_reference:
        from saap.export.genai_builder import BUILDER_PRECISIONS

        made_at["genai-ref"] = BUILDER_PRECISIONS
    groups = [
        (run, [m for m in models if fits(m, run.engine) and run.quant in made_at.get(m.kind, [run.quant])])
        for run in runs
    ]
    return [(run, ms) for run, ms in groups if ms]


def _document(
    settings: BenchSettings, env: dict, models: list[BenchModel], info: dict, results: list[dict], started: float
) -> dict[str, Any]:
    for row in results:
        row["warnings"] = row_warnings(row, env["logical_cores"])
    doc = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": round(time.time() - started, 1),
        "settings": asdict(settings),
        "environment": env,
        "models": {
            m.label: info.get(m.label, {}) | {"spec": m.spec, "kind": m.kind, "parent": m.parent} for m in models
        },
        "results": results,
    }
    doc["speedups"] = speedups(doc)
    doc["references"] = references(doc)
    return doc


def _run_group(
    run: RunConfig,
    models: list[BenchModel],
    settings: BenchSettings,
    n_ctx: int,
    info: dict,
    bar: tqdm | None,
    progress: bool,
    given: ExportIndex,
) -> list[dict[str, Any]]:
    group = Group(run, [_prepare(run, m, info, bar, progress, given) for m in models])
    try:
        _start_workers(group, settings, n_ctx, bar)
        _measure_rounds(group, settings, bar)
        _stop_workers(group)
    finally:
        for w in group.workers.values():
            w.kill()
    return [_row(group, item, settings) for item in group.prepared]


def _prepare(
    run: RunConfig, model: BenchModel, info: dict, bar: tqdm | None, progress: bool, given: ExportIndex
) -> Prepared:
    """The model's artifact for ``run``, its size, its weight bytes per token, and (once) its parameters."""
    _describe(bar, f"prepare {model.label} {run.key}")
    artifact = prepare_artifact(model, run, progress=progress, given=given)
    if run.engine == "torch":
        config = model_config(model, artifact.path)
        size = artifact_bytes(torch_artifact(model))
    else:  # an alias's config is loaded once: it is the whole model
        config = model_config(model, artifact.path) if model.kind != "alias" or model.label not in info else None
        size = artifact_bytes(artifact.path)
    if model.label not in info and config is not None:
        info[model.label] = parameter_counts(config)
    return Prepared(model, artifact, size, decode_bytes(run, artifact.path, config))


def _row(group: Group, item: Prepared, settings: BenchSettings) -> dict[str, Any]:
    run, label = group.run, item.model.label
    row = {
        "model": label,
        "engine": run.engine,
        "device": run.device,
        "quant": run.quant,
        "threads": run.threads,
        "n_gpu_layers": run.n_gpu_layers,
        "artifact": str(item.artifact.path),
        "artifact_origin": item.artifact.origin,
        "artifact_bytes": item.size,
        "decode_weight_bytes": item.weight_bytes,
        "load_average_1m": group.load_average_1m,
    }
    if label in group.failed:
        return row | {"failed": group.failed[label], "by_prompt": {}}
    row |= {"load_s": group.workers[label].ready.get("load_s"), **group.memory[label]}
    return row | {"by_prompt": _by_prompt(group.samples[label], settings)}


def _start_workers(group: Group, settings: BenchSettings, n_ctx: int, bar: tqdm | None) -> None:
    """One loaded worker per model; a worker that dies while loading joins ``failed``."""
    run = group.run
    for item in group.prepared:
        _describe(bar, f"load {item.model.label} {run.key}")
        config = {
            "engine": run.engine,
            "artifact": str(item.artifact.path),
            "device": run.device,
            "threads": run.threads,
            "n_ctx": n_ctx,
            "n_gpu_layers": run.n_gpu_layers,
            "slowdown": settings.slowdown if item.model.parent else 1.0,
        }
        try:
            group.workers[item.model.label] = Worker(config)
        except WorkerDied as e:
            group.failed[item.model.label] = str(e)


def _measure_rounds(group: Group, settings: BenchSettings, bar: tqdm | None) -> None:
    """Every prompt length, warm-up and repeat: each live model once, A B A B, reversed every other
    round so neither model always runs right after the other. A worker that dies joins ``failed``.
    After each measured round the 1-min load average is read: the noise warnings' evidence."""
    order = group.labels
    group.samples = {
        label: {p: {"prefill_s": [], "decode_s": [], "ttft_s": []} for p in settings.prompt_tokens} for label in order
    }
    for p in settings.prompt_tokens:
        for round_ in range(settings.warmup + settings.repeats):
            for label in order if round_ % 2 == 0 else order[::-1]:
                _describe(bar, f"{label} {group.run.key} p{p}")
                if label not in group.failed:
                    _measure_one(group, label, p, settings, measured=round_ >= settings.warmup)
                if bar is not None:
                    bar.update(1)
            if round_ >= settings.warmup:
                load = load_average_1m()
                if load is not None:
                    group.load_average_1m = max(load, group.load_average_1m or 0.0)


def _measure_one(group: Group, label: str, prompt: int, settings: BenchSettings, measured: bool) -> None:
    try:
        result = group.workers[label].measure(prompt, settings.gen_tokens)
    except WorkerDied as e:
        group.failed[label] = str(e)
        return
    if measured:
        for k, values in group.samples[label][prompt].items():
            values.append(result[k])


def _stop_workers(group: Group) -> None:
    """Each live worker's peak memory as it quits."""
    for label, w in group.workers.items():
        if label not in group.failed:
            try:
                group.memory[label] = w.close()
            except WorkerDied as e:
                group.failed[label] = str(e)


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

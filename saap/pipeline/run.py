"""``saap run config.yaml``: the whole pipeline, one resumable stage at a time.

    load -> prune -> finetune -> eval -> export-onnx -> export-gguf -> bench -> report

Each stage writes ``<artifacts_dir>/<name>/<stage>/`` and, last, its ``stage.json``: the inputs and
their sha256, the settings, the exact commands, every output file's sha256, wall time and peak RSS.
A stage runs in a temporary sibling directory renamed into place when it succeeds, so a crash (even
``kill -9``) leaves no half-written stage behind, only a ``.tmp`` directory the next run removes.

A stage is skipped when its *key* (settings + the sha256 of its inputs) matches the recorded one and
its outputs still verify. Inputs are upstream outputs, so a changed setting reruns its stage, and
everything downstream whose inputs then change. Stages other than load and report are ``saap`` verbs
run as child processes: the same commands a user would type, each with its own peak RSS.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saap.pipeline.config import RunConfig
from saap.runtime.errors import SaapError
from saap.runtime.io import swap_in

STAGES = ("load", "prune", "finetune", "eval", "export-onnx", "export-gguf", "bench", "report")
STAGE_FILE = "stage.json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` but its stage.json, by relative path."""
    from saap.runtime.checkpoint import sha256_file

    return {
        str(p.relative_to(directory)): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != STAGE_FILE
    }


def subtree_digest(files: dict[str, str], prefix: str) -> str:
    """One sha256 for the files of a manifest under ``prefix`` (a file or a directory)."""
    chosen = {k: v for k, v in files.items() if k == prefix or k.startswith(prefix.rstrip("/") + "/")}
    if not chosen:
        raise SaapError(f"stage output '{prefix}' is missing")
    return sha256_bytes(json.dumps(chosen, sort_keys=True).encode())


def _die_with_parent() -> None:
    """Children die with the orchestrator (kill -9 included), so no stage outlives its run."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class ChildResult:
    wall_s: float
    peak_rss_mb: int
    error: str | None = None  # the child's one-line error, with check=False


PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar: "Running ...:  42%|████      | 84/200 [...]"


def run_saap(
    args: list[str], log: Path, check: bool = True, progress: Callable[[str], None] | None = None
) -> ChildResult:
    """``saap ARGS`` in a child process, its stdout into ``log``.

    Its stderr (library warnings, progress bars, llama.cpp's C-level logging) goes to our stderr
    as it comes, or with ``progress`` given, into ``log`` too, and only its progress bars reach
    ``progress`` (tqdm redraws with ``\r``, which text mode reads as a line end). A non-zero exit
    raises (``check``) or comes back as ``error``.
    """
    started = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"$ saap {' '.join(args)}\n")
        out.flush()
        child = subprocess.Popen(
            [sys.executable, "-m", "saap.pipeline.cli", *args],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        errors = []
        for line in child.stderr:  # keep the last lines for the error message
            is_bar = bool(PROGRESS.search(line))
            if progress is None:
                sys.stderr.write(line)
            elif is_bar:
                progress(line.strip())
            if not is_bar:
                if progress is not None:
                    out.write(line)
                    out.flush()
                errors = (errors + [line.strip()])[-3:]
        _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    result = ChildResult(time.perf_counter() - started, round(usage.ru_maxrss / 1024))
    if code != 0:
        from saap.runtime.native import exit_description

        reason = next((e for e in reversed(errors) if e.startswith("saap: error:")), errors[-1] if errors else "")
        result.error = f"'saap {args[0]}' {exit_description(code)}: {reason.removeprefix('saap: error: ')}"
        if check:
            raise SaapError(result.error)
    return result


class StageLine:
    """A stage's line on the terminal. On a terminal it shows, in place, the newest progress bar
    of the stage's child; elsewhere (a CI log, a pipe) nothing is printed while the stage runs.
    Everything else the children print goes to the stage's log.txt (``saap run -v`` shows it)."""

    def __init__(self, label: str):
        self.label, self.tty = label, sys.stdout.isatty()

    def start(self) -> None:
        print(f"{self.label} running ...", end="" if self.tty else "\n", flush=True)

    def progress(self, bar: str) -> None:
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            sys.stdout.write(f"\r{self.label} {bar}"[: width + 1] + "\x1b[K")
            sys.stdout.flush()

    def finish(self, text: str) -> None:
        if self.tty:
            sys.stdout.write("\r\x1b[K")
        print(f"{self.label} {text}", flush=True)


def _log_tail(log: Path, lines: int = 5) -> list[str]:
    """The last lines a failed stage's children wrote, to show under its stage line."""
    try:
        return [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-lines:]
    except OSError:
        return []


@dataclass
class Context:
    config: RunConfig
    config_path: Path
    run_dir: Path
    records: dict[str, dict] = field(default_factory=dict)  # stage -> its stage.json, as the run goes
    verbose: bool = False  # children's stderr on the terminal, instead of only in each stage's log.txt

    def output(self, stage: str, relative: str) -> Path:
        return self.run_dir / stage / relative

    def upstream(self, stage: str, relative: str) -> dict[str, str]:
        """An input produced by an earlier stage: its path and the digest of its recorded files."""
        return {
            "path": str(self.output(stage, relative)),
            "sha256": subtree_digest(self.records[stage]["outputs"], relative),
        }

    @property
    def final_stage(self) -> str:
        """The stage whose model the later stages deploy: fine-tuned if fine-tuning is on."""
        return "finetune" if self.config.finetune.enabled else "prune"

    @property
    def final_model(self) -> Path:
        return self.output(self.final_stage, "model")


@dataclass
class Stage:
    """What a stage reads, which settings it depends on, and how it fills its output directory."""

    name: str
    inputs: Callable[[Context], dict[str, dict[str, str]]]  # name -> {"path", "sha256"}
    settings: Callable[[Context], dict[str, Any]]
    run: Callable[[Context, Path], list[dict]]  # fills the directory; returns the commands it ran
    enabled: Callable[[Context], bool] = lambda ctx: True


# --- load: fingerprint the source model once; everything downstream depends on this record ---------


def _source_files(spec: str) -> tuple[Path | None, list[Path]]:
    from saap.runtime.models import ALIASES, resolve_alias

    path = resolve_alias(spec) if spec in ALIASES else Path(spec).expanduser()
    if not path.exists():
        return None, []  # a Hub id: the child processes resolve it
    return path, [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def _load_inputs(ctx: Context) -> dict[str, dict[str, str]]:
    """Size and mtime of the source files: cheap, and any edit of the weights changes them."""
    _, files = _source_files(ctx.config.model)
    stats = {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    return {"source": {"path": ctx.config.model, "sha256": sha256_bytes(json.dumps(stats).encode())}}


def _load_settings(ctx: Context) -> dict[str, Any]:
    return {"model": ctx.config.model}


def _load_run(ctx: Context, out: Path) -> list[dict]:
    from saap.runtime.checkpoint import sha256_file
    from saap.runtime.models import load_model_config
    from saap.runtime.surgery import config_parameter_count, layer_shapes

    path, files = _source_files(ctx.config.model)
    hashes = {str(p.relative_to(path.parent)): sha256_file(p) for p in files} if path else {}
    source: dict[str, Any] = {"spec": ctx.config.model, "path": str(path) if path else None, "files": hashes}
    config = load_model_config(ctx.config.model)
    source["params"] = config_parameter_count(config)
    source["layers"] = [s.as_dict() for s in layer_shapes(config)]
    (out / "source.json").write_text(json.dumps(source, indent=2) + "\n")
    return []


# --- prune -----------------------------------------------------------------------------------------


def _prune_inputs(ctx: Context) -> dict[str, dict[str, str]]:
    from saap.pipeline.data import resolve_data_file
    from saap.pipeline.prune.settings import PruneSettings
    from saap.runtime.checkpoint import sha256_file

    calibration = resolve_data_file(PruneSettings(**ctx.config.prune.model_dump()).calibration)
    return {
        "source": ctx.upstream("load", "source.json"),
        "calibration": {"path": str(calibration), "sha256": sha256_file(calibration)},
    }


def _prune_run(ctx: Context, out: Path) -> list[dict]:
    return [_command(["prune", "--model", ctx.config.model, *ctx.config.prune.flags(), "--out", out / "model"])]


# --- finetune --------------------------------------------------------------------------------------


def _finetune_data(ctx: Context) -> list[str]:
    data = ctx.config.finetune.data
    return [data] if isinstance(data, str) else list(data)


def _teacher_text(ctx: Context) -> bool:
    """Whether the run distils on text its teacher samples first (``finetune.data: teacher``)."""
    from saap.pipeline.finetune.teacher_text import TEACHER_DATA

    return TEACHER_DATA in _finetune_data(ctx)


def _finetune_inputs(ctx: Context) -> dict[str, dict[str, str]]:
    from saap.pipeline.data import resolve_data_files
    from saap.pipeline.finetune.teacher_text import TEACHER_DATA
    from saap.runtime.checkpoint import sha256_file

    files = resolve_data_files([d for d in _finetune_data(ctx) if d != TEACHER_DATA])
    inputs = {"model": ctx.upstream("prune", "model")}
    inputs |= {f"data[{i}]": {"path": str(f), "sha256": sha256_file(f)} for i, f in enumerate(files)}
    if ctx.config.finetune.teacher == "parent":  # the dense model the teacher is
        inputs["teacher"] = ctx.upstream("load", "source.json")
    return inputs


def _finetune_settings(ctx: Context) -> dict[str, Any]:
    settings = ctx.config.finetune.model_dump()
    return settings | ({"sample": ctx.config.sample.model_dump()} if _teacher_text(ctx) else {})


def _finetune_run(ctx: Context, out: Path) -> list[dict]:
    from saap.pipeline.finetune.distill import PARENT
    from saap.pipeline.finetune.teacher_text import SAMPLES_FILE, TEACHER_DATA

    model = ctx.output("prune", "model")
    flags = ctx.config.finetune.flags()
    commands = []
    if _teacher_text(ctx):  # the teacher writes the training text first, into the stage's own cache
        cache = out / "teacher-text"
        teacher = ctx.config.finetune.teacher
        teacher = ctx.config.model if teacher in (None, PARENT) else teacher
        commands.append(_command(["sample", "--model", teacher, *ctx.config.sample.flags(), "--out", cache]))
        flags = [str(cache / SAMPLES_FILE) if f == TEACHER_DATA else f for f in flags]
    return [*commands, _command(["finetune", "--model", model, *flags, "--out", out / "model"])]


# --- eval ------------------------------------------------------------------------------------------


def _eval_inputs(ctx: Context) -> dict[str, dict[str, str]]:
    inputs = {"model": ctx.upstream(ctx.final_stage, "model")}
    if ctx.config.eval.dense:
        inputs["dense"] = ctx.upstream("load", "source.json")
    if ctx.final_stage != "prune":
        inputs["pruned"] = ctx.upstream("prune", "model")
    from saap.pipeline.data import PERPLEXITY_SETS, missing_unshipped, resolve_data_file
    from saap.runtime.checkpoint import sha256_file

    skipped = missing_unshipped(ctx.config.eval.ppl)  # a set the user adds later makes the stage run again
    for name in ctx.config.eval.ppl:
        path = "" if name in skipped else str(resolve_data_file(name, PERPLEXITY_SETS))
        inputs[f"ppl/{name}"] = {"path": path, "sha256": sha256_file(path) if path else "not present"}
    return inputs


def _eval_run(ctx: Context, out: Path) -> list[dict]:
    """The dense model first: its continuations are the reference the others' agreement is measured on."""
    commands, extra = [], []
    if ctx.config.eval.dense:
        dense = ctx.upstream("load", "source.json")["sha256"]
        commands.append(_eval_or_reuse(ctx, out, "dense", ctx.config.model, dense))
        extra = ["--generate-reference", out / "dense.json"] if ctx.config.eval.generate else []
    flags = [*ctx.config.eval.flags(), *extra]
    commands.append(_command(["eval", "--model", ctx.final_model, *flags, "--out", out / "model.json"]))
    if ctx.final_stage != "prune":  # the report's "before recovery" column
        pruned = ctx.upstream("prune", "model")["sha256"]
        commands.append(_eval_or_reuse(ctx, out, "pruned", ctx.output("prune", "model"), pruned, extra))
    return commands


def _eval_or_reuse(
    ctx: Context, out: Path, name: str, model: Any, model_digest: str, extra: list[Any] | None = None
) -> dict:
    """``saap eval`` of ``model`` into ``out/<name>.json``, or the previous eval's copy when that
    scored the same model (``model_digest``) with the same settings (a fine-tune change need not
    re-score the dense model, nor the pruned one)."""
    flags = [*ctx.config.eval.flags(), *(extra or [])]
    # A path in the flags is this stage's temporary directory: only its file name is a setting.
    key = sha256_bytes(json.dumps([model_digest, [f.name if isinstance(f, Path) else f for f in flags]]).encode())
    previous = ctx.run_dir / "eval"
    key_file = f".{name}_key"
    (out / key_file).write_text(key)
    same = (previous / key_file).is_file() and (previous / key_file).read_text() == key
    if same and (previous / f"{name}.json").is_file():
        for suffix in (".json", ".md"):
            if (previous / f"{name}{suffix}").is_file():
                shutil.copy2(previous / f"{name}{suffix}", out / f"{name}{suffix}")
        return {"args": f"({name} scores reused from the previous eval)", "reused": True}
    return _command(["eval", "--model", model, *flags, "--out", out / f"{name}.json"])


# --- exports ---------------------------------------------------------------------------------------


def _export_inputs(ctx: Context) -> dict[str, dict[str, str]]:
    return {"model": ctx.upstream(ctx.final_stage, "model")}


def _export_onnx_run(ctx: Context, out: Path) -> list[dict]:
    return [
        _command(["export", "onnx", "--model", ctx.final_model, "--precision", p, "--out", out / p, "--quiet"])
        for p in ctx.config.export.onnx
    ]


def _export_gguf_run(ctx: Context, out: Path) -> list[dict]:
    return [
        _command(
            ["export", "gguf", "--model", ctx.final_model, "--quant", q, "--out", out / f"model-{q}.gguf", "--quiet"]
        )
        for q in ctx.config.export.gguf
    ]


# --- bench -----------------------------------------------------------------------------------------


def _bench_inputs(ctx: Context) -> dict[str, dict[str, str]]:
    inputs = {"dense": ctx.upstream("load", "source.json"), "model": ctx.upstream(ctx.final_stage, "model")}
    return inputs | {f"{stage}/{relative}": ctx.upstream(stage, relative) for stage, relative in _bench_exports(ctx)}


def _bench_exports(ctx: Context) -> list[tuple[str, str]]:
    """The export stages' outputs the bench measures as they are, rather than exporting the model again:
    (stage, path in it), for the engines it runs. A stage that is off has no record and gives none."""
    engines = set(_bench_section(ctx).engines)
    exports = []
    if {"onnx", "onnx-genai"} & engines and "export-onnx" in ctx.records:
        exports += [("export-onnx", p) for p in ctx.config.export.onnx]
    if "gguf" in engines and "export-gguf" in ctx.records:
        exports += [("export-gguf", f"model-{q}.gguf") for q in ctx.config.export.gguf]
    return exports


def _bench_section(ctx: Context):
    bench = ctx.config.bench.model_copy()
    if bench.target is None:  # measure what the export stages produced, unless a target says otherwise
        if {"onnx", "onnx-genai"} & set(bench.engines):
            bench.onnx_precision = bench.onnx_precision or list(ctx.config.export.onnx)
        if "gguf" in bench.engines:
            bench.gguf_quant = bench.gguf_quant or list(ctx.config.export.gguf)
    return bench


def _bench_settings(ctx: Context) -> dict[str, Any]:
    settings = _bench_section(ctx).model_dump()
    if "gguf" in settings["engines"]:  # a rebuilt llama.cpp (say, after a SIGILL) measures again
        from saap.runtime.gguf_engine import build_info

        settings["llama_cpp_build"] = build_info()
    return settings


def _bench_run(ctx: Context, out: Path) -> list[dict]:
    # The final model is labelled by the run's name in the tables (its directory is always "model"),
    # unless that is the dense model's own label; "=" would split the label.
    name = (ctx.config.name or "pruned").replace("=", "-")
    dense = ctx.config.model
    label = f"{name}-pruned" if name in (dense, Path(dense).name) else name
    args = ["bench", "--models", dense, f"{label}={ctx.final_model}", *_bench_section(ctx).flags()]
    exports = [ctx.output(stage, relative) for stage, relative in _bench_exports(ctx)]
    if exports:
        args += ["--exports", *exports]
    return [_command([*args, "--out", out / "bench.json"], partial="bench.json")]


# --- report ----------------------------------------------------------------------------------------


def _report_inputs(ctx: Context) -> dict[str, dict[str, str]]:
    return {
        stage: {
            "path": str(ctx.run_dir / stage),
            "sha256": sha256_bytes(json.dumps(record["outputs"], sort_keys=True).encode()),
        }
        for stage, record in ctx.records.items()
        if stage != "report"
    }


def _report_run(ctx: Context, out: Path) -> list[dict]:
    from saap.pipeline.report import write_report

    write_report(ctx.run_dir, out, ctx.config, ctx.records)
    return []


def _settings_of(section: str) -> Callable[[Context], dict[str, Any]]:
    return lambda ctx: getattr(ctx.config, section).model_dump()


PIPELINE = [
    Stage("load", _load_inputs, _load_settings, _load_run),
    Stage("prune", _prune_inputs, _settings_of("prune"), _prune_run),
    Stage("finetune", _finetune_inputs, _finetune_settings, _finetune_run, lambda ctx: ctx.config.finetune.enabled),
    Stage("eval", _eval_inputs, _settings_of("eval"), _eval_run),
    Stage(
        "export-onnx",
        _export_inputs,
        lambda ctx: {"onnx": ctx.config.export.onnx},
        _export_onnx_run,
        lambda ctx: bool(ctx.config.export.onnx),
    ),
    Stage(
        "export-gguf",
        _export_inputs,
        lambda ctx: {"gguf": ctx.config.export.gguf},
        _export_gguf_run,
        lambda ctx: bool(ctx.config.export.gguf),
    ),
    Stage(
        "bench",
        _bench_inputs,
        _bench_settings,
        _bench_run,
        lambda ctx: ctx.config.bench.enabled,
    ),
    Stage("report", _report_inputs, lambda ctx: {"name": ctx.config.name}, _report_run),
]
assert tuple(s.name for s in PIPELINE) == STAGES


def _command(args: list[Any], partial: str | None = None) -> dict:
    """A pending ``saap`` command; ``_execute`` runs it (kept as data so stage.json can record it).

    ``partial``: an output the command still writes when part of it fails (``saap bench`` with a run
    whose worker died); if it exists, the failure is recorded and the pipeline goes on to the report.
    """
    return {"args": [str(a) for a in args]} | ({"partial": partial} if partial else {})


def _read_stage(directory: Path) -> dict | None:
    try:
        return json.loads((directory / STAGE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _up_to_date(directory: Path, key: str) -> dict | None:
    """The recorded stage.json if the stage ran with this key and its outputs are intact."""
    record = _read_stage(directory)
    if not record or record.get("key") != key:
        return None
    if manifest(directory) != record.get("outputs"):
        return None
    return record


def _format_seconds(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s" if seconds >= 60 else f"{seconds:.1f}s"


def _clean_leftovers(run_dir: Path) -> None:
    """Temporary directories of runs killed mid-stage (a stage rerun with the same key reuses its own)."""
    for leftover in run_dir.glob(".*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _execute(stage: Stage, ctx: Context, key: str, inputs: dict, settings: dict, line: StageLine | None = None) -> dict:
    final = ctx.run_dir / stage.name
    # Named by the key, so a rerun after a crash finds the killed attempt's directory: its
    # ``*.partial`` entries (saap finetune's resumable checkpoints) survive, everything else goes.
    tmp = ctx.run_dir / f".{stage.name}.tmp-{key[:16]}"
    if tmp.is_dir():
        for entry in tmp.iterdir():
            if not entry.name.endswith(".partial"):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    tmp.mkdir(exist_ok=True)
    line = line or StageLine(stage.name)
    started = time.perf_counter()
    peak = 0
    log = tmp / "log.txt"
    log.touch()
    ran, errors = [], []
    for command in stage.run(ctx, tmp):
        if command.get("reused"):
            ran.append(command)
            continue
        partial = command.get("partial")
        result = run_saap(command["args"], log, check=False, progress=None if ctx.verbose else line.progress)
        if result.error:
            if partial is None or not (tmp / partial).is_file():
                line.finish("failed; the last lines of its log:")
                for text in _log_tail(log):
                    print(f"    {text}", flush=True)
                raise SaapError(f"{result.error} (log: {log})")
            errors.append(result.error.replace(str(tmp), str(final)))
        peak = max(peak, result.peak_rss_mb)
        # Record the command as it reads for the finished stage, not for its temporary directory.
        args = [a.replace(str(tmp), str(final)) for a in command["args"]]
        ran.append({"args": args, "wall_s": round(result.wall_s, 1), "peak_rss_mb": result.peak_rss_mb})
    if not ran:  # an in-process stage: the orchestrator's own peak
        peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    record = {
        "stage": stage.name,
        "key": key,
        "inputs": inputs,
        "settings": settings,
        "commands": ran,
        "outputs": manifest(tmp),
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_mb": peak,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if errors:
        record["errors"] = errors
    (tmp / STAGE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    swap_in(tmp, final)
    return record


def run_pipeline(
    config: RunConfig,
    config_path: Path,
    from_stage: str | None = None,
    until_stage: str | None = None,
    force: list[str] | None = None,
    verbose: bool = False,
) -> list[dict]:
    """Run (or resume) every stage; returns one summary row per stage. ``verbose``: the children's
    warnings, bars and logs on the terminal too, not only in each stage's log.txt."""
    for name in [from_stage, until_stage, *(force or [])]:
        if name is not None and name not in STAGES:
            raise SaapError(f"unknown stage '{name}' (stages: {', '.join(STAGES)})")
    first = STAGES.index(from_stage) if from_stage else 0
    last = STAGES.index(until_stage) if until_stage else len(STAGES) - 1
    forced = set(force or []) | (set(STAGES[first:]) if from_stage else set())
    ctx = Context(config, config_path, config.run_dir, verbose=verbose)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    summary = []
    for index, stage in enumerate(PIPELINE):
        if index > last:
            break
        label = f"[{index + 1}/{len(STAGES)}] {stage.name:<12}"
        if not stage.enabled(ctx):
            summary.append({"stage": stage.name, "status": "off"})
            print(f"{label} off", flush=True)
            continue
        inputs, settings = stage.inputs(ctx), stage.settings(ctx)
        # Content, not location, decides: the key hashes the inputs' sha256 and the settings.
        digests = {name: value["sha256"] for name, value in inputs.items()}
        # The package version is in too: a new saap release recomputes rather than trusting old outputs.
        identity = {"inputs": digests, "settings": settings, "saap": _version()}
        key = sha256_bytes(json.dumps(identity, sort_keys=True).encode())
        record = None if stage.name in forced else _up_to_date(ctx.run_dir / stage.name, key)
        if index < first:
            if record is None:
                raise SaapError(
                    f"--from {from_stage}: stage '{stage.name}' has no valid output yet; run without --from"
                )
            status = "reused"
        elif record is not None:
            status = "skipped"
        else:
            line = StageLine(label)
            line.start()
            record = _execute(stage, ctx, key, inputs, settings, line)
            status = "ran"
        ctx.records[stage.name] = record
        summary.append(
            {
                "stage": stage.name,
                "status": status,
                "wall_s": record["wall_s"],
                "peak_rss_mb": record["peak_rss_mb"],
                "bytes": _stage_bytes(ctx.run_dir / stage.name),
            }
        )
        note = "up to date" if status != "ran" else _format_seconds(record["wall_s"])
        if record.get("errors"):
            note += f", with errors: {record['errors'][0]}"
        StageLine(label).finish(f"{status:<7} {note}  peak RSS {record['peak_rss_mb']} MB")
    if "report" in ctx.records:
        _publish_report(ctx.run_dir)
    _clean_leftovers(ctx.run_dir)
    failed = [e for record in ctx.records.values() for e in record.get("errors", [])]
    if failed:  # after the report: it shows what did run, and the failed rows
        print(summary_table(summary), flush=True)
        raise SaapError(f"{failed[0]} (the report covers everything else: {ctx.run_dir / 'report.html'})")
    return summary


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("saap")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _stage_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _publish_report(run_dir: Path) -> None:
    """``<run>/report.md`` and ``report.html``: copies of the report stage's files at the run's top."""
    from saap.runtime.io import write_text_atomic

    for name in ("report.md", "report.html"):
        write_text_atomic(run_dir / name, (run_dir / "report" / name).read_text())


def summary_table(rows: list[dict]) -> str:
    lines = [f"{'stage':<12} {'status':<8} {'wall':>9} {'peak RSS':>9} {'output':>10}"]
    for row in rows:
        if row["status"] == "off":
            lines.append(f"{row['stage']:<12} {'off':<8}")
            continue
        lines.append(
            f"{row['stage']:<12} {row['status']:<8} {_format_seconds(row['wall_s']):>9} "
            f"{row['peak_rss_mb']:>6} MB {row['bytes'] / 2**20:>7.1f} MB"
        )
    return "\n".join(lines)

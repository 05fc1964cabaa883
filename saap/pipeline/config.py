"""The ``saap run`` configuration: one YAML file, validated whole before any stage starts.

Every section maps onto one ``saap`` verb; a key is that verb's flag with ``-`` written ``_``
(``num_samples: 32`` is ``--num-samples 32``), so the config and the CLI never drift apart and the
report can print the exact command each stage ran. Unknown keys and wrong types are errors, named
by their YAML path (``prune.ratio: ...``); so are a missing model and a budget the model cannot meet.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from saap.export.formats import ExportSettings
from saap.pipeline.bench import BenchSettings
from saap.pipeline.evaluate import EvalSettings
from saap.pipeline.finetune import FinetuneSettings
from saap.pipeline.finetune.teacher_text import TEACHER_DATA, SampleSettings
from saap.pipeline.options import section_model
from saap.pipeline.prune import PruneSettings
from saap.pipeline.prune.settings import BUDGETS
from saap.runtime.errors import SaapError

# The run's own choices where they differ from the verb's (``saap eval`` scores only what it is asked).
PruneConfig = section_model(PruneSettings, "PruneConfig")
EvalConfig = section_model(
    EvalSettings,
    "EvalConfig",
    defaults={"ppl": ["wikitext2", "ptb"], "generate": True},
    extra={"dense": (bool, True)},  # also score the dense model, for the report's comparison
    not_flags=("dense",),
)
FinetuneConfig = section_model(
    FinetuneSettings,
    "FinetuneConfig",
    extra={"enabled": (bool, False), "data": (str | list[str], "finetune/alpaca_en_demo.json")},
    not_flags=("enabled",),  # recovery is off unless the config turns it on
)
SampleConfig = section_model(
    SampleSettings,
    "SampleConfig",
    doc=f"saap sample: how the teacher writes the training text when finetune.data is '{TEACHER_DATA}'.",
)
ExportConfig = section_model(ExportSettings, "ExportConfig")
BenchConfig = section_model(
    BenchSettings,
    "BenchConfig",
    exclude=("models",),  # the run benchmarks the dense model against its final one
    defaults={"engines": ["torch", "onnx", "gguf"], "gen_tokens": 64, "repeats": 3},
    extra={"enabled": (bool, True)},
    not_flags=("enabled",),
    doc="saap bench of the dense model against the final one; onnx_precision / gguf_quant default to the "
    "export section's lists.",
)


class RunConfig(BaseModel):
    """A whole run: ``artifacts_dir/name/<stage>/`` receives every stage's output."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None  # default: the config file's name without .yaml
    model: str
    artifacts_dir: str = "artifacts"
    prune: PruneConfig = Field(default_factory=PruneConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.artifacts_dir) / str(self.name)


def _yaml_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def parse_config(data: Any, name: str) -> RunConfig:
    """Validate a loaded YAML document; the first problem becomes one SaapError with its YAML path."""
    if not isinstance(data, dict):
        raise SaapError(f"{name}: the config must be a mapping of sections, got {type(data).__name__}")
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown key"
        raise SaapError(f"{name}: {_yaml_path(first['loc'])}: {message}") from None
    if config.name is None:
        config.name = Path(name).stem
    if not config.name or "/" in config.name or config.name.startswith("."):
        raise SaapError(f"{name}: name: '{config.name}' is not a usable directory name")
    return config


CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"  # the configs that ship inside the package
DEFAULT_CONFIG = "smollm2-135m"  # `saap run` with no config: the embedded SmolLM2-135M, pruned 20 %


def packaged_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def find_config(spec: str | Path) -> Path:
    """A config file, else the name of one that ships with saap (``smollm2-135m``)."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.suffix == "" and (CONFIGS_DIR / f"{spec}.yaml").is_file():
        return CONFIGS_DIR / f"{spec}.yaml"
    raise SaapError(f"config file '{spec}' does not exist (or name one of saap's: {', '.join(packaged_configs())})")


def load_config(path: str | Path) -> RunConfig:
    path = find_config(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise SaapError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    return parse_config(data, str(path))


def check_semantics(config: RunConfig, name: str) -> None:
    """What types cannot say: the model exists, the budget is reachable, data files and names resolve.

    Loads only the model's config (a GGUF not yet cached is decoded once), so a bad run fails in
    seconds instead of after the first stage.
    """
    from saap.pipeline.data import PERPLEXITY_SETS, missing_unshipped, resolve_data_file
    from saap.pipeline.prune import check_budget
    from saap.pipeline.zeroshot import TASKS
    from saap.runtime.models import load_model_config
    from saap.runtime.surgery import config_parameter_count, layer_shapes

    def fail(key: str, message: str) -> None:
        raise SaapError(f"{name}: {key}: {message}")

    prune = config.prune
    budget_key = next(
        (f"prune.{k}" for k in BUDGETS if getattr(prune, k) is not None),
        "prune.ratio",
    )
    try:
        settings = PruneSettings(**prune.model_dump())
    except SaapError as e:  # its messages name CLI flags: --num-samples is prune.num_samples here
        flag = re.search(r"--([a-z-]+)", str(e))
        key = f"prune.{flag.group(1).replace('-', '_')}" if flag else "prune.method"
        fail(budget_key if "budget" in str(e) else key, str(e))
    try:
        model_config = load_model_config(config.model)
    except SaapError as e:
        fail("model", str(e))
    try:
        check_budget(model_config, layer_shapes(model_config), config_parameter_count(model_config), settings)
    except SaapError as e:
        fail(budget_key, str(e))
    checks = [("prune.calibration", prune.calibration, None)] if prune.calibration else []
    if config.finetune.enabled:
        checks += _finetune_checks(config, fail)
    skipped = missing_unshipped(config.eval.ppl)  # the eval stage skips these with one line each
    checks += [(f"eval.ppl[{i}]", s, PERPLEXITY_SETS) for i, s in enumerate(config.eval.ppl) if s not in skipped]
    for key, spec, named in checks:
        try:
            resolve_data_file(spec, named)
        except SaapError as e:
            fail(key, str(e))
    for i, task in enumerate(config.eval.tasks):
        if task != "all" and task not in TASKS:
            fail(f"eval.tasks[{i}]", f"unknown task '{task}' (choose from all, {', '.join(TASKS)})")


def _finetune_checks(config: RunConfig, fail: Callable[[str, str], None]) -> list[tuple[str, str, None]]:
    """The fine-tuning data files to resolve; ``teacher`` (the teacher's own text) must come alone,
    with a teacher to sample it from."""
    data = config.finetune.data
    many = not isinstance(data, str)
    keyed = [(f"finetune.data[{i}]", f) for i, f in enumerate(data)] if many else [("finetune.data", data)]
    if any(spec == TEACHER_DATA for _, spec in keyed):
        if len(keyed) > 1:
            fail("finetune.data", f"'{TEACHER_DATA}' (the teacher's own text) cannot be mixed with data files")
        if not config.finetune.teacher:
            fail("finetune.teacher", f"finetune.data '{TEACHER_DATA}' needs a teacher to sample from (e.g. parent)")
        return [("sample.prefixes", config.sample.prefixes, None)] if config.sample.prefixes else []
    return [(key, spec, None) for key, spec in keyed]

"""The ``saap run`` configuration: one YAML file, validated whole before any stage starts.

Every section maps onto one ``saap`` verb; a key is that verb's flag with ``-`` written ``_``
(``num_samples: 32`` is ``--num-samples 32``), so the config and the CLI never drift apart and the
report can print the exact command each stage ran. Unknown keys and wrong types are errors, named
by their YAML path (``prune.ratio: ...``); so are a missing model and a budget the model cannot meet.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime.errors import SaapError

ONNX_PRECISIONS = ("fp32", "fp16", "int8", "int4")
GGUF_QUANTS = ("f16", "f32", "bf16", "q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m")


class Section(BaseModel):
    """A config section; its fields are the flags of one ``saap`` verb unless listed in ``NOT_FLAGS``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    NOT_FLAGS: ClassVar[frozenset[str]] = frozenset()
    COMMA_LISTS: ClassVar[bool] = False  # saap bench takes lists as one comma-separated value

    def flags(self) -> list[str]:
        """The section as command-line flags (None and False are left out; True is a bare flag)."""
        args: list[str] = []
        for name, value in self.model_dump().items():
            if name in self.NOT_FLAGS or value is None or value is False or value == []:
                continue
            flag = "--" + name.replace("_", "-")
            if value is True:
                args.append(flag)
            elif isinstance(value, list):
                args += [flag, ",".join(map(str, value))] if self.COMMA_LISTS else [flag, *map(str, value)]
            else:
                args += [flag, str(value)]
        return args


class PruneConfig(Section):
    """``saap prune``: the method and the budget (one of ratio, target_params, target_decode_bytes)."""

    method: str = "saap"  # saap | llm-pruner | flap | wanda-sp | shortgpt | magnitude | random
    ratio: float | None = None
    target_params: int | None = None
    target_decode_bytes: int | None = None
    align: int = 32
    importance: str | None = None
    ablation: str = "fused"
    search: str = "uniform"
    fluctuation_weight: float = 1.0
    calibration: str | None = None  # default: the shared calibration text
    num_samples: int = 32
    seq_len: int = 128
    batch_size: int = 1
    seed: int = 0
    no_bias_compensation: bool = False  # flap: keep o_proj/down_proj without the compensating bias
    device_map: Literal["auto"] | None = None  # spread importance estimation over all GPUs (accelerate)


class FinetuneConfig(Section):
    """``saap finetune``: off unless ``enabled``; the recovery stage between prune and eval."""

    NOT_FLAGS: ClassVar[frozenset[str]] = frozenset({"enabled"})
    enabled: bool = False
    method: Literal["group-lora", "lora", "full"] | None = None  # default: saap finetune's (full when distilling)
    data: str | list[str] = "finetune/alpaca_en_demo.json"
    teacher: str | None = None  # "parent": distil from the dense model (saap finetune --teacher)
    temperature: float = 1.0
    kl_weight: float = 1.0
    bits: Literal[4, 8] = 4
    group_size: Literal[32, 64, 128] = 32
    rank: int | None = None  # default: saap finetune's per method (16 group-lora, 8 lora)
    alpha: float | None = None  # default 2 x rank
    dropout: float = 0.0
    max_steps: int | None = None  # default: saap finetune's own (or `epochs` passes)
    epochs: float | None = None
    lr: float = 3e-4
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    val_size: int = 32
    save_steps: int = 25
    eval_steps: int = 50
    keep: Literal["best", "last"] = "best"
    seed: int = 0


class EvalConfig(Section):
    """``saap eval`` of the final model and, with ``dense``, of the model it came from."""

    NOT_FLAGS: ClassVar[frozenset[str]] = frozenset({"dense"})
    dense: bool = True
    ppl: list[str] = Field(default_factory=lambda: ["wikitext2", "ptb"])
    seq_len: str = "128"
    ppl_windows: int | None = None
    tasks: list[str] = Field(default_factory=list)
    limit: int | None = None
    generate: bool = True
    batch_size: int = 8


class ExportConfig(Section):
    """``saap export``: one ONNX directory per precision and one GGUF file per quantization."""

    onnx: list[Literal[ONNX_PRECISIONS]] = Field(default_factory=lambda: ["fp32", "int8"])
    gguf: list[Literal[GGUF_QUANTS]] = Field(default_factory=lambda: ["f16", "q8_0"])


class BenchConfig(Section):
    """``saap bench`` of the dense model against the final one (interleaved, the same tokens).

    ``onnx_precision`` / ``gguf_quant`` default to the export section's lists.
    """

    NOT_FLAGS: ClassVar[frozenset[str]] = frozenset({"enabled"})
    COMMA_LISTS: ClassVar[bool] = True
    enabled: bool = True
    target: str | None = None  # benchmarks/targets/<target>.yaml: engines, devices, threads, quantizations
    engines: list[Literal["torch", "onnx", "gguf"]] = Field(default_factory=lambda: ["torch", "onnx", "gguf"])
    devices: list[str] = Field(default_factory=lambda: ["cpu"])
    threads: list[int] | None = None  # default: physical cores
    onnx_precision: list[Literal[ONNX_PRECISIONS]] | None = None
    gguf_quant: list[Literal[GGUF_QUANTS]] | None = None
    prompt_tokens: list[int] = Field(default_factory=lambda: [128])
    gen_tokens: int = 64
    repeats: int = 3
    warmup: int = 1
    n_gpu_layers: int | None = None
    llamacpp_reference: bool = False


class RunConfig(BaseModel):
    """A whole run: ``artifacts_dir/name/<stage>/`` receives every stage's output."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None  # default: the config file's name without .yaml
    model: str
    artifacts_dir: str = "artifacts"
    prune: PruneConfig = Field(default_factory=PruneConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
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


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise SaapError(f"config file '{path}' does not exist")
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
    from pipeline.data import PERPLEXITY_SETS, resolve_data_file
    from pipeline.prune import PruneSettings, budget_plan
    from pipeline.zeroshot import TASKS
    from runtime.models import load_model_config
    from runtime.surgery import config_parameter_count, layer_shapes

    def fail(key: str, message: str) -> None:
        raise SaapError(f"{name}: {key}: {message}")

    prune = config.prune
    budget_key = next(
        (f"prune.{k}" for k in ("ratio", "target_params", "target_decode_bytes") if getattr(prune, k) is not None),
        "prune.ratio",
    )
    try:
        fields = prune.model_dump(exclude={"calibration", "no_bias_compensation"})
        settings = PruneSettings(**fields, bias_compensation=not prune.no_bias_compensation)
    except SaapError as e:  # its messages name CLI flags: --num-samples is prune.num_samples here
        flag = re.search(r"--([a-z-]+)", str(e))
        key = f"prune.{flag.group(1).replace('-', '_')}" if flag else "prune.method"
        fail(budget_key if "budget" in str(e) else key, str(e))
    try:
        model_config = load_model_config(config.model)
    except SaapError as e:
        fail("model", str(e))
    try:
        budget_plan(model_config, layer_shapes(model_config), config_parameter_count(model_config), settings)
    except SaapError as e:
        fail(budget_key, str(e))
    checks = [("prune.calibration", prune.calibration, None)] if prune.calibration else []
    if config.finetune.enabled:
        data = config.finetune.data
        if isinstance(data, str):
            checks.append(("finetune.data", data, None))
        else:
            checks += [(f"finetune.data[{i}]", f, None) for i, f in enumerate(data)]
    checks += [(f"eval.ppl[{i}]", spec, PERPLEXITY_SETS) for i, spec in enumerate(config.eval.ppl)]
    for key, spec, named in checks:
        try:
            resolve_data_file(spec, named)
        except SaapError as e:
            fail(key, str(e))
    for i, task in enumerate(config.eval.tasks):
        if task != "all" and task not in TASKS:
            fail(f"eval.tasks[{i}]", f"unknown task '{task}' (choose from all, {', '.join(TASKS)})")

"""The decode cost model a speed budget reads, and the profile that stores it per engine and machine.

A speed requirement (``saap prune --target-speedup 1.5 --engine gguf:q8_0``) needs to know what each
change to a layer saves on that engine. Decode is a sum of per-block fixed costs (kernel launches,
norms, attention over the KV cache, graph overhead) and weight bytes over bandwidth, and the engines
differ in the mix: llama.cpp's fixed costs are near zero, ONNX Runtime's are ~25 % of the time,
torch on a GPU is almost all fixed cost. So the model is

    ms per token = fixed + attention_ms x (layers with attention) + mlp_ms x (layers with an MLP)
                   + kv_group_ms x (KV groups, all layers) + ms_per_mparam x (decoder-layer parameters / 1e6)

(the embedding and output projection are in ``fixed``: pruning never changes them). A KV group
costs more than its weights: its KV cache is read and its attention scores computed every token
(measured: a profile without the term under-predicted what fewer KV groups save by 4 %, on llama.cpp
and ONNX Runtime alike). It is fitted by least squares, the four slopes held non-negative, on decode
times that ``saap profile`` (``saap.pipeline.profile``) measures. This module only reads, fits and
stores: it imports nothing of the pruner, which reads it.

    profile = find_profile(config, "gguf:q8_0", None)      # what prune finds by --engine
    profile.cost.predict_ms(config, shapes)                 # ms per token at shapes
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from saap.runtime.errors import SaapError
from saap.runtime.surgery import LayerShape, layer_parameter_count

SCHEMA = "saap-profile/1"


@dataclass(frozen=True)
class EngineSpec:
    """``ENGINE[:QUANT][@DEVICE]``, e.g. ``gguf:q8_0``, ``onnx:fp32``, ``torch@cuda``."""

    engine: str
    quant: str
    device: str = "cpu"

    @classmethod
    def parse(cls, text: str) -> EngineSpec:
        from saap.pipeline.bench.settings import DEFAULT_QUANTS, ENGINE_DEVICES, ENGINE_QUANTS

        rest, _, device = text.partition("@")
        engine, _, quant = rest.partition(":")
        if engine not in ENGINE_QUANTS:
            raise SaapError(f"unknown engine '{engine}' in '{text}' (choose from {', '.join(ENGINE_QUANTS)})")
        quant = quant or DEFAULT_QUANTS[engine][0]
        if quant not in ENGINE_QUANTS[engine]:
            raise SaapError(f"engine {engine} has no quantization '{quant}' ({', '.join(ENGINE_QUANTS[engine])})")
        device = device or "cpu"
        if device not in ENGINE_DEVICES[engine]:
            raise SaapError(f"engine {engine} runs on {', '.join(ENGINE_DEVICES[engine])}, not '{device}'")
        return cls(engine, quant, device)

    def __str__(self) -> str:
        return f"{self.engine}:{self.quant}" + (f"@{self.device}" if self.device != "cpu" else "")


@dataclass(frozen=True)
class CostModel:
    """Decode milliseconds per token as a function of the layer shapes (module docstring)."""

    fixed_ms: float
    attention_ms: float
    mlp_ms: float
    kv_group_ms: float
    ms_per_mparam: float

    def predict_features(self, row: list[float]) -> float:
        """ms per token from ``features(...)``' five regressors."""
        return float(np.dot(list(asdict(self).values()), row))

    def layer_ms(self, config, shape: LayerShape) -> float:
        return self.predict_features([0.0, *layer_features(config, shape)])  # no fixed part

    def predict_ms(self, config, shapes: list[LayerShape]) -> float:
        return self.predict_features(features(config, shapes))


def layer_features(config, shape: LayerShape) -> list[float]:
    """One layer's share of the regressors: attention block, MLP block, KV groups, Mparams."""
    return [
        float(shape.num_key_value_heads > 0),
        float(shape.intermediate_size > 0),
        float(shape.num_key_value_heads),
        layer_parameter_count(config, shape) / 1e6,
    ]


def features(config, shapes: list[LayerShape]) -> list[float]:
    """The cost model's regressors for one model: 1, then the layers' ``layer_features`` summed."""
    return [1.0, *np.sum([layer_features(config, s) for s in shapes], axis=0).tolist()]


def fit(rows: list[list[float]], ms: list[float]) -> CostModel:
    """Least squares with the slopes >= 0 (the intercept is free): every subset of the slopes is
    fitted and the best non-negative fit kept (exact, and cheap for four slopes)."""
    x, y = np.asarray(rows, float), np.asarray(ms, float)
    slopes = range(1, x.shape[1])
    best: tuple[float, np.ndarray] | None = None
    for k in range(len(slopes) + 1):
        for subset in itertools.combinations(slopes, k):
            columns = [0, *subset]
            coef, *_ = np.linalg.lstsq(x[:, columns], y, rcond=None)
            if (coef[1:] < 0).any():
                continue
            full = np.zeros(x.shape[1])
            full[columns] = coef
            error = float(((x @ full - y) ** 2).sum())
            if best is None or error < best[0] - 1e-12:
                best = (error, full)
    return CostModel(*(round(float(c), 6) for c in best[1]))


@dataclass
class Profile:
    engine: str  # the EngineSpec text
    cost: CostModel
    model: dict  # what it was fitted on: source and the shape key that must match
    threads: int | None
    hardware: dict  # the bench environment's cpu, gpu and hardware fingerprint
    points: list[dict]  # probe, features, measured and fitted ms per token
    created: str
    command: str

    def save(self, path: str | Path) -> None:
        from saap.runtime.io import write_json_atomic

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"schema": SCHEMA, **asdict(self)})

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        if not path.is_file():
            raise SaapError(f"profile '{path}' not found")
        try:
            data = json.loads(path.read_text())
            if data.pop("schema", None) != SCHEMA:
                raise ValueError(f"not a {SCHEMA} document")
            return cls(**{**data, "cost": CostModel(**data["cost"])})
        except (ValueError, TypeError, KeyError) as e:
            raise SaapError(f"profile '{path}' is not a saap profile ({e})") from None

    def check_model(self, config) -> None:
        """A profile's per-block costs belong to the model dimensions it was fitted on."""
        if self.model["shape_key"] != shape_key(config):
            raise SaapError(
                f"the {self.engine} profile was fitted on a model of shape {self.model['shape_key']}, "
                f"not {shape_key(config)}: run saap profile on this model"
            )


def shape_key(config) -> str:
    """The dimensions per-block costs depend on (not per-layer shapes: a pruned model's parent counts)."""
    return (
        f"{config.model_type}-l{config.num_hidden_layers}-h{config.hidden_size}-a{config.num_attention_heads}"
        f"-kv{config.num_key_value_heads}-ff{config.intermediate_size}-v{config.vocab_size}"
    )


def default_path(config, spec: EngineSpec) -> Path:
    """Where ``saap profile`` stores a profile and ``saap prune --engine`` looks for it: per machine."""
    from saap.pipeline.bench.environment import environment
    from saap.runtime.models import cache_dir

    machine = environment([])["hardware_fingerprint"]
    name = f"{spec.engine}-{spec.quant}-{spec.device}-{shape_key(config)}.json"
    return cache_dir() / "profiles" / machine / name


def find_profile(config, engine: str | None, path: str | None) -> Profile:
    """The profile a speed budget reads: ``path``, else the one ``saap profile`` stored for ``engine``."""
    if path is None:
        spec = EngineSpec.parse(engine)
        default = default_path(config, spec)
        if not default.is_file():
            raise SaapError(
                f"no {spec} profile for this model on this machine: run "
                f"'saap profile --model MODEL --engine {spec}' first, or pass --profile FILE"
            )
        path = str(default)
    profile = Profile.load(path)
    if engine is not None and str(EngineSpec.parse(engine)) != profile.engine:
        raise SaapError(f"--engine {engine} does not match the profile's engine {profile.engine} ({path})")
    profile.check_model(config)
    return profile

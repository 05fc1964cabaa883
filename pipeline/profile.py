"""``saap profile``: a per-engine decode cost model, fitted on this machine, stored as a reusable profile.

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
times that ``saap bench`` measures,
interleaved, for the model and a few *shape probes* of it: every MLP at half width, every layer at
its fewest KV groups, and every other layer without attention, without its MLP, or removed whole.
The probes' weights are the model's own, sliced (decode speed does not depend on their values).

    profile = fit_profile("smollm2-135m", EngineSpec.parse("gguf:q8_0"))   # measures (minutes)
    profile.save(default_path(config, spec))                                # what prune finds by --engine
    profile.cost.predict_ms(config, shapes)                                 # ms per token at shapes
"""

from __future__ import annotations

import copy
import itertools
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from runtime.errors import SaapError
from runtime.surgery import LayerShape, layer_parameter_count, layer_shapes

SCHEMA = "saap-profile/1"
PROBE_PROMPT_TOKENS = 128  # the bench's default prompt: decode is timed at this context
PROBE_GEN_TOKENS = 64
PROBE_REPEATS = 3


@dataclass(frozen=True)
class EngineSpec:
    """``ENGINE[:QUANT][@DEVICE]``, e.g. ``gguf:q8_0``, ``onnx:fp32``, ``torch@cuda``."""

    engine: str
    quant: str
    device: str = "cpu"

    @classmethod
    def parse(cls, text: str) -> EngineSpec:
        from pipeline.bench.settings import DEFAULT_QUANTS, ENGINE_DEVICES, ENGINE_QUANTS

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


def _halve_mlp(shapes: list[LayerShape], align: int) -> list[LayerShape]:
    return [LayerShape(s.num_attention_heads, s.num_key_value_heads, s.intermediate_size // 2 // align * align)
            for s in shapes]  # fmt: skip


def _fewest_kv(shapes: list[LayerShape], align: int) -> list[LayerShape]:
    return [LayerShape(s.queries_per_kv_head, 1, s.intermediate_size) for s in shapes]


def _every_other(change: Callable[[LayerShape], LayerShape]):
    # odd layers only: layer 0 keeps its attention (HF's KV cache reads the sequence length there)
    return lambda shapes, align: [change(s) if i % 2 else s for i, s in enumerate(shapes)]


# name -> the probe's shapes from the model's: the first five separate the five coefficients, and the
# sixth (every other layer removed whole) is their sum, which checks that block costs add up
PROBES: dict[str, Callable[[list[LayerShape], int], list[LayerShape]]] = {
    "dense": lambda shapes, align: list(shapes),
    "mlp-half-width": _halve_mlp,
    "fewest-kv-groups": _fewest_kv,
    "no-attention-odd": _every_other(lambda s: LayerShape(0, 0, s.intermediate_size)),
    "no-mlp-odd": _every_other(lambda s: LayerShape(s.num_attention_heads, s.num_key_value_heads, 0)),
    "no-layer-odd": _every_other(lambda s: LayerShape(0, 0, 0)),
}


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
        from runtime.io import write_json_atomic

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
    from pipeline.bench.environment import environment
    from runtime.models import cache_dir

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


def probe_checkpoints(model_spec: str, out_dir: Path, spec: EngineSpec, progress: bool = True):
    """Save each probe of ``model_spec`` as a checkpoint ``out_dir/<probe>`` and export it for ``spec``
    (the bench measures the exports as given); returns the probes' shapes and the export paths."""
    from tqdm.auto import tqdm

    from pipeline.baselines import empty_scores
    from pipeline.bench.settings import ENGINE_FORMATS
    from pipeline.prune.pruner import shrink_model
    from pipeline.prune.settings import PruneSettings
    from runtime.checkpoint import save_checkpoint
    from runtime.models import load_model

    loaded = load_model(model_spec)
    shapes, align = layer_shapes(loaded.model.config), PruneSettings.__dataclass_fields__["align"].default
    if any(s != shapes[0] for s in shapes):
        raise SaapError(f"saap profile needs a dense model (equal layer shapes), and '{model_spec}' is pruned")
    export = EXPORTERS.get(ENGINE_FORMATS[spec.engine])
    probes, exports = {}, []
    for name, make in tqdm(PROBES.items(), desc="profile probes", unit="probe", disable=not progress):
        model = copy.deepcopy(loaded.model)
        probes[name] = make(shapes, align)
        shrink_model(model, empty_scores(model), probes[name])
        save_checkpoint(model, loaded.tokenizer, out_dir / name, {"kind": "profile-probe", "probe": name})
        del model
        if export:
            exports.append(export(out_dir / name, spec.quant))
    return probes, exports


def _gguf(checkpoint: Path, quant: str) -> str:
    from export.gguf import export_gguf

    export_gguf(checkpoint, checkpoint.with_suffix(".gguf"), quant, progress=False)
    return str(checkpoint.with_suffix(".gguf"))


def _onnx(checkpoint: Path, precision: str) -> str:
    from export.onnx import export_onnx

    out = checkpoint.with_name(checkpoint.name + "-onnx")
    export_onnx(checkpoint, out, precision, progress=False)
    return str(out)


# artifact format -> export of a probe checkpoint (torch runs the checkpoint itself)
EXPORTERS: dict[str, Callable[[Path, str], str]] = {"gguf": _gguf, "onnx": _onnx}


def fit_profile(
    model_spec: str, spec: EngineSpec, threads: int | None = None, repeats: int = PROBE_REPEATS, progress: bool = True
) -> Profile:
    """Measure the probes' decode speed on ``spec`` (one interleaved ``saap bench`` group) and fit."""
    from pipeline.bench import BenchSettings, environment, run_bench
    from runtime.models import load_model_config

    config = load_model_config(model_spec)
    with tempfile.TemporaryDirectory(prefix="saap-profile-") as tmp:
        probes, exports = probe_checkpoints(model_spec, Path(tmp), spec, progress)
        settings = BenchSettings(
            models=[f"{name}={Path(tmp) / name}" for name in probes],
            engines=[spec.engine],
            devices=[spec.device],
            threads=[threads],
            quantizations={spec.engine: [spec.quant]},
            prompt_tokens=[PROBE_PROMPT_TOKENS],
            gen_tokens=PROBE_GEN_TOKENS,
            repeats=repeats,
            exports=exports,
        )
        doc = run_bench(settings, progress=progress)
    points = _points(doc, config, probes)
    cost = fit([p["features"] for p in points], [p["ms"] for p in points])
    for p in points:
        p["fitted_ms"] = round(cost.predict_features(p["features"]), 4)
    env = environment([])
    return Profile(
        engine=str(spec),
        cost=cost,
        model={"source": model_spec, "shape_key": shape_key(config)},
        threads=doc["results"][0]["threads"],
        hardware={k: env[k] for k in ("cpu", "gpu", "logical_cores", "hardware_fingerprint")},
        points=points,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        command=f"saap profile --model {model_spec} --engine {spec}",
    )


def _points(doc: dict, config, probes: dict[str, list[LayerShape]]) -> list[dict]:
    """One point per probe: its features and its measured decode ms per token (from the median tok/s)."""
    points = []
    for row in doc["results"]:
        if "failed" in row:
            raise SaapError(f"profiling probe {row['model']} failed on {row['engine']}: {row['failed']}")
        tok_s = row["by_prompt"][str(PROBE_PROMPT_TOKENS)]["decode_tok_s"]["median"]
        points.append(
            {"probe": row["model"], "features": features(config, probes[row["model"]]), "ms": round(1000 / tok_s, 4)}
        )
    return points

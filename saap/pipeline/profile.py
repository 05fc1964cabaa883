"""``saap profile``: measures a model's decode cost on one engine of this machine and stores the fitted
cost model (``saap.pipeline.prune.speed_model``, which the pruner reads for ``--target-speedup``).

The decode times come from ``saap bench``, interleaved, for the model and a few *shape probes* of it:
every MLP at half width, every layer at its fewest KV groups, and every other layer without attention,
without its MLP, or removed whole. The probes' weights are the model's own, sliced (decode speed does
not depend on their values).

    profile = fit_profile("smollm2-135m", EngineSpec.parse("gguf:q8_0"))   # measures (minutes)
    profile.save(default_path(config, spec))                                # what prune finds by --engine
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from saap.pipeline.prune.baselines import empty_scores
from saap.pipeline.prune.pruner import shrink_model
from saap.pipeline.prune.settings import PruneSettings
from saap.pipeline.prune.speed_model import EngineSpec, Profile, features, fit, shape_key
from saap.runtime.errors import SaapError
from saap.runtime.surgery import LayerShape, layer_shapes

PROBE_PROMPT_TOKENS = 128  # the bench's default prompt: decode is timed at this context
PROBE_GEN_TOKENS = 64
PROBE_REPEATS = 3


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


def probe_checkpoints(model_spec: str, out_dir: Path, spec: EngineSpec, progress: bool = True):
    """Save each probe of ``model_spec`` as a checkpoint ``out_dir/<probe>`` and export it for ``spec``
    (the bench measures the exports as given); returns the probes' shapes and the export paths."""
    from tqdm.auto import tqdm

    from saap.pipeline.bench.settings import ENGINE_FORMATS
    from saap.runtime.checkpoint import save_checkpoint
    from saap.runtime.models import load_model

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
    from saap.export.gguf import export_gguf

    export_gguf(checkpoint, checkpoint.with_suffix(".gguf"), quant, progress=False)
    return str(checkpoint.with_suffix(".gguf"))


def _onnx(checkpoint: Path, precision: str) -> str:
    from saap.export.onnx import export_onnx

    out = checkpoint.with_name(checkpoint.name + "-onnx")
    export_onnx(checkpoint, out, precision, progress=False)
    return str(out)


# artifact format -> export of a probe checkpoint (torch runs the checkpoint itself)
EXPORTERS: dict[str, Callable[[Path, str], str]] = {"gguf": _gguf, "onnx": _onnx}


def fit_profile(
    model_spec: str, spec: EngineSpec, threads: int | None = None, repeats: int = PROBE_REPEATS, progress: bool = True
) -> Profile:
    """Measure the probes' decode speed on ``spec`` (one interleaved ``saap bench`` group) and fit."""
    from saap.pipeline.bench import BenchSettings, environment, run_bench
    from saap.runtime.models import load_model_config

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

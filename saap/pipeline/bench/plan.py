"""Targets (``saap/pipeline/bench/targets/*.yaml``) and the plan: every (engine, device, quantization, threads)
group to measure, validated, and refused up front when this machine cannot run it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import yaml

from saap.pipeline.bench.settings import (
    DEFAULT_QUANTS,
    ENGINE_DEVICES,
    ENGINE_QUANTS,
    TARGETS_DIR,
    BenchSettings,
    RunConfig,
)
from saap.runtime.engine import ENGINES
from saap.runtime.errors import SaapError
from saap.runtime.onnx_engine import PROVIDERS


def physical_cores() -> int:
    """Physical cores (threads = physical cores is the usual best for memory-bound decode)."""
    try:
        cores, current = set(), {}
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("physical id", "core id"):
                current[key] = value.strip()
            elif not key and current:
                cores.add((current.get("physical id"), current.get("core id")))
                current = {}
        if current:
            cores.add((current.get("physical id"), current.get("core id")))
        if len(cores) > 1 or (cores and None not in next(iter(cores))):
            return len(cores)
    except OSError:
        pass
    with contextlib.suppress(Exception):
        import psutil  # optional: not a dependency of saap

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return os.cpu_count() or 1


def list_targets() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.yaml"))


def load_target(name: str) -> dict[str, Any]:
    path = Path(name) if name.endswith((".yaml", ".yml")) else TARGETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SaapError(f"unknown target '{name}' (choose from {', '.join(list_targets())}, or give a .yaml file)")
    try:
        target = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SaapError(f"cannot read target '{path}': {str(e).splitlines()[0]}") from None
    if not isinstance(target, dict) or not isinstance(target.get("runs"), list) or not target["runs"]:
        raise SaapError(f"target '{path}' has no 'runs' list")
    return target


def _target_runs(settings: BenchSettings) -> list[RunConfig]:
    """The target's runs on the engines asked for."""
    runs = []
    for entry in load_target(settings.target)["runs"]:
        engine = entry.get("engine")
        if engine not in ENGINES:
            raise SaapError(f"target '{settings.target}': unknown engine '{engine}'")
        if engine not in settings.engines:
            continue
        device = entry.get("device", "cpu")
        layers = int(entry.get("n_gpu_layers", -1 if device != "cpu" else 0))
        threads = entry.get("threads", ["physical"])
        for t in threads if isinstance(threads, list) else [threads]:
            count = physical_cores() if t in ("physical", None) else int(t)
            runs += [
                RunConfig(engine, device, str(q), count, layers)
                for q in entry.get("quantizations", DEFAULT_QUANTS[engine])
            ]
    if not runs:
        raise SaapError(f"target '{settings.target}' has no runs for engines {', '.join(settings.engines)}")
    return runs


def _settings_runs(settings: BenchSettings) -> list[RunConfig]:
    runs = []
    for engine in settings.engines:
        quants = settings.quantizations.get(engine) or DEFAULT_QUANTS[engine]
        for device in settings.devices:
            layers = settings.n_gpu_layers if engine == "gguf" and device != "cpu" else 0
            for t in settings.threads:
                runs += [RunConfig(engine, device, quant, t or physical_cores(), layers) for quant in quants]
    return runs


def plan(settings: BenchSettings) -> list[RunConfig]:
    """Every (engine, device, quantization, threads) group to measure, validated."""
    for engine in settings.engines:
        if engine not in ENGINES:
            raise SaapError(f"unknown engine '{engine}' (choose from {', '.join(ENGINES)})")
    runs = _target_runs(settings) if settings.target else _settings_runs(settings)
    for run in runs:
        if run.device not in ENGINE_DEVICES[run.engine]:
            raise SaapError(
                f"engine {run.engine} runs on {', '.join(ENGINE_DEVICES[run.engine])}, not device '{run.device}'"
            )
        if run.quant not in ENGINE_QUANTS[run.engine]:
            raise SaapError(
                f"engine {run.engine} has no quantization '{run.quant}' "
                f"(choose from {', '.join(ENGINE_QUANTS[run.engine])})"
            )
        if run.threads < 1:
            raise SaapError(f"thread count must be at least 1, not {run.threads}")
    return runs


def preflight(runs: list[RunConfig], target: str | None = None) -> None:
    """Refuse a GPU run this machine cannot do, before any export or load (no silent CPU fallback)."""
    where = f"target '{target}' needs" if target else "the benchmark needs"
    for run in runs:
        if run.device != "cpu":
            PREFLIGHTS[run.engine](run.device, where)


def _torch_preflight(device: str, where: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SaapError(f"{where} a CUDA GPU for torch, but this torch build sees none")
    if device == "mps" and not torch.backends.mps.is_available():
        raise SaapError(f"{where} Metal (MPS) for torch, which is not available here")


def _onnx_preflight(device: str, where: str) -> None:
    import onnxruntime as ort

    wanted = PROVIDERS[device][0]
    if wanted not in ort.get_available_providers():
        raise SaapError(
            f"{where} onnxruntime's {wanted}, which this onnxruntime lacks (install onnxruntime-gpu"
            f"{' with TensorRT' if device == 'tensorrt' else ''}; available: "
            f"{', '.join(ort.get_available_providers())})"
        )


def _gguf_preflight(device: str, where: str) -> None:
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        raise SaapError(
            f"{where} llama.cpp GPU offload ({device}), but this llama-cpp-python was built without "
            f'{device.upper()} (reinstall with CMAKE_ARGS="-DGGML_{device.upper()}=on")'
        )


def _genai_preflight(device: str, where: str) -> None:
    from saap.runtime.genai_engine import cuda_available

    if device == "cuda" and not cuda_available():
        raise SaapError(f"{where} onnxruntime-genai with CUDA, which this onnxruntime-genai lacks")


PREFLIGHTS = {
    "torch": _torch_preflight,
    "onnx": _onnx_preflight,
    "onnx-genai": _genai_preflight,
    "gguf": _gguf_preflight,
}

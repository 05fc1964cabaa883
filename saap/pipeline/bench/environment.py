"""The machine a document was measured on: what absolute speeds depend on, and what else ran there."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import platform
import subprocess
from typing import Any

from saap.pipeline.bench.plan import physical_cores
from saap.pipeline.bench.settings import PROJECT, RunConfig
from saap.runtime.gguf_engine import build_info

LIBRARIES = ("saap", "torch", "transformers", "onnxruntime", "onnxruntime-gpu", "llama_cpp_python", "gguf")


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0 and out.stdout.strip():
            return "; ".join(line.strip() for line in out.stdout.splitlines())
    except (OSError, subprocess.SubprocessError):
        pass
    with contextlib.suppress(Exception):
        import torch  # only when there is no NVIDIA GPU: an Apple one?

        if torch.backends.mps.is_available():
            return "Apple GPU (MPS)"
    return None


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average_1m() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def hardware_fingerprint(env: dict[str, Any]) -> str:
    """What absolute tokens/s depend on: CPU model, core count, architecture, GPU."""
    key = "|".join(str(env.get(k)) for k in ("cpu", "logical_cores", "machine", "gpu"))
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _git(args: list[str]) -> subprocess.CompletedProcess:
    """A git command in the checkout saap runs from; an installed saap has none (its answer is empty)."""
    if not (PROJECT / ".git").exists():
        return subprocess.CompletedProcess(args, 128, "", "")
    return subprocess.run(["git", *args], cwd=PROJECT, capture_output=True, text=True)


def environment(runs: list[RunConfig]) -> dict[str, Any]:
    revision, dirty = _git(["rev-parse", "--short", "HEAD"]), _git(["status", "--porcelain"])
    env = {
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "physical_cores": physical_cores(),
        "logical_cores": os.cpu_count(),
        "threads_used": sorted({r.threads for r in runs}),
        "gpu": _gpu(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": {n: v for n in LIBRARIES if (v := _version(n))},
        "git_revision": revision.stdout.strip() or None,
        "git_dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if any(r.engine == "gguf" for r in runs):
        env["llama_cpp_build"] = build_info()  # the kernels compiled in: what a gguf speed depends on
    env["hardware_fingerprint"] = hardware_fingerprint(env)
    return env

"""Helpers shared by the benchmark scripts: run a ``saap`` command, measure it, record the result."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT / "benchmarks" / "results"


def run_saap(*args: str) -> dict:
    """Run ``saap ARGS`` in a child process; return its wall time (s), peak RSS (MB) and stdout."""
    return run_python("-m", "saap.pipeline.cli", *args)


def run_python(*args: str) -> dict:
    """Run ``python ARGS`` in a child process in the project; wall time (s), peak RSS (MB), stdout."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, *args], cwd=PROJECT, stdout=subprocess.PIPE, text=True)
    stdout = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"python {' '.join(args)} failed with exit code {child.returncode}")
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "stdout": stdout.strip()}


def environment() -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True)
        git_revision = revision.stdout.strip() or None
    except OSError:  # no git on the machine (a copied tree): the caller may say which revision it is
        git_revision = os.environ.get("SAAP_GIT_REVISION")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git_revision": git_revision,
    }


def write_results(name: str, data: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)

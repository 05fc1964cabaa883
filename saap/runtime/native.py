"""Native runtimes run first in a child process, so that their crash reaches the user as one line.

A llama.cpp build whose kernels this CPU cannot run (a native build's AMX path on our Intel VMs)
dies by SIGILL, and a signal cannot be caught as an exception in the process it kills. Running the
same work in a child first turns it into a return code that the parent can describe.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]  # the folder that holds the saap package
VERBOSE_ENV = "SAAP_VERBOSE"  # non-empty (saap -v): native libraries' logs reach the terminal


def verbose() -> bool:
    """Whether native libraries may log to the terminal; children inherit it through the environment."""
    return bool(os.environ.get(VERBOSE_ENV))


def exit_description(returncode: int | None) -> str:
    """``returncode`` of a child as a user reads it: ``killed by SIGILL (illegal instruction)`` or ``exit 3``."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
        except ValueError:
            return f"killed by signal {-returncode}"
        reason = signal.strsignal(sig) or ""
        return f"killed by {sig.name}" + (f" ({reason.lower()})" if reason else "")
    return f"exit {returncode}"


def child_env(threads: int | None = None) -> dict[str, str]:
    """The environment for a ``python -m`` child of this project: it finds the project even if not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), env.get("PYTHONPATH")]))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # no oversubscription by a library's own pool
    return env


def run_module(module: str, args: list[str], threads: int | None = None) -> subprocess.CompletedProcess:
    """``python -m module args`` to completion, output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=child_env(threads), check=False
    )

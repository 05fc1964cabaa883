"""How llama-cpp-python is compiled for this machine: the CMake flags, the wheel's cache key, the rebuild line.

pip compiles llama-cpp-python from source with ``GGML_NATIVE=ON`` by default, i.e. ``-march=native``.
On Intel CPUs that list AMX, that switches on llama.cpp's AMX kernels, and on the VMs we run on
they fault (``tilezero`` → SIGILL) although the CPU and the kernel both advertise AMX. The
``-DGGML_AMX_*=OFF`` options do not help while ``-march=native`` is on, so on x86-64 we build with
``GGML_NATIVE=OFF``: ggml's portable baseline (SSE4.2, AVX, AVX2, FMA, F16C, BMI2), which every
x86-64 machine we support runs. AVX-512/VNNI on top was measured at +2-3 % decode (median of paired
rounds, inside their 0.93-1.19 spread; ``benchmarks/results/llama-cpp-builds.md``): not enough to
ship a build that then needs AVX-512 wherever the environment goes. On arm64 the native build is kept:
it has no AMX path and its dot-product / i8mm kernels matter there.

This file is read by ``scripts/setup.sh`` with the system Python before any virtualenv exists, so it
imports nothing from the project and nothing outside the standard library.

    python3 saap/runtime/llama_build.py cmake-args     # the CMAKE_ARGS for this machine
    python3 saap/runtime/llama_build.py key SPEC       # the wheel-cache key of SPEC built that way here
    python3 saap/runtime/llama_build.py wheel SPEC     # that wheel's path, compiled into the cache if missing
    python3 saap/runtime/llama_build.py rebuild        # the pip line that reinstalls such a build
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PORTABLE_X86 = ("-DGGML_NATIVE=OFF",)  # ggml then enables its x86-64 baseline, nothing the CPU may lack
LLAMA_CPP_SPEC = "llama-cpp-python==0.3.36"  # the version the test suite runs; setup.sh installs it
# CPU features that change what a native-free build may contain or how it performs; part of the cache key,
# so a wheel compiled on another CPU (or with other flags) is never picked up silently.
KEY_CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512_vnni", "amx_tile", "sve")


def machine() -> str:
    return platform.machine().lower()


def cmake_args(arch: str | None = None) -> list[str]:
    """The CMake flags for building llama.cpp on ``arch`` (this machine by default)."""
    arch = arch or machine()
    if arch in ("x86_64", "amd64", "i686", "i386"):
        return list(PORTABLE_X86)
    return []  # arm64 and the rest: llama.cpp's native build (no AMX there)


def cpu_flags() -> list[str]:
    """The key CPU feature flags this machine lists (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            listed = {w for line in f if line.startswith(("flags", "Features")) for w in line.split(":", 1)[1].split()}
    except OSError:
        return []
    return sorted(set(KEY_CPU_FLAGS) & listed)


def compiler() -> str:
    try:
        out = subprocess.run(["cc", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def build_key(spec: str = LLAMA_CPP_SPEC, args: list[str] | None = None) -> str:
    """What decides the compiled wheel: spec, flags (this machine's by default), CPU, compiler, Python."""
    identity = {
        "spec": spec,
        "cmake_args": cmake_args() if args is None else args,
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "compiler": compiler(),
        "python": f"{sys.implementation.name}{sys.version_info.major}{sys.version_info.minor}",
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def wheel_cache() -> Path:
    """Where compiled wheels are kept, one directory per ``build_key``."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "saap" / "wheels"
    return Path(os.environ.get("SAAP_WHEEL_CACHE") or default)


def build_wheel(spec: str = LLAMA_CPP_SPEC, args: list[str] | None = None) -> Path:
    """The cached wheel of ``spec`` compiled with ``args`` (this machine's flags by default); built if missing.

    ``--no-cache-dir`` because pip's own cache would hand back a wheel built with other flags; the
    build goes to a temporary directory renamed into place, so only a finished build has a key.
    pip's output goes to stderr: stdout is the wheel's path (``scripts/install-llama-cpp.sh`` reads it).
    """
    args = cmake_args() if args is None else args
    cache = wheel_cache() / build_key(spec, args)
    found = sorted(cache.glob("llama_cpp_python-*.whl"))
    if found:
        return found[0]
    flags = " ".join(args)
    print(f"compiling {spec} with CMAKE_ARGS='{flags}' (~7 min on 2 cores; cached in {cache})", file=sys.stderr)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{cache.name}.tmp-", dir=cache.parent))
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-cache-dir"]
    cmd += ["--no-binary", "llama-cpp-python", spec, "-w", str(tmp)]
    env = dict(os.environ, CMAKE_ARGS=flags)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    try:
        subprocess.run(cmd, env=env, stdout=sys.stderr, check=True)
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
    except subprocess.CalledProcessError:
        raise SystemExit(f"could not compile {spec} with CMAKE_ARGS='{flags}' (pip's output above)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed or interrupted build leaves nothing under the cache
    return next(cache.glob("llama_cpp_python-*.whl"))


def rebuild_command(spec: str = LLAMA_CPP_SPEC) -> str:
    """The plain-pip line that replaces the installed llama-cpp-python with a build that runs here."""
    args = " ".join(cmake_args())
    env = f'CMAKE_ARGS="{args}" ' if args else ""
    # --no-cache-dir: pip's wheel cache is keyed by the source, not the flags, so it would hand back the old build
    return f"{env}pip install --force-reinstall --no-cache-dir --no-deps {spec}"


def main(argv: list[str]) -> int:
    commands = {
        "cmake-args": lambda rest: " ".join(cmake_args()),
        "key": lambda rest: build_key(*rest[:1]),
        "wheel": lambda rest: build_wheel(*rest[:1]),
        "rebuild": lambda rest: rebuild_command(*rest[:1]),
        "spec": lambda rest: LLAMA_CPP_SPEC,
    }
    if not argv or argv[0] not in commands:
        print(f"usage: llama_build.py {{{'|'.join(commands)}}} [SPEC]", file=sys.stderr)
        return 2
    print(commands[argv[0]](argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

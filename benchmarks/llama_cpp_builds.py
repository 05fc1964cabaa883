"""Which llama-cpp-python build to ship: decode tok/s of the dense model per build and quantization.

    python benchmarks/llama_cpp_builds.py            # ~25 min on 2 cores if no build is cached yet

Each build variant (CMake flags) is compiled once into the keyed wheel cache that
``scripts/install-llama-cpp.sh`` uses, unpacked into a directory of its own, and run by
``saap.pipeline.bench.worker`` children with that directory ahead on ``PYTHONPATH``. All (build, quant)
workers stay loaded and every round measures each of them once, the build order reversed every
other round, so the builds are compared within one run on the same load. A build whose worker dies
(the native build's AMX SIGILL on Intel VMs) is a row saying how it died.
Writes ``benchmarks/results/llama-cpp-builds.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from _common import PROJECT, environment, write_results

sys.path.insert(0, str(PROJECT))
from saap.pipeline.bench import Worker, WorkerDied  # noqa: E402
from saap.runtime import llama_build  # noqa: E402

VARIANTS = {
    "native (pip default)": [],  # GGML_NATIVE=ON: -march=native, AMX kernels on an AMX CPU
    "portable (shipped)": list(llama_build.PORTABLE_X86),
    "portable + AVX-512/VNNI": [
        *llama_build.PORTABLE_X86,
        "-DGGML_AVX512=ON",
        "-DGGML_AVX512_VBMI=ON",
        "-DGGML_AVX512_VNNI=ON",
        "-DGGML_AVX512_BF16=ON",
        "-DGGML_AVX_VNNI=ON",
    ],
}


def unpack(whl: Path, into: Path) -> Path:
    if not into.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(into), whl])
    return into


def system_info(site: Path) -> str:
    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode().strip())"
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(site)}, capture_output=True, text=True)
    return out.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quants", default="q8_0,q4_0,f16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=PROJECT / "artifacts" / "llama-cpp-builds")
    args = parser.parse_args()
    from saap.export.gguf import export_gguf

    args.work.mkdir(parents=True, exist_ok=True)
    quants = args.quants.split(",")
    models = {}
    for q in quants:  # exported once, by the installed build's quantizer
        models[q] = args.work / f"dense-{q}.gguf"
        if not models[q].is_file():
            export_gguf("smollm2-135m", models[q], q, progress=False)
    sites = {}
    for i, (name, flags) in enumerate(VARIANTS.items()):
        sites[name] = unpack(llama_build.build_wheel(llama_build.LLAMA_CPP_SPEC, flags), args.work / f"site-{i}")
    rows, workers = {}, {}
    for name, site in sites.items():
        for q in quants:
            config = {"engine": "gguf", "artifact": str(models[q]), "device": "cpu", "threads": args.threads}
            rows[(name, q)] = {"build": name, "quant": q, "runs": [], "failed": None}
            try:
                workers[(name, q)] = Worker(config | {"n_ctx": 512, "n_gpu_layers": 0}, site=site)
            except WorkerDied as e:
                rows[(name, q)]["failed"] = str(e)
    order = list(sites)
    for round_ in range(args.rounds + 1):  # round 0 warms up and is not kept
        for q in quants:
            for name in order if round_ % 2 == 0 else order[::-1]:
                worker, row = workers.get((name, q)), rows[(name, q)]
                if worker is None or row["failed"]:
                    continue
                try:
                    timing = worker.measure(args.prompt_tokens, args.gen_tokens)
                except WorkerDied as e:
                    row["failed"] = str(e)
                    continue
                if round_:
                    row["runs"].append(round(args.gen_tokens / timing["decode_s"], 2))
                    row.setdefault("prefill_runs", []).append(round(args.prompt_tokens / timing["prefill_s"], 1))
    for w in workers.values():
        w.kill()
    builds = {name: {"cmake_args": VARIANTS[name], "system_info": system_info(site)} for name, site in sites.items()}
    data = {"environment": environment(), "settings": vars(args) | {"work": str(args.work)}, "builds": builds}
    data["rows"] = list(rows.values())
    write_results("llama-cpp-builds", data, markdown(data, quants))


def markdown(data: dict, quants: list[str]) -> str:
    s = data["settings"]
    lines = [
        "# llama-cpp-python builds: dense SmolLM2-135M decode tok/s",
        "",
        f"`python benchmarks/llama_cpp_builds.py`: {s['threads']} threads, prompt {s['prompt_tokens']}, "
        f"{s['gen_tokens']} decode steps, {s['rounds']} rounds after a warm-up, every (build, quant) worker "
        f"loaded at once and measured in turn, build order reversed every other round. CPU: "
        f"{data['environment']['cpu']}. Median (min-max) of the rounds.",
        "",
        "| build | CMake flags | " + " | ".join(f"{q} decode tok/s" for q in quants) + " |",
        "|---|---|" + "---|" * len(quants),
    ]
    for name, build in data["builds"].items():
        cells = []
        for q in quants:
            row = next(r for r in data["rows"] if r["build"] == name and r["quant"] == q)
            if row["failed"]:
                cells.append("crashed: " + row["failed"].split(" was ", 1)[-1].split(":")[0])
            else:
                runs = row["runs"]
                cells.append(f"{statistics.median(runs):.1f} ({min(runs):.1f}-{max(runs):.1f})")
        flags = " ".join(build["cmake_args"]) or "(none)"
        lines.append(f"| {name} | `{flags}` | " + " | ".join(cells) + " |")
    shipped = "portable (shipped)"
    lines += ["", f"Paired per-round decode ratio against the {shipped} build, median (min-max):", ""]
    for name in data["builds"]:
        if name == shipped:
            continue
        cells = []
        for q in quants:
            row, base = (next(r for r in data["rows"] if r["build"] == b and r["quant"] == q) for b in (name, shipped))
            if row["failed"] or base["failed"]:
                cells.append(f"{q}: –")
                continue
            ratios = [a / b for a, b in zip(row["runs"], base["runs"], strict=True)]
            cells.append(f"{q} {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
        lines.append(f"- {name}: " + ", ".join(cells))
    lines += ["", "What each build contains (`llama_cpp.llama_print_system_info()`):", ""]
    lines += [f"- {name}: `{build['system_info']}`" for name, build in data["builds"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

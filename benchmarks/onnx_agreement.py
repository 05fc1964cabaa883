"""Top-1 agreement and perplexity of each ONNX precision against fp32, for SmolLM2 pruned at 0.2.

    python benchmarks/onnx_agreement.py   # writes benchmarks/results/onnx-agreement-smollm2-135m.{json,md}

Prunes the model (`saap prune --ratio 0.2`, or takes `--checkpoint`), exports fp32 / fp16 / int8 / int4
with `saap.export.onnx.export_onnx`, and runs the first 32 WikiText-2 test windows of 128 tokens (the text
joined and tokenized once without BOS, as `saap eval` does) through torch and through each graph:
top-1 agreement of every position with the fp32 graph and with torch, and perplexity. For reference it
also measures the onnxruntime.quantization schemes the exporter does not use (--no-baselines skips them).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _common import environment, run_saap, write_results

from saap.export.onnx import ONNX_PRECISIONS, export_onnx
from saap.pipeline.data import PERPLEXITY_SETS, perplexity_text, resolve_data_file
from saap.runtime.engine import EngineSettings, load_engine
from saap.runtime.onnx_engine import OnnxSession, create_session

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,"]


def windows_of(tokenizer, count: int, seq_len: int) -> np.ndarray:
    text = perplexity_text(resolve_data_file("wikitext2", PERPLEXITY_SETS), "wikitext2")
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    return ids[: count * seq_len].reshape(count, seq_len)


def score(logits: np.ndarray, window: np.ndarray) -> tuple[np.ndarray, float]:
    """Top-1 token of every position and the summed next-token NLL (float64)."""
    shifted = logits[:-1].astype(np.float64)
    shifted -= shifted.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return logits.argmax(-1), -float(log_probs[np.arange(len(window) - 1), window[1:]].sum())


def run_graph(path: Path, windows: np.ndarray, threads: int) -> tuple[np.ndarray, float]:
    graph = OnnxSession(create_session(path, EngineSettings(threads=threads)))
    tops, nll = [], 0.0
    for window in windows:
        logits, _ = graph.run(window[None], graph.empty_cache())
        top, value = score(logits[0], window)
        tops.append(top)
        nll += value
    return np.stack(tops), nll


def decode_speed(path: Path, threads: int, steps: int = 32) -> dict:
    """Wall time of a 64-token prefill and of single-token decode steps (best of two rounds)."""
    graph = OnnxSession(create_session(path, EngineSettings(threads=threads)))
    prompt, best = np.arange(100, 164)[None], (math.inf, math.inf)
    for _ in range(2):
        started = time.perf_counter()
        _, cache = graph.run(prompt, graph.empty_cache())
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(steps):
            _, cache = graph.run(np.array([[5]]), cache)
        best = (min(best[0], prefill), min(best[1], (time.perf_counter() - started) / steps))
    return {"prefill_64_ms": round(best[0] * 1000, 1), "decode_ms_per_token": round(best[1] * 1000, 1)}


def baselines(fp32: Path, out: Path) -> dict[str, Path]:
    """The onnxruntime.quantization schemes measured before choosing the exporter's own."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger().setLevel(logging.ERROR)
    lm_head = [n.name for n in onnx.load(str(fp32), load_external_data=False).graph.node if "lm_head" in n.name]
    paths = {}
    for name, per_channel in [("quantize_dynamic int8 per-tensor", False), ("quantize_dynamic int8 per-channel", True)]:
        paths[name] = out / f"{name.replace(' ', '-')}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(fp32, paths[name], op_types_to_quantize=["MatMul"], per_channel=per_channel,
                             weight_type=QuantType.QInt8, nodes_to_exclude=lm_head)  # fmt: skip
    variants = {
        "MatMulNBits int8 asym (uint8 zero points), accuracy_level 4": {"bits": 8, "is_symmetric": False},
        "MatMulNBits int4 asym (uint4 zero points), accuracy_level 4": {"bits": 4, "is_symmetric": False},
        "MatMulNBits int4 HQQ (float zero points)": {"algo_config": HQQWeightOnlyQuantConfig(block_size=32, bits=4)},
    }
    for name, options in variants.items():
        extra = {} if "algo_config" in options else {"block_size": 32, "accuracy_level": 4}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), nodes_to_exclude=lm_head, **options, **extra)
            quantizer.process()
        paths[name] = out / f"{name.split(',')[0].replace(' ', '-')}.onnx"
        onnx.save(quantizer.model.model, str(paths[name]))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", default="0.2")
    parser.add_argument("--checkpoint", help="an existing pruned checkpoint (skips the pruning step)")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-baselines", action="store_true")
    args = parser.parse_args()
    if not args.no_baselines and importlib.util.find_spec("onnx_ir") is None:
        # onnxruntime.quantization's MatMulNBitsQuantizer imports it; saap itself does not need it
        raise SystemExit(
            "the onnxruntime.quantization baselines need onnx_ir (pip install -e .[bench]), or --no-baselines"
        )

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prune = None
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = str(tmp / "pruned")
            prune = run_saap("prune", "--model", args.model, "--ratio", args.ratio, "--out", checkpoint, "--quiet")
        exports = {p: export_onnx(checkpoint, tmp / p, p, progress=True) for p in ONNX_PRECISIONS}

        torch_engine = load_engine("torch", checkpoint, EngineSettings(threads=args.threads))
        windows = windows_of(torch_engine.tokenizer, args.windows, args.seq_len)
        torch_tops, torch_nll = [], 0.0
        with torch.inference_mode():
            for window in windows:
                top, value = score(torch_engine.model(torch.tensor(window[None])).logits[0].numpy(), window)
                torch_tops.append(top)
                torch_nll += value
        torch_tops = np.stack(torch_tops)
        scored = windows.shape[0] * (windows.shape[1] - 1)
        samples = {"torch": {p: torch_engine.detokenize(torch_engine.generate(p, 24)) for p in PROMPTS}}

        graphs = {p: tmp / p / "model.onnx" for p in ONNX_PRECISIONS}
        if not args.no_baselines:
            graphs.update(baselines(graphs["fp32"], tmp))
        rows, fp32_tops = {}, None
        for name, path in graphs.items():
            tops, nll = run_graph(path, windows, args.threads)
            fp32_tops = tops if name == "fp32" else fp32_tops
            rows[name] = {
                "top1_vs_fp32": round(float((tops == fp32_tops).mean()), 4),
                "top1_vs_torch": round(float((tops == torch_tops).mean()), 4),
                "perplexity": round(math.exp(nll / scored), 3),
                "bytes": path.stat().st_size + sum(f.stat().st_size for f in path.parent.glob(path.name + "_data")),
                **decode_speed(path, args.threads),
            }
            if name in exports:
                report = exports[name]
                rows[name].update(export_s=report["seconds"], bytes=report["model_bytes"])
                engine = load_engine("onnx", str(tmp / name), EngineSettings(threads=args.threads))
                samples[name] = {p: engine.detokenize(engine.generate(p, 24)) for p in PROMPTS}
            print(name, rows[name], flush=True)

    torch_ppl = math.exp(torch_nll / scored)
    regenerate = "python benchmarks/onnx_agreement.py"
    if args.checkpoint:  # the checkpoint is what `saap prune` makes from the same model and ratio
        prune_cmd = f"saap prune --model {args.model} --ratio {args.ratio} --out {args.checkpoint}"
        regenerate = f"{prune_cmd} && {regenerate} --checkpoint {args.checkpoint}"
    data = {
        "regenerate": regenerate,
        "model": args.model,
        "ratio": float(args.ratio),
        "checkpoint": args.checkpoint,
        "windows": int(windows.shape[0]),
        "seq_len": args.seq_len,
        "torch_perplexity": round(torch_ppl, 3),
        "prune": prune,
        "results": rows,
        "exports": {p: {k: r[k] for k in ("quantization", "checks", "timings", "seconds")} for p, r in exports.items()},
        "greedy_samples": samples,
        "environment": environment(),
    }
    lines = [
        f"# ONNX precisions of {args.model} pruned at {args.ratio}: agreement with fp32 and perplexity\n",
        f"Regenerate: `{regenerate}`. First {windows.shape[0]} WikiText-2 test windows of {args.seq_len} tokens; "
        f"top-1 = share of all {windows.size} positions whose argmax token equals the reference's. "
        f"torch float32 perplexity on the same windows: {torch_ppl:.3f}. Decode timings: onnxruntime CPU, "
        f"{args.threads} threads, batch 1, on a shared machine (indicative only).\n",
        "| graph | file MB | top-1 vs fp32 | top-1 vs torch | perplexity | export s | prefill 64 ms "
        "| decode ms/token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        label = f"**{name}**" if name in exports else name
        export_s = f"{r['export_s']:.0f}" if "export_s" in r else ""
        lines.append(
            f"| {label} | {r['bytes'] / 1e6:.1f} | {r['top1_vs_fp32']:.2%} | {r['top1_vs_torch']:.2%} "
            f"| {r['perplexity']:.2f} | {export_s} | {r['prefill_64_ms']:.0f} | {r['decode_ms_per_token']:.1f} |"
        )
    lines += [
        "",
        "Rows in bold are `saap`'s exports; the others are onnxruntime.quantization schemes for comparison.",
        "",
    ]
    lines += ["## Greedy samples (24 new tokens)", ""]
    for prompt in PROMPTS:
        lines.append(f"*{prompt}*\n")
        lines += [f"- {name}: {json.dumps(text[prompt], ensure_ascii=False)}" for name, text in samples.items()]
        lines.append("")
    write_results(f"onnx-agreement-{args.model}", data, "\n".join(lines))


if __name__ == "__main__":
    main()

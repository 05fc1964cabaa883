"""Decode speed and top-1 agreement of the traced ONNX export vs the fused graph, run by onnxruntime-genai.

    python benchmarks/onnx_fused_speed.py   # writes benchmarks/results/onnx-fused-smollm2-135m.{json,md}

Dense smollm2-135m, exported two ways:
- traced: ``saap.export.onnx.export_onnx(..., "fp32")`` (optimum-onnx trace); its int8 / int4 graphs are made by
  the same converter ``export_onnx(..., precision)`` applies to that fp32 graph (``saap.export.onnx.CONVERTERS``),
  without tracing again;
- fused: ``saap.export.onnx_fused.write_fused`` (SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization,
  GroupQueryAttention with RoPE inside, past and present sharing one buffer), at fp32 / int8 / int4 in the
  default ``offsets`` layout, plus plain MatMulNBits with integer zero points (``zero_points`` layout,
  accuracy_level 4: int8 activations) for comparison.

Each graph runs through onnxruntime-genai (``og.Model``, greedy, 2 intra-op threads set in the config's
session_options): a prompt of 128 WikiText-2 tokens, then 64 decode steps, 3 repeats, the graphs interleaved
round by round; decode tok/s = 64 / the time of those steps (median of repeats). Top-1 agreement: every
position of 16 WikiText-2 windows of 128 tokens vs the traced fp32 graph (saap's ONNX Runtime session).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import environment, write_results

from saap.export.onnx import CONVERTERS, agreement_windows, export_onnx, window_logits
from saap.export.onnx_fused import write_fused
from saap.runtime.engine import EngineSettings
from saap.runtime.models import load_model
from saap.runtime.onnx_engine import MODEL_FILE, OnnxSession, create_session

NAME = "onnx-fused-smollm2-135m"
REGENERATE = "python benchmarks/onnx_fused_speed.py"
# (label, builder, precision, fused options)
GRAPHS = [
    ("traced fp32", "traced", "fp32", {}),
    ("fused fp32", "fused", "fp32", {}),
    ("traced int8", "traced", "int8", {}),
    ("fused int8", "fused", "int8", {}),
    ("fused int8, uint8 zero points, acc 4", "fused", "int8", {"layout": "zero_points", "accuracy_level": 4}),
    ("traced int4", "traced", "int4", {}),
    ("fused int4", "fused", "int4", {}),
    ("fused int4, acc 4", "fused", "int4", {"accuracy_level": 4}),
    ("fused int4 folded", "fused", "int4", {"layout": "folded"}),
    ("fused int4 folded, acc 4", "fused", "int4", {"layout": "folded", "accuracy_level": 4}),
    ("fused int4, uint4 zero points, acc 4", "fused", "int4", {"layout": "zero_points", "accuracy_level": 4}),
]


def log(message: str) -> None:
    print(f"[fused-bench] {message}", file=sys.stderr, flush=True)


def genai_model(directory: Path, threads: int):
    import onnxruntime_genai as og

    config = og.Config(str(directory))
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def decode_once(model, prompt: np.ndarray, steps: int) -> dict:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps + 1, do_sample=False)
    generator = og.Generator(model, params)
    started = time.perf_counter()
    generator.append_tokens(prompt.astype(np.int32))
    generator.generate_next_token()  # picks the first token from the prefill's logits: no model run
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        generator.generate_next_token()  # one decode step each
    decode = time.perf_counter() - started
    return {"prefill_s": prefill, "decode_s": decode}


def folder_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.glob(MODEL_FILE + "*")) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--only", nargs="*", help="labels of GRAPHS to run (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print the table, do not write results")
    args = parser.parse_args()
    graphs = [g for g in GRAPHS if not args.only or g[0] in args.only]
    started, load_before = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]

    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    found = agreement_windows(tokenizer, max(args.windows, 1) + 1, 128)
    if found is None:
        raise SystemExit("WikiText-2 is not available here (pipeline.data)")
    windows, text_path = found
    prompt, windows = windows[-1][: args.prompt_tokens], windows[: args.windows]

    with tempfile.TemporaryDirectory(prefix="saap-fused-") as work:
        work = Path(work)
        dirs, export_s = {}, {}
        for label, builder, precision, options in graphs:
            t = time.perf_counter()
            out = work / label.replace(" ", "_").replace(",", "")
            if builder == "traced":
                fp32 = work / "traced_fp32"
                if not fp32.exists():
                    export_onnx(args.model, fp32, "fp32", "traced", progress=False, agreement_windows_count=0)
                if precision != "fp32":
                    shutil.copytree(fp32, out, ignore=shutil.ignore_patterns(MODEL_FILE + "*", "saap-onnx.json"))
                    CONVERTERS[precision](fp32 / MODEL_FILE, out / MODEL_FILE, model.config.tie_word_embeddings)
                else:
                    out = fp32
            else:
                write_fused(model, out, precision, tokenizer=tokenizer, **options)
            dirs[label], export_s[label] = out, round(time.perf_counter() - t, 1)
            log(f"{label}: written in {export_s[label]} s ({folder_mb(out):.0f} MB)")

        # top-1 agreement vs the traced fp32 graph
        def session(directory):
            return OnnxSession(create_session(directory / MODEL_FILE, EngineSettings(threads=args.threads)))

        reference = [logits.argmax(-1) for logits in window_logits(session(dirs["traced fp32"]), windows)]
        agreement = {}
        for label, *_ in graphs:
            tops = [logits.argmax(-1) for logits in window_logits(session(dirs[label]), windows)]
            same = sum(int((a == b).sum()) for a, b in zip(reference, tops, strict=True))
            agreement[label] = same / sum(len(r) for r in reference)
            log(f"{label}: top-1 agreement with traced fp32 {agreement[label]:.2%}")

        # decode speed through onnxruntime-genai, graphs interleaved round by round
        models = {label: genai_model(dirs[label], args.threads) for label, *_ in graphs}
        for model_ in models.values():  # warm-up (first-run allocations, prepacking)
            decode_once(model_, prompt[:16], 4)
        runs = {label: [] for label in models}
        for r in range(args.repeats):
            order = list(models) if r % 2 == 0 else list(models)[::-1]
            for label in order:
                runs[label].append(decode_once(models[label], prompt, args.steps))
            log(f"round {r + 1}/{args.repeats} done")
        sizes = {label: round(folder_mb(dirs[label]), 1) for label in models}
        genai_configs = {
            label: json.loads((dirs[label] / "genai_config.json").read_text())["search"]["past_present_share_buffer"]
            for label in models
        }
        del models

    rows = []
    for label, builder, precision, options in graphs:
        decode = [args.steps / run["decode_s"] for run in runs[label]]
        prefill = [run["prefill_s"] * 1000 for run in runs[label]]
        rows.append(
            {
                "graph": label,
                "builder": builder,
                "precision": precision,
                "options": options,
                "model_mb": sizes[label],
                "decode_tok_s": round(statistics.median(decode), 1),
                "decode_tok_s_runs": [round(x, 1) for x in decode],
                "prefill_ms": round(statistics.median(prefill), 1),
                "top1_vs_traced_fp32": round(agreement[label], 4),
                "past_present_share_buffer": genai_configs[label],
                "export_s": export_s[label],
            }
        )
    doc = {
        "regenerate": REGENERATE,
        "model": args.model,
        "settings": {
            "threads": args.threads,
            "prompt_tokens": args.prompt_tokens,
            "decode_steps": args.steps,
            "repeats": args.repeats,
            "agreement_windows": len(windows),
            "agreement_seq_len": 128,
            "text": text_path,
        },
        "environment": environment(),
        "packages": _versions(),
        "load_average_start_end": [load_before, [round(x, 2) for x in os.getloadavg()]],
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    markdown = _markdown(doc)
    if args.no_write:
        print(markdown)
    else:
        write_results(NAME, doc, markdown)


def _versions() -> dict:
    import importlib.metadata

    return {name: importlib.metadata.version(name) for name in ("onnxruntime", "onnxruntime-genai", "onnx")}


def _markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = [
        f"# Traced vs fused ONNX graph of {doc['model']} under onnxruntime-genai",
        "",
        f"Regenerate: `{doc['regenerate']}` ({doc['seconds']:.0f} s). onnxruntime {doc['packages']['onnxruntime']}, "
        f"onnxruntime-genai {doc['packages']['onnxruntime-genai']}, CPU, {s['threads']} intra-op threads, "
        f"greedy; prompt {s['prompt_tokens']} WikiText-2 tokens, {s['decode_steps']} decode steps, "
        f"median of {s['repeats']} interleaved repeats (after a warm-up). Top-1 agreement: all positions of "
        f"{s['agreement_windows']} WikiText-2 test windows of {s['agreement_seq_len']} tokens vs the traced fp32 "
        f"graph. Shared 2-core machine (load average 1/5/15 min at start {doc['load_average_start_end'][0]}, "
        f"at end {doc['load_average_start_end'][1]}): timings indicative, ratios within one run more so.",
        "",
        "| graph | MB | decode tok/s | (runs) | prefill ms | top-1 vs traced fp32 | shared KV buffer |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in doc["rows"]:
        runs = ", ".join(f"{x:.0f}" for x in row["decode_tok_s_runs"])
        lines.append(
            f"| {row['graph']} | {row['model_mb']:.0f} | **{row['decode_tok_s']:.1f}** | {runs} | "
            f"{row['prefill_ms']:.0f} | {row['top1_vs_traced_fp32']:.2%} | {row['past_present_share_buffer']} |"
        )
    lines += [
        "",
        "traced = `saap.export.onnx` (optimum-onnx trace; int8/int4 by its block-quantization converter). "
        "fused = `saap.export.onnx_fused` (SkipSimplifiedLayerNormalization, packed QKV MatMul, GroupQueryAttention "
        "with RoPE inside; int8/int4 `offsets` layout = the same block scheme as export.onnx: 4-bit MatMulNBits "
        "kernel with float32 activations plus per-block float offsets, so weights on the Q4_1 grid of the "
        "embedded model are stored exactly; int4 keeps down_proj at 8 bits unless its weights already sit on the "
        "4-bit grid, as every unpruned one here does; embedding/lm_head 8-bit with top-8 logits refined). "
        "`zero points` rows = plain MatMulNBits with integer zero points and int8 activations (accuracy_level 4), "
        "as onnxruntime's quantizer (and onnxruntime-genai's builder on CPU) writes it.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

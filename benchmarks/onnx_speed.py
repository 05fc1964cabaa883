"""ONNX Runtime decode speed: saap's fused exports against onnxruntime-genai's model builder, and pruned
exports against their weight-byte ratio.

    python benchmarks/onnx_speed.py --builder-python /path/to/builder-venv/bin/python
    # writes benchmarks/results/onnx-speed-smollm2-135m.{json,md}

1. The reference: onnxruntime-genai's model builder converts the dense checkpoint (SmolLM2-135M as saap
   dequantizes it from its GGUF) at ``int4`` and ``fp32`` for the CPU. The builder needs transformers >= 5,
   which optimum-onnx's pin excludes, so it runs from its own virtualenv (``--builder-python``; made with
   ``python -m venv V && V/bin/pip install torch onnxruntime-genai onnx_ir onnxscript "transformers>=5"``).
   Without one the comparison is skipped and the table says so.
2. Ours: ``saap export onnx`` at fp32 / int8 / int4 (the fused graph, the default), and int4 with int8
   activations (``--accuracy-level 4``, the builder's own CPU setting).
3. One ``saap bench`` run over all of them on both ONNX drivers, saap's own engine (I/O binding, shared KV
   buffer) and onnxruntime-genai's ``og.Generator``, interleaved repeat by repeat.
4. Top-1 agreement of every graph with our fp32 graph on the first 16 WikiText-2 test windows of 128 tokens.
5. A second ``saap bench`` run: the dense model and SAAP at 20 % and 50 % (``--checkpoints``, pruned by
   ``saap prune --method saap --ratio R`` if absent) at int8 and int4, on saap's engine: each pruned model's
   decode speed-up against the ideal one, the ratio of weight bytes read per token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from _common import PROJECT, RESULTS, environment, run_saap, write_results

from saap.export.genai_builder import build_reference, builder_source, check_builder
from saap.export.onnx import agreement_windows, top1_agreement
from saap.runtime.engine import EngineSettings
from saap.runtime.models import load_model
from saap.runtime.onnx_engine import MODEL_FILE, OnnxSession, create_session, genai_settings

NAME = "onnx-speed-smollm2-135m"
MODEL = "smollm2-135m"
# our exports: name -> saap export onnx flags (int4-acc4: int8 activations, the builder's own CPU setting)
OURS = {
    "saap-fp32": ["--precision", "fp32"],
    "saap-int8": ["--precision", "int8"],
    "saap-int4": ["--precision", "int4"],
    "saap-int4-acc4": ["--precision", "int4", "--accuracy-level", "4"],
}
BUILDER = ("int4", "fp32")
PRUNED = {"saap-p20": 0.2, "saap-p50": 0.5}
AGREEMENT_WINDOWS, SEQ_LEN = 16, 128
THREADS, GEN_TOKENS = 2, 64


def agreement(directories: dict[str, Path], reference: str, tokenizer) -> dict[str, float]:
    windows, _ = agreement_windows(tokenizer, AGREEMENT_WINDOWS, SEQ_LEN)

    def session(path: Path) -> OnnxSession:
        head_size = genai_settings(path).get("model", {}).get("decoder", {}).get("head_size")
        return OnnxSession(create_session(path / MODEL_FILE, EngineSettings(threads=THREADS)), head_size)

    fp32 = session(directories[reference])
    return {name: round(top1_agreement(fp32, session(path), windows), 4) for name, path in directories.items()}


def bench(models: list[str], flags: list[str], out: Path, repeats: int) -> dict:
    run_saap("bench", "--models", *models, *flags, "--threads", str(THREADS), "--gen-tokens", str(GEN_TOKENS),
             "--repeats", str(repeats), "--out", str(out), "--quiet")  # fmt: skip
    return json.loads(out.read_text())


def decode(doc: dict) -> dict[tuple[str, str], dict]:
    """(model, engine) -> decode tok/s statistics at the one prompt length."""
    return {(r["model"], r["engine"]): next(iter(r["by_prompt"].values()))["decode_tok_s"] for r in doc["results"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown-only", action="store_true", help="re-render the committed .md from its .json")
    parser.add_argument("--builder-python", help="a Python with onnxruntime-genai's builder (transformers >= 5)")
    parser.add_argument("--checkpoints", default=str(PROJECT / "artifacts"), help="holds saap-p20/, saap-p50/")
    parser.add_argument("--work", default=str(PROJECT / "artifacts" / "onnx-speed"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.markdown_only:
        data = json.loads((RESULTS / f"{NAME}.json").read_text())
        (RESULTS / f"{NAME}.md").write_text(markdown(data))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(MODEL)
    source = builder_source(MODEL, work)  # the checkpoint the builder reads: the dense model as saap loads it

    directories: dict[str, Path] = {}
    for name, flags in OURS.items():
        out = work / name
        if not (out / MODEL_FILE).is_file():
            run_saap("export", "onnx", "--model", MODEL, *flags, "--out", str(out), "--overwrite", "--quiet")
        directories[name] = out
    builder_note = "not run: no --builder-python given"
    if args.builder_python:
        check_builder(args.builder_python)
        for precision in BUILDER:
            out = work / f"genai-builder-{precision}"
            build_reference(args.builder_python, source, out, precision)
            directories[f"genai-builder-{precision}"] = out
        builder_note = subprocess.run(
            [args.builder_python, "-c", "import onnxruntime_genai, transformers; "
             "print(f'onnxruntime-genai {onnxruntime_genai.__version__}, transformers {transformers.__version__}')"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip

    top1 = agreement(directories, "saap-fp32", loaded.tokenizer)
    drivers = bench([f"{n}={p}" for n, p in directories.items()], ["--engines", "onnx", "onnx-genai",
                    "--onnx-precision", "fp32"], work / "drivers.json", args.repeats)  # fmt: skip

    checkpoints = Path(args.checkpoints)
    for name, ratio in PRUNED.items():
        if not (checkpoints / name / "saap.json").is_file():
            run_saap("prune", "--model", MODEL, "--method", "saap", "--ratio", str(ratio), "--out",
                     str(checkpoints / name), "--quiet")  # fmt: skip
    pruned = bench([MODEL, *(f"{n}={checkpoints / n}" for n in PRUNED)], ["--engines", "onnx", "--onnx-precision",
                   "int8", "int4"], work / "pruned.json", args.repeats)  # fmt: skip

    data = {
        "regenerate": "python benchmarks/onnx_speed.py --builder-python <builder venv>/bin/python",
        "builder": builder_note,
        "top1_vs_saap_fp32": top1,
        "agreement_text": f"wikitext2 test, first {AGREEMENT_WINDOWS} windows of {SEQ_LEN} tokens",
        "drivers": drivers,
        "pruned": pruned,
        "environment": environment(),
    }
    write_results(NAME, data, markdown(data))


def markdown(data: dict) -> str:
    drivers, pruned = data["drivers"], data["pruned"]
    speed = decode(drivers)
    s = drivers["settings"]
    env = drivers["environment"]
    lines = [
        "# ONNX decode speed of smollm2-135m: saap's fused exports vs onnxruntime-genai's model builder",
        "",
        f"Regenerate: `{data['regenerate']}`. Builder: {data['builder']}. {env.get('cpu', '')}, "
        f"{s['threads'][0]} threads, prompt {s['prompt_tokens'][0]} tokens, {s['gen_tokens']} decode steps, "
        f"{s['repeats']} repeats, every graph on both drivers in one `saap bench` run, interleaved. Top-1 "
        f"agreement: every position of {data['agreement_text']}, against saap's fp32 graph.",
        "",
        "| graph | MB | decode tok/s, saap engine | onnxruntime-genai | top-1 = fp32 |",
        "|---|---|---|---|---|",
    ]
    sizes = {r["model"]: r["artifact_bytes"] for r in drivers["results"]}
    for name, top1 in data["top1_vs_saap_fp32"].items():
        cells = []
        for engine in ("onnx", "onnx-genai"):
            st = speed.get((name, engine))
            cells.append(f"**{st['median']:.1f}** ({st['min']:.0f}–{st['max']:.0f})" if st else "failed")
        lines.append(f"| {name} | {sizes[name] / 1e6:.0f} | {cells[0]} | {cells[1]} | {top1:.2%} |")
    lines += ["", "Ratios (median tok/s, same driver):", ""]
    pairs = [
        ("saap-int4", "genai-builder-int4"),
        ("saap-int4-acc4", "genai-builder-int4"),
        ("saap-fp32", "genai-builder-fp32"),
    ]
    for ours, theirs in pairs:
        for engine in ("onnx", "onnx-genai"):
            a, b = speed.get((ours, engine)), speed.get((theirs, engine))
            if a and b:
                lines.append(f"- {ours} / {theirs} on {engine}: **{a['median'] / b['median']:.2f}**")
    lines += [
        "",
        "## Pruned exports against their weight-byte ratio (saap engine, one `saap bench` run)",
        "",
        "| model | precision | decode tok/s | speed-up (paired) | ideal (weight bytes) | efficiency |",
        "|---|---|---|---|---|---|",
    ]
    rows = {(r["model"], r["quant"]): r for r in pruned["results"]}
    for (model, quant), row in rows.items():
        if model == MODEL:
            st = next(iter(row["by_prompt"].values()))["decode_tok_s"]
            lines.append(f"| {model} (dense) | {quant} | {st['median']:.1f} | | | |")
    for sp in pruned["speedups"]:
        st = next(iter(rows[(sp["model"], sp["quant"])]["by_prompt"].values()))["decode_tok_s"]
        d = sp["decode_speedup"]
        lines.append(
            f"| {sp['model']} | {sp['quant']} | {st['median']:.1f} | {d['median']:.2f} ({d['min']:.2f}–{d['max']:.2f}) "
            f"| {sp['ideal_speedup']:.2f} | **{sp['efficiency']:.2f}** |"
        )
    spreads = [
        (st["max"] - st["min"]) / st["median"]
        for doc in (drivers, pruned)
        for r in doc["results"]
        for st in [next(iter(r["by_prompt"].values()))["decode_tok_s"]]
    ]
    noisy = [x for x in spreads if x > 0.10]
    if noisy:
        lines += [
            "",
            f"Noise: {len(noisy)} of {len(spreads)} rows spread more than 10 % over their repeats (up to "
            f"{max(noisy):.0%}; `saap bench` warns of each): absolute tok/s are indicative, the paired "
            "ratios of one run less noisy.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

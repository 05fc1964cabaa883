"""Perplexity of the dense model and of `saap prune --method llm-pruner` at ratio 0.2.

    python benchmarks/prune_quality.py   # writes benchmarks/results/prune_quality-smollm2-135m.{json,md}

WikiText-2 (test) and PTB (validation), windows of 128 tokens, the first 512 windows (the protocol
of the reference figure: LLM-Pruner's own code at 20.9 % gives 214 against ~55 dense) and all windows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import environment, run_saap, write_results


def evaluate(model: str, limit: str | None, out: Path) -> dict:
    args = ["eval", "--model", model, "--ppl", "wikitext2", "ptb", "--seq-len", "128", "--quiet", "--out", str(out)]
    run = run_saap(*args, *(["--ppl-windows", limit] if limit else []))
    results = json.loads(out.read_text())
    return {
        "params": results["params"],
        "wall_s": run["wall_s"],
        **{name: {"perplexity": r["perplexity"], "windows": r["windows"]} for name, r in results["perplexity"].items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", default="0.2")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        pruned = f"{tmp}/pruned"
        prune = run_saap("prune", "--model", args.model, "--ratio", args.ratio, "--method", "llm-pruner",
                         "--out", pruned, "--quiet")  # fmt: skip
        rows = {}
        for label, model in [("dense", args.model), ("llm-pruner", pruned)]:
            for limit in ("512", None):
                rows[f"{label}/{limit or 'all'}"] = evaluate(model, limit, Path(tmp) / "eval.json")
        ratio_achieved = json.loads(Path(pruned, "saap.json").read_text())["ratio_achieved"]

    data = {
        "regenerate": "python benchmarks/prune_quality.py",
        "model": args.model,
        "ratio_requested": float(args.ratio),
        "ratio_achieved": ratio_achieved,
        "prune": prune,
        "results": rows,
        "environment": environment(),
    }
    lines = [
        f"# Perplexity of {args.model}: dense vs llm-pruner at {ratio_achieved:.1%} removed (no fine-tuning)\n",
        "Regenerate: `python benchmarks/prune_quality.py`. Windows of 128 tokens.\n",
        "| model | params | windows | WikiText-2 | PTB |",
        "|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        label, _ = key.split("/")
        windows = f"{r['wikitext2']['windows']} / {r['ptb']['windows']}"
        wikitext2, ptb = r["wikitext2"]["perplexity"], r["ptb"]["perplexity"]
        lines.append(f"| {label} | {r['params']:,} | {windows} | {wikitext2:.2f} | {ptb:.2f} |")
    write_results(f"prune_quality-{args.model}", data, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Wall time and peak RSS of `saap prune` on SmolLM2-135M at ratio 0.2 (32 x 128-token calibration).

    python benchmarks/prune_cost.py            # writes benchmarks/results/prune_cost-smollm2-135m.{json,md}

Target on 2 CPU cores: <= 3 minutes, peak RSS <= 2 GB. The model is loaded once beforehand so
the figure is the warm-cache cost (the first-ever load also decodes the GGUF, reported apart).
"""

from __future__ import annotations

import argparse
import tempfile

from _common import environment, run_saap, write_results

TARGET_SECONDS, TARGET_RSS_MB = 180, 2048


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    warm = run_saap("eval", "--model", args.model, "--ppl", "wikitext2", "--ppl-windows", "1", "--quiet")
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(
                run_saap(
                    "prune",
                    "--model",
                    args.model,
                    "--ratio",
                    "0.2",
                    "--method",
                    "llm-pruner",
                    "--num-samples",
                    "32",
                    "--seq-len",
                    "128",
                    "--out",
                    f"{tmp}/out",
                    "--quiet",
                )  # fmt: skip
            )
    wall = sorted(r["wall_s"] for r in runs)[len(runs) // 2]
    rss = max(r["peak_rss_mb"] for r in runs)
    data = {
        "command": f"saap prune --model {args.model} --ratio 0.2 --method llm-pruner --num-samples 32 --seq-len 128",
        "regenerate": "python benchmarks/prune_cost.py",
        "runs": runs,
        "median_wall_s": wall,
        "max_peak_rss_mb": rss,
        "load_and_score_one_window": warm,
        "targets": {"wall_s": TARGET_SECONDS, "peak_rss_mb": TARGET_RSS_MB},
        "meets_targets": wall <= TARGET_SECONDS and rss <= TARGET_RSS_MB,
        "environment": environment(),
    }
    markdown = (
        f"# Prune cost: {args.model}, ratio 0.2, 32 x 128 calibration tokens\n\n"
        f"Regenerate: `python benchmarks/prune_cost.py` ({data['environment']['cpu']}, "
        f"{data['environment']['cores']} cores)\n\n"
        "| run | wall (s) | peak RSS (MB) |\n|---|---|---|\n"
        + "".join(f"| {i + 1} | {r['wall_s']} | {r['peak_rss_mb']} |\n" for i, r in enumerate(runs))
        + f"\nMedian wall {wall} s (target <= {TARGET_SECONDS}), peak RSS {rss} MB (target <= {TARGET_RSS_MB}): "
        + ("**meets the targets**" if data["meets_targets"] else "**misses a target**")
        + "\n"
    )
    write_results(f"prune_cost-{args.model}", data, markdown)


if __name__ == "__main__":
    main()

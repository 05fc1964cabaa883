"""Wall time and peak RSS of `saap prune` (its defaults: --method saap, the measured allocation) on
SmolLM2-135M at ratio 0.2, every other setting at its default (64 x 128-token C4 calibration, the KL
measured on 8 sequences).

    python benchmarks/prune_cost.py            # writes benchmarks/results/prune_cost-smollm2-135m.{json,md}

Target on 2 CPU cores: <= 10 minutes, peak RSS <= 3 GB. The model is loaded once beforehand so
the figure is the warm-cache cost (the first-ever load also decodes the GGUF, reported apart).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import environment, run_saap, write_results

TARGET_SECONDS, TARGET_RSS_MB = 600, 3072


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    warm = run_saap("eval", "--model", args.model, "--ppl", "wikitext2", "--ppl-windows", "1", "--quiet")
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            run = run_saap("prune", "--model", args.model, "--ratio", "0.2", "--out", f"{tmp}/out", "--quiet")
            record = json.loads(Path(f"{tmp}/out/saap.json").read_text())
            run["settings"] = {k: record["settings"][k] for k in ("calibration", "num_samples", "seq_len")}
            run["search"] = record.get("measured")  # its own seconds and partial-forward count
            run["evolution"] = record.get("evolution")  # the whole-plan search after it
            run["prune_seconds"] = record["prune_seconds"]
            runs.append(run)
    wall = sorted(r["wall_s"] for r in runs)[len(runs) // 2]
    rss = max(r["peak_rss_mb"] for r in runs)
    data = {
        "command": f"saap prune --model {args.model} --ratio 0.2",
        "regenerate": "python benchmarks/prune_cost.py",
        "runs": runs,
        "median_wall_s": wall,
        "max_peak_rss_mb": rss,
        "load_and_score_one_window": warm,
        "targets": {"wall_s": TARGET_SECONDS, "peak_rss_mb": TARGET_RSS_MB},
        "meets_targets": wall <= TARGET_SECONDS and rss <= TARGET_RSS_MB,
        "environment": environment(),
    }
    used = runs[0]["settings"]
    markdown = (
        f"# Prune cost: {args.model}, ratio 0.2, {used['num_samples']} x {used['seq_len']} calibration tokens "
        f"(`{used['calibration']}`)\n\n"
        f"Regenerate: `python benchmarks/prune_cost.py` ({data['environment']['cpu']}, "
        f"{data['environment']['cores']} cores)\n\n"
        "| run | wall (s) | of which measured search (s) | search partial forwards | of which plan evolution (s) "
        "| peak RSS (MB) |\n"
        "|---|---|---|---|---|---|\n"
        + "".join(
            f"| {i + 1} | {r['wall_s']} | {(r['search'] or {}).get('seconds', '-')} | "
            f"{(r['search'] or {}).get('runs', '-')} | {(r.get('evolution') or {}).get('seconds', '-')} "
            f"| {r['peak_rss_mb']} |\n"
            for i, r in enumerate(runs)
        )
        + f"\nMedian wall {wall} s (target <= {TARGET_SECONDS}), peak RSS {rss} MB (target <= {TARGET_RSS_MB}): "
        + ("**meets the targets**" if data["meets_targets"] else "**misses a target**")
        + "\n"
        + scaling(runs[0])
    )
    write_results(f"prune_cost-{args.model}", data, markdown)


def scaling(run: dict) -> str:
    """How the cost grows: the measured search's share, per partial forward."""
    search = run.get("search")
    if not search:
        return ""
    per_run = search["seconds"] / search["runs"]
    return (
        f"\nThe measured search took {search['seconds']} s of the {run['prune_seconds']} s prune: {search['runs']} "
        f"partial forwards of {search['search_samples']} x 128 tokens, {per_run * 1000:.0f} ms each. It grows as "
        "passes x layers x (kept-KV counts + width levels + 2) partial forwards of search-samples x seq-len tokens, "
        "each about half a forward of the model; the importance pass is one forward + backward per calibration "
        "sequence."
        + (
            f" The plan evolution ({evolution['generations']} generations) took {evolution['seconds']} s: per "
            "generation 8 children on 4 sequences and 2 on 16, each from the earliest layer it changes (about "
            "64 sequence half-forwards a generation), growing as generations x layers x tokens."
            if (evolution := run.get("evolution"))
            else ""
        )
        + "\n"
    )


if __name__ == "__main__":
    main()

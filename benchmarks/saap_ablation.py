"""What each part of SAAP contributes: importance fusion and structure search switched one at a time.

    python benchmarks/saap_ablation.py --ppl-windows 256        # the committed table (~4 min a cell on 2 CPU cores)
    python benchmarks/saap_ablation.py --tasks boolq piqa --limit 300 --device cuda   # full sets + zero-shot, GPU

Every variant prunes SmolLM2-135M with ``saap prune --method saap`` plus the variant's flags, with the
same calibration data as ``benchmarks/quality.py``, and is scored the same way (perplexity on a dev text,
WikiText-2 and PTB — full sets unless ``--ppl-windows``, ~14 minutes a cell on 2 CPU cores; zero-shot only
when ``--tasks`` is given). The plot shows the per-layer shapes each variant chose, the "where does the
budget go" side of the search.

Resumable like ``quality.py``: each (variant, ratio) is stored in ``<cells-dir>/<variant>-<ratio>.json``
and reused while its settings match.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, environment
from quality import LATER_SETTINGS, PPL_SETS, add_sitting_arguments, evaluate_cell, prune_cell, settings_match

from saap.pipeline.data import BOOKS_CALIBRATION, WEB_CALIBRATION
from saap.pipeline.prune.methods import DEFAULT_NUM_SAMPLES
from saap.runtime.io import write_json_atomic, write_text_atomic

# Held-out text that neither calibration nor the reported tables use: defaults are chosen on it, not on the
# test splits (WikiText-2 test / PTB are reported beside it).
DEV_SET = "calibration/wikipedia_articles.txt"
# The first cells predate the --calibration and --num-samples settings: books, 32 sequences.
ABLATION_LATER_SETTINGS = LATER_SETTINGS | {"calibration": BOOKS_CALIBRATION, "num_samples": DEFAULT_NUM_SAMPLES}

# Measured variants without "evo" pin the plan evolution off: it became the default after their cells.
NO_EVOLUTION = ("--search-generations", "0")
# Pinned rather than left to the default, so an "evo" cell means the same run if the default moves.
EVOLUTION = ("--search-generations", "24")
C4_64 = ("--calibration", WEB_CALIBRATION, "--num-samples", "64")  # saap's default calibration
# name -> extra `saap prune` flags (after --calibration / --num-samples, so a variant's own win); the
# first is SAAP's default allocation and importance.
VARIANTS: dict[str, tuple[str, ...]] = {
    "fused-measured": NO_EVOLUTION,
    "fused-measured-c4": ("--calibration", WEB_CALIBRATION, *NO_EVOLUTION),  # saap's default calibration text
    "fused-measured-16samples": ("--search-samples", "16", *NO_EVOLUTION),
    "fused-measured-2pass": ("--search-passes", "2", *NO_EVOLUTION),
    "fused-measured-4samples": ("--search-samples", "4", *NO_EVOLUTION),
    "fused-measured-c4-ls": ("--calibration", WEB_CALIBRATION, "--compensation", "least-squares", *NO_EVOLUTION),
    "fused-measured-c4-16samples": ("--calibration", WEB_CALIBRATION, "--search-samples", "16", *NO_EVOLUTION),
    "fused-measured-c4-64calib": (*C4_64, *NO_EVOLUTION),
    "fused-measured-c4-64calib-evo": (*C4_64, *EVOLUTION),
    # the default plus the opt-in least-squares refit of the narrowed projections
    "fused-measured-c4-64calib-evo-ls": (*C4_64, *EVOLUTION, "--compensation", "least-squares"),
    # the search's two halves alone: whole blocks (a measured ShortGPT) or narrowing (a measured LLM-Pruner)
    "fused-measured-c4-64calib-depth": (*C4_64, "--search-moves", "depth", *NO_EVOLUTION),
    "fused-measured-c4-64calib-width": (*C4_64, "--search-moves", "width", *NO_EVOLUTION),
    "element-measured": ("--ablation", "element", *NO_EVOLUTION),
    "fused-uniform": ("--allocation", "uniform-range"),
    "sum-uniform": ("--ablation", "sum", "--allocation", "uniform-range"),
    "vector-uniform": ("--ablation", "vector", "--allocation", "uniform-range"),
    "element-uniform": ("--ablation", "element", "--allocation", "uniform-range"),
    "fused-adaptive": ("--allocation", "adaptive"),
    "fused-adaptive-nofluct": ("--allocation", "adaptive", "--fluctuation-weight", "0"),
}


def cell_matches(cell: dict, current: dict) -> bool:
    """Whether a stored cell was made with the ``current`` settings. A measured cell pruned before the
    plan evolution existed has no evolution in its record: it ran as ``--search-generations 0`` asks."""
    stored = cell["settings"]
    evolution_flag = any(flag == NO_EVOLUTION[0] for flag in stored["flags"])
    if current["flags"][-2:] == list(NO_EVOLUTION) and "evolution" not in cell["prune"] and not evolution_flag:
        stored = stored | {"flags": [*stored["flags"], *NO_EVOLUTION]}
    return settings_match(stored, current, ABLATION_LATER_SETTINGS)


def cell_settings(args: argparse.Namespace, variant: str) -> dict:
    return {
        "model": args.model,
        "flags": list(VARIANTS[variant]),
        "calibration": args.calibration,
        "num_samples": args.num_samples,
        "dev_set": DEV_SET,
        "limit": args.limit,
        "ppl_windows": args.ppl_windows,
        "tasks": list(args.tasks),
        "seq_len": 128,
        "device": args.device,
        "eval_batch_size": args.batch_size,
    }


def run_cell(variant: str, ratio: float, args: argparse.Namespace, path: Path) -> dict:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "pruned"
        cell = {"variant": variant, "ratio": ratio, "settings": cell_settings(args, variant)}
        flags = ("--calibration", args.calibration, "--num-samples", str(args.num_samples), *VARIANTS[variant])
        cell["prune"] = prune_cell("saap", ratio, args.model, model, args.device, flags)
        cell |= evaluate_cell(str(model), args, Path(tmp) / "eval.json", (DEV_SET, *PPL_SETS))
    cell["total_wall_s"] = round(time.perf_counter() - started, 1)
    cell["environment"] = environment()
    write_json_atomic(path, cell)
    return cell


def removed_blocks(layers: list[dict]) -> str:
    attention = sum(1 for layer in layers if layer["num_attention_heads"] == 0)
    mlp = sum(1 for layer in layers if layer["intermediate_size"] == 0)
    return f"{attention} / {mlp}"


def weights(cell: dict, module: str) -> str:
    w = cell["prune"].get("metric_weights", {}).get(module)
    return f"{w['vector'] / (w['vector'] + w['element']):.2f}" if w else "—"


def markdown(data: dict) -> str:
    tasks = data["settings"]["tasks"]
    lines = [
        "# SAAP ablation on smollm2-135m: one component switched at a time, no fine-tuning",
        "",
        f"Regenerate: `{data['regenerate']}`. Perplexity over "
        f"{'all' if not data['settings']['ppl_windows'] else 'the first ' + str(data['settings']['ppl_windows'])} "
        f"128-token windows of the dev text (`{DEV_SET}`, which calibration does not use; defaults are chosen on "
        "it), WikiText-2 (test) and PTB (validation). `fused` = uncertainty-weighted fusion of the "
        "vector- and element-wise Taylor scores (SAAP), `sum` = plain sum of the normalised scores, `vector` / "
        "`element` = one score alone; `measured` = depth and width allocated on measured calibration KL (the default; "
        "`2pass`: re-measured at the first plan, `4samples` / `16samples`: KL on 4 / 16 sequences instead of 8; "
        "`64calib`: importance scored on 64 calibration sequences instead of 32; `evo`: the plan then evolved as a "
        "whole on its calibration KL for 24 generations, `--search-generations 24` (the others without it); "
        "`depth` / `width`: the search restricted to removing whole attention / MLP blocks, or to narrowing them, "
        "`--search-moves`; `c4`: calibrated on C4 web text "
        "instead of the sitting's calibration text; `ls`: then o_proj / down_proj "
        "re-fitted by least squares, `--compensation least-squares`), `uniform` = one ratio in "
        "layers 4–27, `adaptive` = the global search ranked by importance per parameter × (1 + CV), `nofluct` = that "
        "search without the fluctuation term. "
        "w_V share = the vector-wise score's weight / (vector + element weights) in the fused score (attention, MLP). "
        f"Calibration text of every variant (unless it names its own): `{data['settings']['calibration']}`, "
        f"{data['settings']['num_samples']} sequences.",
        "",
        "| variant | ratio | removed | dev (Wikipedia) | WikiText-2 | PTB | "
        + "".join(f"{t} | " for t in tasks)
        + ("average | " if tasks else "")
        + "w_V share attn | w_V share mlp | layers without attention / MLP |",
        "|---|---|---|---|---|---|" + "---|" * (len(tasks) + (1 if tasks else 0)) + "---|---|---|",
    ]
    for c in data["cells"]:
        ppl = [f"{c['perplexity'][p]['value']:.2f}" for p in (DEV_SET, *PPL_SETS)]
        z = c.get("zeroshot")
        accs = [f"{z['tasks'][t]['value']:.3f}" for t in tasks] + [f"{z['average']:.4f}"] if z else []
        lines.append(
            f"| {c['variant']} | {c['ratio']:g} | {c['prune']['ratio_achieved']:.1%} | "
            + " | ".join(ppl + accs)
            + f" | {weights(c, 'attention')} | {weights(c, 'mlp')} | {removed_blocks(c['prune']['layers'])} |"
        )
    if data["missing"]:
        lines += ["", f"**Not yet computed**: {', '.join(data['missing'])}."]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({c["ratio"] for c in data["cells"]})
    fig, axes = plt.subplots(len(ratios), 2, figsize=(12, 3.6 * len(ratios)), squeeze=False)
    for row, ratio in zip(axes, ratios, strict=True):
        for c in (c for c in data["cells"] if c["ratio"] == ratio):
            layers = c["prune"]["layers"]
            label = f"{c['variant']} ({c['perplexity'][DEV_SET]['value']:.0f})"
            row[0].plot([layer["num_attention_heads"] for layer in layers], marker=".", label=label)
            row[1].plot([layer["intermediate_size"] for layer in layers], marker=".", label=label)
        row[0].set_title(f"query heads kept per layer, {ratio:g} removed")
        row[1].set_title(f"MLP width kept per layer, {ratio:g} removed")
        for ax in row:
            ax.set_xlabel("layer")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7, title="variant (dev perplexity)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sitting_arguments(parser, "saap-ablation-smollm2-135m", RESULTS / "saap-ablation", [])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    # One text for every variant, so the rows compare components, not calibration texts; the books are
    # what the committed cells were made with (saap's default became C4 later: the -c4 variant).
    parser.add_argument("--calibration", default=BOOKS_CALIBRATION, help="calibration text of every variant")
    # The same holds for the sequences scored (saap's default became 64 later: the -64calib variant).
    parser.add_argument(
        "--num-samples", type=int, default=DEFAULT_NUM_SAMPLES, help="calibration sequences of every variant"
    )
    args = parser.parse_args()

    cells, missing = [], []
    for ratio in args.ratios:
        for variant in args.variants:
            path = args.cells_dir / f"{variant}-{ratio:g}.json"
            if path.is_file() and cell_matches(json.loads(path.read_text()), cell_settings(args, variant)):
                print(f"{path.name}: done, skipped", flush=True)
                cells.append(json.loads(path.read_text()))
            elif args.stored_only:
                missing.append(path.stem)
            else:
                print(f"{path.name}: running", flush=True)
                cells.append(run_cell(variant, ratio, args, path))

    data = {
        "regenerate": " ".join(
            ["python benchmarks/saap_ablation.py", *(a for a in sys.argv[1:] if a != "--stored-only")]
        ),
        "settings": {k: v for k, v in cell_settings(args, args.variants[0]).items() if k != "flags"},
        "cells": cells,
        "missing": missing,
        "environment": environment(),
    }
    write_json_atomic(RESULTS / f"{args.out_name}.json", data)
    text = markdown(data)
    write_text_atomic(RESULTS / f"{args.out_name}.md", text)
    if cells:
        plot(data, RESULTS / f"{args.out_name}.png")
    print(text)


if __name__ == "__main__":
    main()

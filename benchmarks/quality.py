"""Quality of every pruning method at the same budgets, no fine-tuning: perplexity and zero-shot.

    python benchmarks/quality.py                       # the committed table (resumable)
    python benchmarks/quality.py --limit 20 --ppl-windows 32 --out-name scratch --cells-dir /tmp/q
    python benchmarks/quality.py --model gemma3-270m --prune-args="--ratio-of decoder" \
        --saap-args="--narrow-queries" --methods saap flap shortgpt llm-pruner magnitude ...   # Gemma 3

Every method prunes SmolLM2-135M (``--model``) to each ``--ratios`` fraction of all parameters
removed, with the same number of calibration samples, sequence length and seed (the saap prune
defaults) on its preset's calibration text (the books for the baselines, C4 for saap), in a child
process so wall time and peak RSS are recorded; ``torch-pruning`` runs through
``benchmarks/torch_pruning_ref.py``. Each model is then scored by ``saap eval``: WikiText-2 and
PTB perplexity (128-token windows; all windows unless ``--ppl-windows``) and the 7-task lm-eval
suite on the first ``--limit`` documents of every task, the same documents for every method.

Resumable: each (method, ratio) result goes to ``<cells-dir>/<method>-<ratio>.json`` as soon as it
is done and is skipped on the next run if its evaluation settings match; a cell made with other
settings (say, a smaller ``--limit``) is recomputed, never mixed into the table. The aggregate is
``benchmarks/results/<out-name>.{json,md,png}``; ``--stored-only`` writes it from the cells stored so
far, naming the missing ones, without computing anything (a sitting stopped part-way still leaves a table).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from _common import PROJECT, RESULTS, environment, run_python, run_saap

sys.path.insert(0, str(PROJECT))

from saap.pipeline.zeroshot import TASKS  # noqa: E402
from saap.runtime.io import write_json_atomic, write_text_atomic  # noqa: E402

METHODS = ("saap", "llm-pruner", "flap", "wanda-sp", "shortgpt", "magnitude", "random", "torch-pruning")
PPL_SETS = ("wikitext2", "ptb")


# Settings added after the first cells were stored, with the value those cells were made with.
LATER_SETTINGS = {"device": "cpu", "eval_batch_size": 8}


def cell_settings(args: argparse.Namespace) -> dict:
    """What must match for a stored cell to be reused (the device too: GPU and CPU sums differ in the last bits)."""
    return {
        "model": args.model,
        "limit": args.limit,
        "ppl_windows": args.ppl_windows,
        "tasks": list(args.tasks),
        "seq_len": 128,
        "prune_defaults": "calibration/num-samples/seq-len/seed/align: saap prune defaults",
        "device": args.device,
        "eval_batch_size": args.batch_size,
        # extra prune flags (Gemma 3: the decoder's share); absent for the cells made before they existed
        **({"prune_args": a} if (a := getattr(args, "prune_args", "")) else {}),
        **({"saap_args": a} if (a := getattr(args, "saap_args", "")) else {}),
    }


def settings_match(stored: dict, current: dict, later: dict = LATER_SETTINGS) -> bool:
    """Whether a stored cell was made with ``current``; ``later``: settings it may predate, at their old value."""
    return later | stored == current


def cell_name(method: str, ratio: float | None) -> str:
    """A cell's file stem: ``dense`` for the unpruned model, ``<method>-<ratio>`` otherwise."""
    return method if ratio is None else f"{method}-{ratio:g}"


def parse_limit(value: str) -> int | None:
    if value == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of documents or 'all', got '{value}'")
    return int(value)


def prune_cell(method: str, ratio: float, model: str, out: Path, device: str, extra: tuple[str, ...] = ()) -> dict:
    """Prune in a child process (``extra``: more ``saap prune`` flags); what the tables need from its record."""
    if method == "torch-pruning":  # torch-pruning's own API, on the CPU
        run = run_python("benchmarks/torch_pruning_ref.py", "--model", model, "--ratio", str(ratio), "--out", str(out))
    else:
        # On a GPU the calibration passes run there through accelerate (`--device-map auto`).
        on_gpu = ["--device-map", "auto"] if device != "cpu" else []
        run = run_saap("prune", "--model", model, "--method", method, "--ratio", str(ratio), "--out", str(out),
                       "--quiet", *on_gpu, *extra)  # fmt: skip
    record = json.loads((out / "saap.json").read_text())
    cell = {
        "wall_s": run["wall_s"],
        "peak_rss_mb": run["peak_rss_mb"],
        "ratio_achieved": record["ratio_achieved"],
        "decoder_ratio_achieved": record.get("decoder_ratio_achieved"),
        "params_after": record["params_after"],
        "params_before": record["params_before"],
        "layers": [layer["after"] for layer in record["layers"]],
    }
    if "saap" in record:  # the learned fusion weights, for the ablation tables
        cell["metric_weights"] = record["saap"]["metric_weights"]
    if "evolution" in record:  # what the whole-plan search found, and whether the held-out KL kept it
        cell["evolution"] = record["evolution"]
    return cell


def evaluate_cell(model: str, args: argparse.Namespace, out: Path, ppl_sets: tuple[str, ...] = PPL_SETS) -> dict:
    command = ["eval", "--model", model, "--ppl", *ppl_sets, "--seq-len", "128", "--quiet", "--out", str(out),
               "--device", args.device, "--batch-size", str(args.batch_size)]  # fmt: skip
    if args.ppl_windows:
        command += ["--ppl-windows", str(args.ppl_windows)]
    if args.tasks:
        command += ["--tasks", *args.tasks] + (["--limit", str(args.limit)] if args.limit else [])
    run = run_saap(*command)
    results = json.loads(out.read_text())
    cell = {
        "eval_wall_s": run["wall_s"],
        "params": results["params"],
        "perplexity": {
            k: {"value": v["perplexity"], "windows": v["windows"]} for k, v in results["perplexity"].items()
        },
    }
    if "zeroshot" in results:
        z = results["zeroshot"]
        cell["zeroshot"] = {
            "tasks": {t: {k: r[k] for k in ("metric", "value", "stderr", "documents")} for t, r in z["tasks"].items()},
            "average": z["average"],
            "average_stderr": z["average_stderr"],
        }
    return cell


def run_cell(method: str, ratio: float | None, args: argparse.Namespace, path: Path) -> dict:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cell: dict = {"method": method, "ratio": ratio, "settings": cell_settings(args)}
        model = args.model
        if ratio is not None:
            model = f"{tmp}/pruned"
            extra = shlex.split(getattr(args, "prune_args", ""))
            extra += shlex.split(getattr(args, "saap_args", "")) if method == "saap" else []
            cell["prune"] = prune_cell(method, ratio, args.model, Path(model), args.device, tuple(extra))
        cell |= evaluate_cell(model, args, Path(tmp) / "eval.json")
    cell["total_wall_s"] = round(time.perf_counter() - started, 1)
    cell["environment"] = environment()  # cells of one table may come from several sittings
    write_json_atomic(path, cell)
    return cell


def markdown(data: dict) -> str:
    s = data["settings"]
    tasks = s["tasks"]
    docs = f"the first {s['limit']} documents of every task" if s["limit"] else "every document of every task"
    docs = docs if tasks else "no zero-shot tasks"
    windows = f"the first {s['ppl_windows']}" if s["ppl_windows"] else "all"
    lines = [
        f"# Pruning quality on {s['model']}: every method at the same budget, no fine-tuning",
        "",
        f"Regenerate: `{data['regenerate']}`. Perplexity over {windows} 128-token windows of WikiText-2 (test) and "
        f"PTB (validation); zero-shot accuracy (lm-eval {', '.join(tasks)}) on {docs} — the same documents for "
        "every model; the average is given ± its standard error (from the per-task standard errors). "
        f"Evaluated on `{s['device']}` (batch size {s['eval_batch_size']}); no fine-tuning.",
        "",
        "| method | ratio | removed | params | WikiText-2 | PTB | "
        + "".join(f"{t} | " for t in tasks)
        + ("average ± se | " if tasks else "")
        + "prune s |",
        "|---|---|---|---|---|---|" + "---|" * (len(tasks) + bool(tasks)) + "---|",
    ]
    for c in data["cells"]:
        ppl = [
            f"{c['perplexity'][p]['value']:.2f}" if p in c["perplexity"] else "–" for p in PPL_SETS
        ]  # PTB: not shipped
        z = c.get("zeroshot")
        accs = [f"{z['tasks'][t]['value']:.3f}" for t in tasks] if z else []
        avg = f"{z['average']:.4f} ± {z['average_stderr']:.4f}" if z else "—"
        removed = f"{c['prune']['ratio_achieved']:.1%}" if c.get("prune") else "0"
        if c.get("prune", {}).get("decoder_ratio_achieved") is not None and s.get("prune_args"):
            removed += f" ({c['prune']['decoder_ratio_achieved']:.1%} of the decoder)"
        ratio = "dense" if c["ratio"] is None else f"{c['ratio']:g}"
        prune_s = f"{c['prune']['wall_s']:.0f}" if c.get("prune") else ""
        cells = ppl + accs + ([avg] if tasks else [])
        lines.append(f"| {c['method']} | {ratio} | {removed} | {c['params']:,} | " + " | ".join(cells)
                     + f" | {prune_s} |")  # fmt: skip
    if data.get("missing"):
        lines += ["", f"**Not yet computed** ({len(data['missing'])} cells): {', '.join(data['missing'])}. "
                  f"Run `{data['regenerate']}` to add them (stored cells are skipped)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_zeroshot = any("zeroshot" in c for c in data["cells"])
    fig, axes = plt.subplots(1, 2 if has_zeroshot else 1, figsize=(11 if has_zeroshot else 6, 4.2), squeeze=False)
    dense = next((c for c in data["cells"] if c["ratio"] is None), None)
    methods = sorted({c["method"] for c in data["cells"] if c["ratio"] is not None})
    panels = [("wikitext2 perplexity (log)", lambda c: c["perplexity"]["wikitext2"]["value"])]
    if has_zeroshot:
        panels.append((f"{len(data['settings']['tasks'])}-task average accuracy", lambda c: c["zeroshot"]["average"]))
    for ax, (label, value) in zip(axes[0], panels, strict=True):
        for method in methods:
            cells = sorted((c for c in data["cells"] if c["method"] == method), key=lambda c: -c["params"])
            cells = [c for c in cells if label.startswith("wiki") or "zeroshot" in c]
            if dense and (label.startswith("wiki") or "zeroshot" in dense):
                cells = [dense, *cells]
            ax.plot([c["params"] / 1e6 for c in cells], [value(c) for c in cells], marker="o", label=method)
        if dense and (label.startswith("wiki") or "zeroshot" in dense):
            ax.plot(
                [dense["params"] / 1e6], [value(dense)], marker="*", markersize=14, color="black", ls="", label="dense"
            )
        if label.startswith("wiki"):
            ax.set_yscale("log")
        ax.set_xlabel("parameters kept (M)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{data['settings']['model']}: pruned without fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_sitting_arguments(parser: argparse.ArgumentParser, out_name: str, cells_dir: Path, tasks: list[str]) -> None:
    """The flags every resumable table of pruned models shares (this one and ``saap_ablation.py``)."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.5])
    parser.add_argument(
        "--limit", type=parse_limit, default=300, help="first N documents of every zero-shot task, or 'all'"
    )
    parser.add_argument("--device", default="cpu", help="where importance estimation and evaluation run: cpu, cuda")
    parser.add_argument("--batch-size", type=int, default=8, help="evaluation batch size (lm-eval, perplexity)")
    parser.add_argument("--tasks", nargs="*", default=tasks, help="zero-shot tasks (none: perplexity only)")
    parser.add_argument("--ppl-windows", type=int, help="first N perplexity windows (default: the full sets)")
    parser.add_argument("--out-name", default=out_name)
    parser.add_argument("--cells-dir", type=Path, default=cells_dir, help="where per-cell results live")
    parser.add_argument("--stored-only", action="store_true", help="compute nothing: tabulate the stored cells")
    parser.add_argument(
        "--prune-args", default="", help='more `saap prune` flags for every method, e.g. "--ratio-of decoder"'
    )
    parser.add_argument(
        "--saap-args", default="", help='more `saap prune` flags for saap only, e.g. "--narrow-queries"'
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sitting_arguments(parser, "quality-smollm2-135m", RESULTS / "quality", list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--no-dense", action="store_true", help="skip the dense reference point")
    args = parser.parse_args()
    if args.ppl_windows is not None and args.ppl_windows < 1:
        parser.error("--ppl-windows must be at least 1")

    todo = [] if args.no_dense else [("dense", None)]
    todo += [(m, r) for r in args.ratios for m in args.methods]
    cells, missing = [], []
    for method, ratio in todo:
        path = args.cells_dir / f"{cell_name(method, ratio)}.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            if settings_match(stored.get("settings", {}), cell_settings(args)):
                print(f"{path.name}: done, skipped", flush=True)
                cells.append(stored)
                continue
            print(f"{path.name}: made with other settings, recomputing", flush=True)
        if args.stored_only:
            missing.append(path.stem)
            continue
        print(f"{path.name}: running", flush=True)
        cells.append(run_cell(method, ratio, args, path))

    regenerate = shlex.join(["python", "benchmarks/quality.py", *(a for a in sys.argv[1:] if a != "--stored-only")])
    data = {
        "regenerate": regenerate,
        "settings": cell_settings(args),
        "cells": cells,
        "missing": missing,
        "environment": environment(),  # of this aggregation; each cell has its own
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / f"{args.out_name}.json", data)
    text = markdown(data)
    write_text_atomic(RESULTS / f"{args.out_name}.md", text)
    plot(data, RESULTS / f"{args.out_name}.png")
    print(text)


if __name__ == "__main__":
    main()

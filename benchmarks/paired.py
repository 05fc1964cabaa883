"""Paired, per-document comparison of pruned models on the zero-shot suite: is a lead real, and where is it from.

    python benchmarks/paired.py --ratio 0.2 --methods saap shortgpt flap --out-name paired-20-smollm2-135m
    python benchmarks/paired.py --ratio 0.5 --methods saap magnitude shortgpt --out-name paired-50-smollm2-135m

The quality table gives each model's average with its own standard error (~0.011 at 300 documents
a task). Two models scored on the same documents are compared far more sharply by the per-document
differences (documents both get right, or both wrong, cancel), and a model that got its score by
answering one label everywhere shows it in its predictions. Every ``--methods`` model, pruned to
``--ratio`` as ``quality.py`` prunes it, and the dense model, are scored with
``saap eval --per-document`` on the first ``--limit`` documents of every task; the table gives:

* each model's accuracy, and whether it reproduces its cell of the quality table (``--quality-cells``);
* the first method's paired lead over each other one, per task and on the average, ± its paired s.e.;
* agreement with the dense model: the share of documents where the pruned model predicts the dense
  model's choice (what of the dense model's behaviour is kept);
* the share of predictions on the second choice of each two-choice task (BoolQ "yes", PIQA's sol2,
  WinoGrande's option 2) beside the labels' own share: label bias.

Cells (``<cells-dir>/<method>-<ratio>.json``) are reused when their settings match, as in ``quality.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from _common import PROJECT, RESULTS, environment, run_saap
from quality import cell_name, parse_limit, prune_cell

sys.path.insert(0, str(PROJECT))

from saap.pipeline.zeroshot import TASKS  # noqa: E402
from saap.runtime.io import write_json_atomic, write_text_atomic  # noqa: E402

BINARY = ("boolq", "piqa", "winogrande")  # two-choice tasks: their second-choice share shows label bias


def paired_difference(a: list[int], b: list[int]) -> tuple[float, float]:
    """Mean of ``a - b`` over the same documents (1 = correct), and its standard error (sample s.d. / sqrt n)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1) if len(d) > 1 else 0.0
    return mean, math.sqrt(var / len(d))


def average_difference(per_task: list[tuple[float, float]]) -> tuple[float, float]:
    """The task-average of paired differences and its s.e. (tasks hold separate documents: errors add in squares)."""
    return sum(m for m, _ in per_task) / len(per_task), math.sqrt(sum(s * s for _, s in per_task)) / len(per_task)


def correct(task: dict) -> list[int]:
    return [int(p == y) for p, y in zip(task["predictions"], task["labels"], strict=True)]


def share(choices: list[int]) -> float:
    """The share of the second choice (index 1: BoolQ's "yes") among ``choices``."""
    return sum(c == 1 for c in choices) / len(choices)


def cell_settings(args: argparse.Namespace) -> dict:
    return {"model": args.model, "limit": args.limit, "tasks": list(args.tasks), "device": args.device,
            "eval_batch_size": args.batch_size, "prune_defaults": "saap prune defaults, as quality.py"}  # fmt: skip


def run_cell(method: str, ratio: float | None, args: argparse.Namespace, path: Path) -> dict:
    """Prune (unless dense) and score with per-document predictions; the cell, stored at ``path``."""
    started = time.perf_counter()
    cell: dict = {"method": method, "ratio": ratio, "settings": cell_settings(args)}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if ratio is not None:
            model = f"{tmp}/pruned"
            cell["prune"] = prune_cell(method, ratio, args.model, Path(model), args.device)
        out = Path(tmp) / "eval.json"
        run = run_saap("eval", "--model", model, "--tasks", *args.tasks, "--per-document", "--quiet",
                       "--out", str(out), "--device", args.device, "--batch-size", str(args.batch_size),
                       *(["--limit", str(args.limit)] if args.limit else []))  # fmt: skip
        z = json.loads(out.read_text())["zeroshot"]
    keep = ("metric", "value", "stderr", "documents", "labels", "predictions")
    cell["tasks"] = {t: {k: r[k] for k in keep} for t, r in z["tasks"].items()}
    cell |= {"average": z["average"], "average_stderr": z["average_stderr"], "eval_wall_s": run["wall_s"]}
    cell["total_wall_s"] = round(time.perf_counter() - started, 1)
    cell["environment"] = environment()
    write_json_atomic(path, cell)
    return cell


def reproduces(cell: dict, quality_dir: Path | None) -> bool | None:
    """Whether every task's accuracy equals the quality table's cell of the same model (None: no such cell)."""
    path = quality_dir / f"{cell_name(cell['method'], cell['ratio'])}.json" if quality_dir else None
    if not path or not path.is_file():
        return None
    stored = json.loads(path.read_text())
    # the same documents on the same kind of device (cells made before "device" was recorded ran on the CPU)
    same = stored["settings"]["limit"] == cell["settings"]["limit"]
    same = same and stored["settings"].get("device", "cpu") == cell["settings"]["device"]
    tasks = stored.get("zeroshot", {}).get("tasks", {})
    if not same or any(t not in tasks for t in cell["tasks"]):
        return None
    return all(abs(tasks[t]["value"] - r["value"]) < 1e-9 for t, r in cell["tasks"].items())


def agreement(a: list[int], b: list[int]) -> float:
    """The share of documents on which two models predict the same choice."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def model_row(cell: dict, dense: dict | None, tasks: list[str], quality_dir: Path | None) -> dict:
    """One model's accuracies, label shares on the two-choice tasks, and agreement with the dense model."""
    ratio = cell["ratio"]
    row = {
        "model": cell["method"] if ratio is None else f"{cell['method']} {ratio:g}",
        "accuracy": {t: cell["tasks"][t]["value"] for t in tasks},
        "average": cell["average"],
        "average_stderr": cell["average_stderr"],
        "reproduces_quality_cell": reproduces(cell, quality_dir),
        "second_choice_share": {t: share(cell["tasks"][t]["predictions"]) for t in BINARY if t in tasks},
    }
    if dense and cell is not dense:
        row["agreement_with_dense"] = {
            t: agreement(cell["tasks"][t]["predictions"], dense["tasks"][t]["predictions"]) for t in tasks
        }
    return row


def lead(first: dict, other: dict, tasks: list[str]) -> dict:
    """``first``'s paired lead over ``other``, per task and on the task average."""
    per_task = {t: paired_difference(correct(first["tasks"][t]), correct(other["tasks"][t])) for t in tasks}
    return {"of": first["method"], "over": other["method"], "ratio": first["ratio"], "tasks": per_task,
            "average": average_difference(list(per_task.values()))}  # fmt: skip


def summarise(cells: list[dict], quality_dir: Path | None) -> dict:
    """The table's numbers: a row per model, the labels' own shares, the first pruned model's leads."""
    dense = next((c for c in cells if c["ratio"] is None), None)
    pruned = [c for c in cells if c["ratio"] is not None]
    tasks = list(cells[0]["tasks"])
    return {
        "tasks": tasks,
        "models": [model_row(c, dense, tasks, quality_dir) for c in cells],
        "label_second_choice_share": {t: share(cells[0]["tasks"][t]["labels"]) for t in BINARY if t in tasks},
        "leads": [lead(pruned[0], other, tasks) for other in pruned[1:]],
    }


def markdown(data: dict) -> str:
    s, summary = data["settings"], data["summary"]
    tasks = summary["tasks"]
    docs = f"the first {s['limit']} documents of every task" if s["limit"] else "every document of every task"
    lines = [
        f"# Paired comparison of pruned {s['model']} models on {docs}",
        "",
        f"Regenerate: `{data['regenerate']}`. Scored by lm-eval on `{s['device']}` (batch size "
        f"{s['eval_batch_size']}), each document's prediction kept (`saap eval --per-document`); no fine-tuning. "
        "A lead is the mean of the per-document differences (1 = correct) over the same documents, ± its "
        "paired standard error; the average's s.e. adds the tasks' in squares.",
        "",
        "## Accuracy, agreement with the dense model, label shares",
        "",
        "| model | "
        + " | ".join(tasks)
        + " | average ± se | same as quality cell | agrees with dense (avg) | "
        + " | ".join(f"{t} 2nd-choice share" for t in summary["label_second_choice_share"])
        + " |",
        "|---|" + "---|" * (len(tasks) + 3 + len(summary["label_second_choice_share"])),
    ]
    for m in summary["models"]:
        agree = m.get("agreement_with_dense")
        agree_text = f"{sum(agree.values()) / len(agree):.3f}" if agree else "—"
        same = {True: "yes", False: "**no**", None: "—"}[m["reproduces_quality_cell"]]
        lines.append(f"| {m['model']} | " + " | ".join(f"{m['accuracy'][t]:.3f}" for t in tasks)
                     + f" | {m['average']:.4f} ± {m['average_stderr']:.4f} | {same} | {agree_text} | "
                     + " | ".join(f"{v:.3f}" for v in m["second_choice_share"].values()) + " |")  # fmt: skip
    lines.append("| *labels* | " + " | " * (len(tasks) + 3)
                 + " | ".join(f"{v:.3f}" for v in summary["label_second_choice_share"].values()) + " |")  # fmt: skip
    lines += ["", "## Paired leads", "", "| lead | " + " | ".join(tasks) + " | average ± paired se |",
              "|---|" + "---|" * (len(tasks) + 1)]  # fmt: skip
    for lead in summary["leads"]:
        cells = [f"{m:+.3f} ± {e:.3f}" for m, e in lead["tasks"].values()]
        mean, se = lead["average"]
        lines.append(f"| {lead['of']} − {lead['over']} ({lead['ratio']:g}) | " + " | ".join(cells)
                     + f" | **{mean:+.4f} ± {se:.4f}** |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, required=True, help="fraction of all parameters removed")
    parser.add_argument("--methods", nargs="+", required=True, help="the first is compared with each other one")
    parser.add_argument("--limit", type=parse_limit, default=300, help="first N documents of every task, or 'all'")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cells-dir", type=Path, default=RESULTS / "paired")
    parser.add_argument("--quality-cells", type=Path, default=RESULTS / "quality-cpu", help="cells to check against")
    parser.add_argument("--out-name", required=True)
    args = parser.parse_args()
    if len(args.methods) < 2:
        parser.error("--methods needs at least two methods to compare")

    cells = []
    for method, ratio in [("dense", None)] + [(m, args.ratio) for m in args.methods]:
        path = args.cells_dir / f"{cell_name(method, ratio)}.json"
        stored = json.loads(path.read_text()) if path.is_file() else None
        if stored and stored["settings"] == cell_settings(args):
            print(f"{path.name}: done, skipped", flush=True)
            cells.append(stored)
            continue
        print(f"{path.name}: running", flush=True)
        cells.append(run_cell(method, ratio, args, path))

    data = {"regenerate": " ".join(["python benchmarks/paired.py", *sys.argv[1:]]), "settings": cell_settings(args),
            "summary": summarise(cells, args.quality_cells), "environment": environment()}  # fmt: skip
    write_json_atomic(RESULTS / f"{args.out_name}.json", data)
    text = markdown(data)
    write_text_atomic(RESULTS / f"{args.out_name}.md", text)
    print(text)


if __name__ == "__main__":
    main()

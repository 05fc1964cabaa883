"""Uniform vs per-layer shapes (``saap prune --shape``): what the standard-checkpoint constraint costs and buys.

    nice -n 10 python benchmarks/shape.py                       # SAAP 20 % and 50 % of SmolLM2-135M
    python benchmarks/shape.py --ratios 0.2 --out-name shape-20-smollm2-135m

For every ratio and shape: ``saap prune --shape S``, then the default run's recovery (its config's
``finetune:`` section: distillation from the dense parent, same steps, data and learning rate), then
``saap eval`` of the pruned and the recovered model on WikiText-2 (first ``--ppl-windows``), the 7 tasks' first
``--limit`` documents (test splits, per document, paired uniform vs per-layer with ``paired.py``'s
statistics) and three dev splits (ARC-e, ARC-c and OpenBookQA dev). Decode speed of the recovered
models: ``saap bench`` on llama.cpp q8_0 and ONNX Runtime int8, all models in one run. Generation:
``saap eval --generate`` (64 dev-text prompts, greedy, 64 tokens), agreement against the dense model's.

The default shape of ``saap run`` is chosen on dev evidence only: the recovery's held-out loss
(distillation windows it did not train on) and the dev-split accuracy; never on the test sets.

Resumable: each stage's result is stored under ``--work``/stages and reused.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml
from _common import PROJECT, environment, run_saap, write_results
from paired import average_difference, correct, paired_difference

from saap.pipeline.zeroshot import TASKS

SHAPES = ("per-layer", "uniform")
DEV_TASKS = ("arc_easy_dev", "arc_challenge_dev", "openbookqa_dev")
CONFIG = PROJECT / "saap" / "configs" / "smollm2-135m.yaml"  # the default run: its recovery is the budget
MODEL = "smollm2-135m"


def stage(work: Path, name: str, run) -> dict:
    """The stored result of ``name``, or run it and store it."""
    path = work / "stages" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = run()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def recovery_flags() -> list[str]:
    """``saap finetune`` flags of the default run's recovery (its config's ``finetune:`` section)."""
    section = yaml.safe_load(CONFIG.read_text())["finetune"]
    flags = ["--data", *section["data"]]
    for key in ("teacher", "method", "max_steps", "seq_len", "lr", "eval_steps"):
        flags += [f"--{key.replace('_', '-')}", str(section[key])]
    return flags


def prune(out: Path, ratio: str, shape: str) -> dict:
    cmd = ["prune", "--model", MODEL, "--ratio", ratio, "--shape", shape, "--out", str(out)]
    run = run_saap(*cmd, "--quiet", "--overwrite")
    meta = json.loads((out / "saap.json").read_text())
    config = json.loads((out / "config.json").read_text())
    return {"command": "saap " + " ".join(cmd), "wall_s": run["wall_s"], "ratio_achieved": meta["ratio_achieved"],
            "params_after": meta["params_after"], "layers": config["num_hidden_layers"],
            "search": meta.get("uniform") or meta.get("measured"), "evolution": meta.get("evolution")}  # fmt: skip


def finetune(model: Path, out: Path) -> dict:
    cmd = ["finetune", "--model", str(model), "--out", str(out), *recovery_flags()]
    run = run_saap(*cmd, "--quiet", "--overwrite")
    meta = json.loads((out / "saap.json").read_text())
    return {"command": "saap " + " ".join(cmd), "wall_s": run["wall_s"], "eval_loss": meta["eval_loss"],
            "eval_loss_log": meta.get("eval_loss_log"), "kept": meta.get("kept"), "steps": meta["steps"]}  # fmt: skip


def evaluate(model: str, out: Path, args: argparse.Namespace, dev: bool = True) -> dict:
    """WikiText-2 and the 7 tasks; ``dev``: the dev splits too (what the default shape is chosen on)."""
    out = out.with_suffix(".json")
    tasks = [*TASKS, *DEV_TASKS] if dev else list(TASKS)
    cmd = ["eval", "--model", model, "--ppl", "wikitext2", "--seq-len", "128", "--tasks", *tasks]
    cmd += ["--ppl-windows", str(args.ppl_windows)] if args.ppl_windows else []
    cmd += ["--limit", str(args.limit), "--per-document", "--out", str(out), "--quiet"]
    run = run_saap(*cmd)
    results = json.loads(out.read_text())
    keep = ("metric", "value", "stderr", "labels", "predictions")
    tasks = {t: {k: r[k] for k in keep} for t, r in results["zeroshot"]["tasks"].items()}
    return {"command": "saap " + " ".join(cmd), "wall_s": run["wall_s"], "params": results["params"],
            "wikitext2": results["perplexity"]["wikitext2"]["perplexity"], "tasks": tasks}  # fmt: skip


GENERATION_KEYS = ("repeated_4gram", "repeated_4gram_stderr", "looping", "prompts", "distinct_2",
                   "first_divergence", "reference_logprob", "looping_prompts")  # fmt: skip


def generation(model: str | Path, out: Path, reference: Path | None = None) -> dict:
    """``saap eval --generate``: loops and variety; with ``reference``, agreement with its continuations."""
    cmd = ["eval", "--model", str(model), "--generate", "--out", str(out), "--quiet"]
    cmd += ["--generate-reference", str(reference)] if reference else []
    run = run_saap(*cmd)
    quality = json.loads(out.read_text())["generation_quality"]
    return {"command": "saap " + " ".join(cmd), "wall_s": run["wall_s"],
            **{k: quality[k] for k in GENERATION_KEYS if k in quality}}  # fmt: skip


def run_generation(args: argparse.Namespace, data: dict) -> None:
    """The dense model first: the others' agreement is measured against its continuations."""
    work, rows = args.work, data.setdefault("generation", {})
    reference = work / "gen-dense.json"
    rows["dense"] = stage(work, "gen-dense", lambda: generation(MODEL, reference))
    for ratio in args.ratios:
        for shape in SHAPES:
            for suffix in ("", "-recovered"):
                tag = f"{shape}-{ratio}{suffix}"
                if (work / tag).is_dir():
                    measure = lambda t=tag: generation(work / t, work / f"gen-{t}.json", reference)  # noqa: E731
                    rows[tag] = stage(work, f"gen-{tag}", measure)


def generation_rows(data: dict) -> list[str]:
    rows = []
    for name, g in (data.get("generation") or {}).items():
        divergence = f"{g['first_divergence']:.1f}" if "first_divergence" in g else "–"
        logprob = f"{g['reference_logprob']:.3f}" if "reference_logprob" in g else "–"
        rows.append(f"| {name} | {g['repeated_4gram']:.3f} ± {g['repeated_4gram_stderr']:.3f} | {g['looping']} of "
                    f"{g['prompts']} | {g['distinct_2']:.3f} | {divergence} | {logprob} |")  # fmt: skip
    return rows


def average(cell: dict, tasks: tuple[str, ...]) -> tuple[float, float]:
    """The task average and its s.e. (tasks hold separate documents: errors add in squares)."""
    values = [cell["tasks"][t]["value"] for t in tasks]
    return sum(values) / len(values), math.sqrt(sum(cell["tasks"][t]["stderr"] ** 2 for t in tasks)) / len(tasks)


def lead(uniform: dict, per_layer: dict, tasks: tuple[str, ...]) -> tuple[float, float]:
    """Uniform's paired lead over per-layer on the task average (same documents), ± its paired s.e."""
    per_task = [paired_difference(correct(uniform["tasks"][t]), correct(per_layer["tasks"][t])) for t in tasks]
    return average_difference(per_task)


def bench(models: dict[str, Path], out: Path) -> dict:
    labelled = [MODEL] + [f"{name}={path}" for name, path in models.items()]
    cmd = ["bench", "--models", *labelled, "--engines", "gguf", "onnx", "--gguf-quant", "q8_0",
           "--onnx-precision", "int8", "--prompt-tokens", "128", "--gen-tokens", "64", "--repeats", "5",
           "--out", str(out), "--quiet"]  # fmt: skip
    run = run_saap(*cmd)
    results = json.loads(out.read_text())
    return {"command": "saap " + " ".join(cmd), "wall_s": run["wall_s"],
            "results": {"results": results["results"], "speedups": results["speedups"]}}  # fmt: skip


def run_ratio(ratio: str, args: argparse.Namespace, data: dict, save) -> None:
    work, cells = args.work, data["ratios"].setdefault(ratio, {})
    for shape in SHAPES:
        tag = f"{shape}-{ratio}"
        pruned, recovered = work / tag, work / f"{tag}-recovered"
        cell = cells.setdefault(shape, {})
        cell["prune"] = stage(work, f"prune-{tag}", lambda p=pruned, s=shape: prune(p, ratio, s))
        before = lambda p=pruned, t=tag: evaluate(str(p), work / t, args, dev=False)  # noqa: E731
        cell["pruned"] = stage(work, f"eval-{tag}", before)
        save()
        cell["finetune"] = stage(work, f"finetune-{tag}", lambda p=pruned, r=recovered: finetune(p, r))
        name = f"eval-{tag}-recovered"
        cell["recovered"] = stage(work, name, lambda r=recovered, n=name: evaluate(str(r), work / n, args))
        save()


def speed_rows(data: dict) -> list[str]:
    """Decode tok/s and speed-up over dense (median of the runs, min-max) per engine, from the one bench run."""
    result = data.get("speed", {}).get("results")
    if not result:
        return []
    rows = []
    for r in result["results"]:
        precision = r.get("quant") or r.get("precision")
        decode = r["by_prompt"]["128"]["decode_tok_s"]["median"]
        same = [u for u in result["speedups"] if (u["model"], u["engine"]) == (r["model"], r["engine"])]
        up = next((u["decode_speedup"] for u in same if (u.get("quant") or u.get("precision")) == precision), None)
        speedup = f"{up['median']:.2f}× ({up['min']:.2f}–{up['max']:.2f})" if up else "1.00×"
        rows.append(f"| {r['model']} | {r['engine']} {precision} | {decode:.1f} | {speedup} |")
    return rows


def markdown(data: dict) -> str:
    lines = [
        f"# Uniform vs per-layer shapes on {MODEL} (SAAP, `saap prune --shape`)",
        "",
        f"Regenerate: `{data['regenerate']}`. Recovery: the default run's (`{data['recovery']}`). "
        f"Zero-shot: first {data['settings']['limit']} documents per task, per document; the uniform − per-layer "
        "lead is the mean of paired per-document differences ± its paired standard error. WikiText-2: the first "
        f"{data['settings']['ppl_windows'] or 'all'} 128-token windows of the test set. PTB is not in the project's "
        "data (its licence: `saap/data/README.md`).",
        "",
        "## Quality before and after the same recovery",
        "",
        "| ratio | shape | layers | params | stage | WikiText-2 | 7-task avg ± se "
        "| uniform − per-layer (7 tasks, paired) | dev avg (3 dev splits) | recovery held-out loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense = data.get("dense")
    if dense:
        avg, se = average(dense, TASKS)
        dev = average(dense, DEV_TASKS)[0]
        lines.append(f"| 0 | dense | 30 | {dense['params']:,} | – | {dense['wikitext2']:.2f} | {avg:.4f} ± {se:.4f} "
                     f"| – | {dev:.4f} | – |")  # fmt: skip
    for ratio, cells in data["ratios"].items():
        for stage_name in ("pruned", "recovered"):
            for shape in SHAPES:
                cell = cells.get(shape, {})
                result = cell.get(stage_name)
                if not result:
                    continue
                avg, se = average(result, TASKS)
                dev = f"{average(result, DEV_TASKS)[0]:.4f}" if DEV_TASKS[0] in result["tasks"] else "–"
                other = cells.get("per-layer", {}).get(stage_name)
                diff = "–"
                if shape == "uniform" and other:
                    m, s = lead(result, other, TASKS)
                    diff = f"{m:+.4f} ± {s:.4f}"
                loss = cell["finetune"]["eval_loss"]["after"] if stage_name == "recovered" else None
                lines.append(
                    f"| {ratio} | {shape} | {cell['prune']['layers']} | {result['params']:,} | {stage_name} "
                    f"| {result['wikitext2']:.2f} | {avg:.4f} ± {se:.4f} | {diff} | {dev} "
                    f"| {'–' if loss is None else f'{loss:.4f}'} |"
                )
    speed = speed_rows(data)
    if speed:
        lines += ["", f"## Decode speed of the recovered models (one run: `{data['speed']['command']}`)", ""]
        lines += ["| model | engine | decode tok/s (128-token prompt) | × dense |", "|---|---|---|---|", *speed]
    generated = generation_rows(data)
    if generated:
        lines += ["", "## Generation (`saap eval --generate`: 64 dev-text prompts, greedy, 64 tokens)", ""]
        lines += ["| model | repeated 4-grams ↓ | prompts that loop ↓ | distinct-2 ↑ | tokens until divergence "
                  "from dense ↑ | dense tokens' log-prob ↑ |", "|---|---|---|---|---|---|", *generated]  # fmt: skip
    if data.get("default"):
        lines += ["", "## Default shape, from dev evidence", "", data["default"]]
    return "\n".join(lines) + "\n"


def choose_default(data: dict) -> str | None:
    """The shape with the lower recovery held-out loss at every ratio, with the dev accuracy beside it."""
    votes = []
    for ratio, cells in data["ratios"].items():
        if not all(cells.get(s, {}).get("recovered") for s in SHAPES):
            return None
        losses = {s: cells[s]["finetune"]["eval_loss"]["after"] for s in SHAPES}
        dev = {s: average(cells[s]["recovered"], DEV_TASKS)[0] for s in SHAPES}
        best = min(SHAPES, key=lambda s: losses[s])
        votes.append(best)
        data.setdefault("dev_evidence", {})[ratio] = {"held_out_loss": losses, "dev_average": dev, "lower_loss": best}
    winner = max(SHAPES, key=votes.count)
    evidence = "; ".join(
        f"{r}: held-out loss "
        + ", ".join(f"{s} {v['held_out_loss'][s]:.4f}" for s in SHAPES)
        + ", dev avg "
        + ", ".join(f"{s} {v['dev_average'][s]:.4f}" for s in SHAPES)
        for r, v in data["dev_evidence"].items()
    )
    return f"Lower recovery held-out loss: **{winner}** ({votes.count(winner)} of {len(votes)} ratios). {evidence}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", nargs="+", default=["0.2", "0.5"])
    parser.add_argument("--limit", type=int, default=300, help="first N documents of every task")
    # The full test set is 2,300 windows, ~13 min a model on 2 cores; 512 windows (65k tokens) ~3 min.
    parser.add_argument("--ppl-windows", type=int, default=512, help="WikiText-2 windows (0: the full test set)")
    parser.add_argument("--work", type=Path, default=PROJECT / "artifacts" / "shape")
    parser.add_argument("--out-name", default="shape-smollm2-135m")
    parser.add_argument("--no-speed", action="store_true", help="skip the bench run")
    parser.add_argument("--no-generation", action="store_true", help="skip the generation measure")
    args = parser.parse_args()
    args.work = args.work.resolve()
    data = {
        "regenerate": f"nice -n 10 python benchmarks/shape.py --ratios {' '.join(args.ratios)} --limit {args.limit}"
        f" --ppl-windows {args.ppl_windows}"
        f" --out-name {args.out_name}",
        "settings": {"ratios": args.ratios, "limit": args.limit, "ppl_windows": args.ppl_windows},
        "recovery": "saap finetune " + " ".join(recovery_flags()),
        "ratios": {},
        "environment": environment(),
    }

    def save() -> None:
        data["default"] = choose_default(data)
        write_results(args.out_name, data, markdown(data))

    data["dense"] = stage(args.work, "eval-dense", lambda: evaluate(MODEL, args.work / "eval-dense.json", args))
    for ratio in args.ratios:
        run_ratio(ratio, args, data, save)
    if not args.no_speed:  # every recovered model and the dense one in one run, so they share its conditions
        models = {f"{s}-{r}": args.work / f"{s}-{r}-recovered" for r in args.ratios for s in SHAPES}
        name = "bench-" + "-".join(args.ratios)
        data["speed"] = stage(args.work, name, lambda: bench(models, args.work / f"{name}.json"))
    if not args.no_generation:
        run_generation(args, data)
    save()


if __name__ == "__main__":
    main()

"""Recovery on text the teacher writes against the default run's C4 + books, at equal wall-clock (issue 37).

    nice -n 10 python benchmarks/teacher_text.py --ratios 0.2
    nice -n 10 python benchmarks/teacher_text.py --ratios 0.2 --recipes c4-books teacher --tasks   # + 7 tasks

For every ratio: ``saap prune`` (SAAP, the default shape), then every recipe distils the pruned model from
its dense parent (``saap finetune --teacher parent``, the default run's method, learning rate and sequence
length) on its own training text:

- ``c4-books``: today's default: ``--max-steps`` windows of 300 C4 documents and 0.9 MB of books;
- ``teacher``: ``saap sample`` of the dense model from the start token alone (no data at all);
- ``teacher-prefix``: the same, each sample started from the first 8 tokens of a C4 document;
- ``teacher+student``: half the sequences from the teacher, half from the pruned student itself, so that the
  teacher also scores the text the student writes (one offline round of on-policy distillation, as GKD does).

Equal wall-clock: a sampling recipe trains for the steps that the c4-books run's training time leaves after its
own sampling time (both measured here, the step time from the c4-books run). ``--scales`` gives the
budgets in multiples of the default run's (60 steps): a longer schedule. Then ``saap eval``: WikiText-2
(first ``--ppl-windows``), perplexity on held-out Wikipedia dev text, the generation measure (64 dev-text
prompts, greedy, 64 tokens, against the dense model's continuations) and, with ``--tasks``, the 7 tasks'
first ``--limit`` documents, paired against dense (``paired.py``).

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
from shape import CONFIG, MODEL, average, generation, stage

from saap.pipeline.zeroshot import TASKS

DEV_TEXT = "calibration/wikipedia_articles.txt"  # 30 Wikipedia articles, in no training or test set here
SAMPLE_TOKENS = 128  # the default run's sequence length: one sample is one training window
# recipe -> the sample caches it trains on: (model to sample, extra saap sample flags, share of the sequences)
RECIPES: dict[str, list[tuple[str, list[str], float]]] = {
    "c4-books": [],
    "teacher": [("dense", [], 1.0)],
    "teacher-prefix": [("dense", ["--prefixes", "calibration/c4_sample.jsonl", "--prefix-tokens", "8"], 1.0)],
    "teacher+student": [("dense", [], 0.5), ("student", [], 0.5)],
}


def recovery_section() -> dict:
    return yaml.safe_load(CONFIG.read_text())["finetune"]


def finetune_flags(section: dict, steps: int) -> list[str]:
    flags = []
    for key in ("teacher", "method", "seq_len", "lr", "eval_steps"):
        flags += [f"--{key.replace('_', '-')}", str(section[key])]
    return [*flags, "--max-steps", str(steps)]


def prune(work: Path, ratio: str) -> dict:
    out = work / f"saap-{ratio}"
    cmd = ["prune", "--model", MODEL, "--ratio", ratio, "--out", str(out)]
    run = run_saap(*cmd, "--quiet", "--overwrite")
    meta = json.loads((out / "saap.json").read_text())
    return {"command": "saap " + " ".join(cmd), "wall_s": run["wall_s"], "params_after": meta["params_after"]}


def sample(model: str, out: Path, count: int, flags: list[str]) -> dict:
    cmd = ["sample", "--model", model, "--count", str(count), "--tokens", str(SAMPLE_TOKENS - 1), *flags]
    cmd += ["--out", str(out)]  # - 1: the start token makes a sample one training window
    run = run_saap(*cmd, "--quiet", "--overwrite")
    record = json.loads((out / "sample.json").read_text())
    return {"command": "saap " + " ".join(cmd), "wall_s": run["wall_s"], "seconds": record["seconds"],
            "new_tokens": record["new_tokens"], "ended_at_eos": record["ended_at_eos"]}  # fmt: skip


def finetune(model: Path, out: Path, data: list[str], flags: list[str]) -> dict:
    cmd = ["finetune", "--model", str(model), "--data", *data, *flags, "--out", str(out)]
    run = run_saap(*cmd, "--quiet", "--overwrite")
    meta = json.loads((out / "saap.json").read_text())
    return {"command": "saap " + " ".join(cmd), "wall_s": run["wall_s"], "train_seconds": meta["train_seconds"],
            "steps": meta["steps"], "eval_loss": meta["eval_loss"], "kept": meta["kept"]}  # fmt: skip


def evaluate(model: str, out: Path, args: argparse.Namespace) -> dict:
    cmd = ["eval", "--model", model, "--ppl", "wikitext2", "--seq-len", "128"]
    cmd += ["--ppl-windows", str(args.ppl_windows)] if args.ppl_windows else []
    if args.tasks:
        cmd += ["--tasks", *TASKS, "--limit", str(args.limit), "--per-document"]
    run = run_saap(*cmd, "--out", str(out), "--quiet")
    results = json.loads(out.read_text())
    keep = ("metric", "value", "stderr", "labels", "predictions")
    tasks = {t: {k: r[k] for k in keep} for t, r in (results.get("zeroshot") or {}).get("tasks", {}).items()}
    return {"command": "saap " + " ".join(cmd), "wall_s": run["wall_s"],
            "wikitext2": results["perplexity"]["wikitext2"]["perplexity"], "tasks": tasks}  # fmt: skip


def dev_perplexity(model: str, out: Path, windows: int) -> dict:
    """Perplexity on the held-out Wikipedia dev text: what recipes are chosen on (WikiText-2 is a test set)."""
    cmd = ["eval", "--model", model, "--ppl", DEV_TEXT, "--seq-len", "128", "--ppl-windows", str(windows)]
    run = run_saap(*cmd, "--out", str(out), "--quiet")
    result = json.loads(out.read_text())["perplexity"]
    return {
        "command": "saap " + " ".join(cmd),
        "wall_s": run["wall_s"],
        "dev_ppl": next(iter(result.values()))["perplexity"],
    }


def run_recipe(name: str, ratio: str, scale: float, args: argparse.Namespace, cells: dict) -> None:
    """One recipe at one ratio: its samples, the distillation at its share of the budget, its evaluation."""
    work, section = args.work, recovery_section()
    pruned, tag = work / f"saap-{ratio}", f"{name}-{ratio}" + ("" if scale == 1 else f"-x{scale:g}")
    base_steps = round(section["max_steps"] * scale)
    cell = cells.setdefault(name, {})
    data, sampling_s = list(section["data"]), 0.0
    if RECIPES[name]:
        base = cells["c4-books"]["finetune"]
        step_s = base["train_seconds"] / base["steps"]
        # Sampling costs about what training on the sample does (~175 vs ~150 tokens/s here), so equal time
        # buys about half the steps: enough sequences for one pass over them, and the held-out slice.
        count = base_steps * 2 + 32
        data = []
        for source, flags, share in RECIPES[name]:
            model = MODEL if source == "dense" else str(pruned)
            out = work / f"samples-{source}-{ratio}{'-prefix' if flags else ''}-{count}"
            n = round(count * share)
            result = stage(work, out.name, lambda m=model, o=out, n=n, f=flags: sample(m, o, n, f))
            cell.setdefault("samples", {})[source] = result
            sampling_s += result["seconds"]
            data.append(str(out / "samples.jsonl"))
        steps = max(1, math.floor((base["train_seconds"] - sampling_s) / step_s))
    else:
        steps = base_steps
    recovered = work / f"{tag}-recovered"
    flags = finetune_flags(section, steps)
    cell["finetune"] = stage(work, f"finetune-{tag}", lambda: finetune(pruned, recovered, data, flags))
    cell["finetune"]["sampling_seconds"] = round(sampling_s, 1)
    cell["eval"] = stage(work, f"eval-{tag}", lambda: evaluate(str(recovered), work / f"eval-{tag}.json", args))
    dev = lambda: dev_perplexity(str(recovered), work / f"dev-{tag}.json", args.ppl_windows or 256)  # noqa: E731
    cell["dev"] = stage(work, f"dev-{tag}", dev)
    reference = work / "gen-dense.json"
    measure = lambda: generation(recovered, work / f"gen-{tag}.json", reference)  # noqa: E731
    cell["generation"] = stage(work, f"gen-{tag}", measure)


def versus_dense(result: dict, dense: dict) -> str:
    if not result["tasks"] or not dense["tasks"]:
        return "–"
    avg, _ = average(result, TASKS)
    per_task = [paired_difference(correct(result["tasks"][t]), correct(dense["tasks"][t])) for t in TASKS]
    m, s = average_difference(per_task)
    return f"{avg:.4f} ({avg / average(dense, TASKS)[0]:.1%} of dense; {m:+.4f} ± {s:.4f} paired)"


def markdown(data: dict) -> str:
    dense, gen = data["dense"], data["dense_generation"]
    lines = [
        f"# Recovery on the teacher's own text vs C4 + books ({MODEL}, SAAP)",
        "",
        f"Regenerate: `{data['regenerate']}`. Every recipe distils from the dense parent with the default run's "
        f"method, learning rate and sequence length (`saap/configs/smollm2-135m.yaml`); a sampling recipe's "
        "training steps are what the c4-books run's training time leaves after its sampling (equal wall-clock). "
        f"WikiText-2 (test): the first {data['settings']['ppl_windows'] or 'all'} 128-token windows; dev ppl: the "
        f"first 256 windows of `{DEV_TEXT}` (held-out Wikipedia; recipes are chosen on it and on the generation "
        "measure, whose prompts are dev text too). Generation: "
        "`saap eval --generate` (64 dev-text prompts, greedy, 64 tokens; a prompt loops when over 30 % of its "
        "4-grams repeat).",
        "",
        "| ratio | budget | recipe | sampling s | training s | steps | held-out loss | dev ppl | WikiText-2 | × dense "
        "| repeated 4-grams ↓ | prompts that loop ↓ | distinct-2 ↑ | tokens until divergence ↑ "
        "| dense tokens' log-prob ↑ | 7-task avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| 0 | – | dense | – | – | – | – | {data['dense_dev']['dev_ppl']:.2f} | {dense['wikitext2']:.2f} | 1.00 "
        f"| {gen['repeated_4gram']:.3f} "
        f"| {gen['looping']} of {gen['prompts']} | {gen['distinct_2']:.3f} | – | – "
        f"| {f'{average(dense, TASKS)[0]:.4f}' if dense['tasks'] else '–'} |",
    ]
    rows = [(r, x, n, c) for r, cells in data["ratios"].items() for x, by in cells.items() if x != "prune"
            for n, c in by.items() if "generation" in c]  # fmt: skip
    for ratio, budget, name, cell in rows:
        f, e, g = cell["finetune"], cell["eval"], cell["generation"]
        lines.append(
            f"| {ratio} | {budget[1:]}× | {name} | {f['sampling_seconds']:.0f} | {f['train_seconds']:.0f} "
            f"| {f['steps']} "
            f"| {f['eval_loss']['after']:.4f} | {cell['dev']['dev_ppl']:.2f} | {e['wikitext2']:.2f} "
            f"| {e['wikitext2'] / dense['wikitext2']:.2f} "
            f"| {g['repeated_4gram']:.3f} ± {g['repeated_4gram_stderr']:.3f} | {g['looping']} of {g['prompts']} "
            f"| {g['distinct_2']:.3f} | {g['first_divergence']:.1f} | {g['reference_logprob']:.3f} "
            f"| {versus_dense(e, dense)} |"
        )
    lines += ["", "The held-out loss is each run's own (KL to the teacher on its own held-out slice): it does not "
              "compare across recipes."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", nargs="+", default=["0.2"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="budgets, in default-run steps")
    parser.add_argument("--ppl-windows", type=int, default=256, help="WikiText-2 windows (0: the full test set)")
    parser.add_argument("--tasks", action="store_true", help="also the 7 tasks, paired against dense")
    parser.add_argument("--limit", type=int, default=300, help="with --tasks: first N documents of every task")
    parser.add_argument("--work", type=Path, default=PROJECT / "artifacts" / "teacher-text")
    parser.add_argument("--out-name", default="teacher-text-smollm2-135m")
    args = parser.parse_args()
    args.work = args.work.resolve()
    if "c4-books" not in args.recipes:  # the baseline sets every other recipe's time budget
        args.recipes.insert(0, "c4-books")
    scale = f" --scales {' '.join(f'{x:g}' for x in args.scales)}" if args.scales != [1.0] else ""
    data = {
        "regenerate": f"nice -n 10 python benchmarks/teacher_text.py --ratios {' '.join(args.ratios)} --recipes "
        f"{' '.join(args.recipes)}{scale} --ppl-windows {args.ppl_windows}"
        + (f" --tasks --limit {args.limit}" if args.tasks else "")
        + f" --work {args.work.relative_to(PROJECT)} --out-name {args.out_name}",
        "settings": {"ratios": args.ratios, "ppl_windows": args.ppl_windows, "tasks": args.tasks, "limit": args.limit},
        "ratios": {},
        "environment": environment(),
    }
    work = args.work
    data["dense"] = stage(work, "eval-dense", lambda: evaluate(MODEL, work / "eval-dense.json", args))
    data["dense_dev"] = stage(work, "dev-dense", lambda: dev_perplexity(MODEL, work / "dev-dense.json", 256))
    data["dense_generation"] = stage(work, "gen-dense", lambda: generation(MODEL, work / "gen-dense.json"))
    for ratio in args.ratios:
        cells = data["ratios"].setdefault(ratio, {})
        cells["prune"] = stage(work, f"prune-{ratio}", lambda r=ratio: prune(work, r))
        for x in args.scales:
            for name in args.recipes:
                run_recipe(name, ratio, x, args, cells.setdefault(f"x{x:g}", {}))
                write_results(args.out_name, data, markdown(data))


if __name__ == "__main__":
    main()

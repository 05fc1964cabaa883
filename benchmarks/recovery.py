"""Recovery fine-tuning: SmolLM2-135M pruned by SAAP, then `saap finetune` group-lora vs lora, or
distillation from the dense parent (variants ``distill-METHOD``) on plain text.

    nice -n 10 python benchmarks/recovery.py    # writes benchmarks/results/recovery-smollm2-135m.{json,md}
    python benchmarks/recovery.py --ratios 0.2 --steps 20 --ppl-windows 64 --limit 10 \
        --work artifacts/recovery-20 --out-name recovery-20-smollm2-135m   # another budget, its own stages

The defaults are the issue's protocol: SAAP 20 % and 50 %, 800 steps per run (~25 minutes of
training on 2 cores), held-out loss every 25 steps with the best adapter merged, perplexity over
256 windows and 100 documents per zero-shot task; about 2.5 hours in all, every stage alone.

For every ratio: `saap prune --method saap`, then `saap eval` of the pruned model, then for each
method `saap finetune` with the same step budget (wall time and peak RSS of the child process) and
`saap eval` of the merged model. Resumable: every stage's result is stored in
artifacts/recovery/stages/ as it finishes and skipped next time (an interrupted fine-tune resumes
from its own checkpoint); the results files are rewritten after every stage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import PROJECT, environment, run_saap, write_results

WORK = PROJECT / "artifacts" / "recovery"
DATA = "finetune/alpaca_en_demo.json"
# Distillation trains on plain text that overlaps neither WikiText-2 nor PTB (nor Wikipedia, which
# would favour WikiText-2): web text and Gutenberg books.
DISTILL_DATA = ["calibration/c4_sample.jsonl", "calibration/simplebooks92_valid.txt"]
DISTILL = "distill-"  # variant prefix: --teacher parent on DISTILL_DATA
TASKS_NOTE = "7-task average: BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA (lm-eval, acc/acc_norm)"


class NotRun(Exception):
    """A stage without a stored result, under --collect."""


COLLECT_ONLY = False
WORK_DIR: Path | None = None  # --work; stage names do not encode the budget, so each budget needs its own


def work_dir() -> Path:
    return WORK_DIR or WORK


def stage(name: str, run) -> dict:
    """The stored result of ``name``, or run it and store it."""
    path = work_dir() / "stages" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if COLLECT_ONLY:
        raise NotRun(name)
    result = run()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def evaluate(model: Path, name: str, args: argparse.Namespace) -> dict:
    out = work_dir() / "eval" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["eval", "--model", str(model), "--ppl", "wikitext2", "ptb", "--seq-len", "128"]
    cmd += ["--ppl-windows", str(args.ppl_windows), "--out", str(out), "--quiet"]
    if args.limit:
        cmd += ["--tasks", "all", "--limit", str(args.limit)]
    run = run_saap(*cmd)
    results = json.loads(out.read_text())
    return {
        "command": "saap " + " ".join(cmd),
        "wall_s": run["wall_s"],
        "params": results["params"],
        "perplexity": {k: v["perplexity"] for k, v in results["perplexity"].items()},
        "zeroshot_average": results.get("zeroshot", {}).get("average"),
        "zeroshot_average_stderr": results.get("zeroshot", {}).get("average_stderr"),
        "zeroshot": {k: v["value"] for k, v in results.get("zeroshot", {}).get("tasks", {}).items()},
    }


def parse_variant(variant: str, args: argparse.Namespace) -> dict:
    """``[distill-]METHOD[:BITS[:RANK]][@LR][#STEPS]``, e.g. ``distill-full@1e-4#600``."""
    rest, _, steps = variant.partition("#")
    rest, _, lr = rest.partition("@")
    distill = rest.startswith(DISTILL)
    method, bits, rank = (rest.removeprefix(DISTILL).split(":") + ["", ""])[:3]
    return {
        "method": method,
        "bits": bits,
        "rank": rank,
        "distill": distill,
        "lr": lr or str(args.lr),
        "steps": steps or str(args.steps),
        "data": DISTILL_DATA if distill else [DATA],
    }


def finetune(model: Path, out: Path, variant: str, args: argparse.Namespace) -> dict:
    v = parse_variant(variant, args)
    method, bits, rank = v["method"], v["bits"], v["rank"]
    cmd = ["finetune", "--model", str(model), "--data", *v["data"], "--method", method, "--out", str(out)]
    cmd += ["--max-steps", v["steps"], "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    cmd += ["--lr", v["lr"], "--save-steps", "25", "--eval-steps", str(args.eval_steps), "--keep", args.keep]
    if v["distill"]:
        cmd += ["--teacher", "parent"]
    cmd += ["--quiet"]
    if method == "group-lora":
        cmd += ["--bits", bits or str(args.bits), "--group-size", str(args.group_size)]
    # Rank 8 unless the variant says otherwise (explicit: saap finetune's default differs per method);
    # alpha stays 2 x rank, saap finetune's default, so the scale alpha/rank is the same.
    if method != "full":
        cmd += ["--rank", rank or "8"]
    if out.exists():  # finished in an earlier, interrupted benchmark run: only the record is missing
        run = {"wall_s": None, "peak_rss_mb": None, "stdout": "(reused)"}
    else:
        run = run_saap(*cmd)
    meta = json.loads((out / "saap.json").read_text())
    return {
        "command": "saap " + " ".join(cmd),
        "wall_s": run["wall_s"],
        "peak_rss_mb": run["peak_rss_mb"],
        "train_seconds": meta["train_seconds"],
        "seconds_per_step": round(
            meta.get("train_seconds_this_run", meta["train_seconds"])
            / (meta["steps"] - (meta["resumed_from_step"] or 0)),
            1,
        ),
        "steps": meta["steps"],
        "resumed_from_step": meta["resumed_from_step"],
        "trainable_params": meta["trainable_params"],
        "eval_loss": meta["eval_loss"],
        "eval_loss_log": meta.get("eval_loss_log"),
        "kept": meta.get("kept"),
        "train_loss": meta["train_loss"],
        "data": [f["path"].rsplit("/", 1)[-1] for f in meta["data"]["files"]] if "files" in meta["data"] else [DATA],
        "teacher": (meta.get("teacher") or {}).get("spec"),
        "quantized": meta["quantized"],
        "peak_rss_phases_mb": meta.get("peak_rss_mb"),  # before training / training loop / through merge
    }


def fmt(x, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(data: dict) -> str:
    s = data["settings"]
    lines = [
        "# Recovery fine-tuning: SmolLM2-135M pruned by SAAP",
        "",
        f"Regenerate: `{data['regenerate']}` ({data['environment']['cpu']}, {data['environment']['cores']} cores)",
        "",
        f"Fine-tuning: language-model loss on `{DATA}` (999 Alpaca records, 32 held out), or for `distil` rows "
        f"the KL divergence to the dense parent (`--teacher parent`, temperature 1) on "
        f"{' + '.join(f'`{d}`' for d in DISTILL_DATA)} (web text and Gutenberg books: no overlap with WikiText-2, "
        f"PTB or Wikipedia; 32 windows held out); {s['steps']} steps unless the row says otherwise, x batch "
        f"{s['batch_size']} x {s['seq_len']} tokens, rank 8 (unless the row says otherwise), alpha 2 x rank, "
        f"lr {s['lr']} cosine unless the row says otherwise, seed 0; "
        f"group-lora groups of {s['group_size']} input columns.",
        "",
        "**Against the issue's protocol** (a ~30-minute budget per run, whole evaluation sets): "
        f"{s['steps']} steps per run unless the row says otherwise ({training_minutes(data)} of training per run); "
        f"perplexity over the first {s['ppl_windows']} "
        "windows of 128 tokens (WikiText-2 test, PTB validation) instead of the whole sets; "
        + (
            f"zero-shot tasks on the first {s['limit']} documents of each ({TASKS_NOTE})."
            if s["limit"]
            else "zero-shot tasks not run."
        ),
        "",
        "Val loss: mean next-token loss on the held-out part of the row's own training data, parent → merged "
        "result (so rows on different data are not comparable by it). Train (s): the "
        "Trainer's loop; peak RSS: the whole `saap finetune` process (load, quantize, train, merge, save), and the "
        "training loop's own peak (sampled every 10 ms; it includes the model held for training).",
        "",
        "| ratio | model | train (s) | s/step | peak RSS (MB) | training peak (MB) | val loss before → after "
        "| kept step | WikiText-2 | PTB | 7-task avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense = data.get("dense_eval")
    if dense:
        ppl = dense["perplexity"]
        lines.append(
            f"| — | dense | — | — | — | — | — | — | {fmt(ppl['wikitext2'])} | {fmt(ppl['ptb'])} | {average(dense)} |"
        )
    for ratio, r in data["ratios"].items():
        before = r.get("pruned_eval")
        if before:
            ppl = before["perplexity"]
            lines.append(
                f"| {ratio} | pruned (before) | — | — | — | — | — | — | {fmt(ppl['wikitext2'])} | {fmt(ppl['ptb'])} | "
                f"{average(before)} |"
            )
        for method in data["settings"]["variants"]:
            ft, ev = r.get(method), r.get(f"{method}_eval")
            if not ft:
                continue
            loss = ft["eval_loss"]
            v = parse_variant(method, argparse.Namespace(**s))
            start = f" (quantized start {fmt(loss['start'], 3)})" if v["method"] == "group-lora" else ""
            ppl = ev["perplexity"] if ev else {}
            label = ("distil " if v["distill"] else "") + v["method"]
            label += f" ({ft['quantized']['bits']}-bit base)" if ft["quantized"] else ""
            label += f", rank {v['rank']}" if v["rank"] else ""
            label += f", lr {v['lr']}, {ft['steps']} steps, {ft['trainable_params'] / 1e6:.2f} M trainable"
            label += f"; on {' + '.join(ft.get('data') or [DATA.rsplit('/', 1)[-1]])}"
            per_step = ft.get("seconds_per_step") or round(
                ft["train_seconds"] / (ft["steps"] - (ft["resumed_from_step"] or 0)), 1
            )
            resumed = f" (resumed at step {ft['resumed_from_step']}¹)" if ft["resumed_from_step"] else ""
            lines.append(
                f"| {ratio} | + {label} | {fmt(ft['train_seconds'], 0)}{resumed} | {per_step} | "
                f"{ft['peak_rss_mb'] or '—'} | {training_peak(ft) or '—'} | "
                f"{fmt(loss['parent'], 3)} → {fmt(loss['after'], 3)}{start} | {kept_step(ft)} | "
                f"{fmt(ppl.get('wikitext2'))} | "
                f"{fmt(ppl.get('ptb'))} | {average(ev) if ev else '—'} |"
            )
    if any(r.get(v, {}).get("resumed_from_step") for r in data["ratios"].values() for v in s["variants"]):
        lines += [
            "",
            "¹ Interrupted and resumed from its checkpoint (the resume path in use). Runs made before "
            "`saap finetune` kept its training time across segments report only the resumed segment's time; "
            "s/step is that segment's time over its steps, and peak RSS is the resumed process's (it too loads, "
            "trains, merges and saves).",
        ]
    curves = held_out_curves(data)
    if curves:
        lines += [
            "",
            f"Held-out loss during training ({s.get('keep', 'last')} kept; every {s.get('eval_steps')} steps):",
            "",
        ]
        lines += curves
    lines += ["", "Pruning: " + "; ".join(f"{k}: {v['summary']}" for k, v in data["ratios"].items() if "summary" in v)]
    if data.get("missing"):
        lines += ["", f"**Not finished in this session:** {', '.join(data['missing'])} (re-run the command to resume)."]
    if data.get("verdict"):
        lines += ["", data["verdict"]]
    return "\n".join(lines) + "\n"


def average(evaluation: dict) -> str:
    """The 7-task average with its standard error, where the stage recorded one."""
    stderr = evaluation.get("zeroshot_average_stderr")
    value = fmt(evaluation.get("zeroshot_average"), 4)
    return value if stderr is None or value == "—" else f"{value} ± {stderr:.4f}"


def kept_step(finetune: dict) -> str:
    kept = finetune.get("kept")
    return "last" if not kept else f"{kept['step']} ({kept['policy']})"


def held_out_curves(data: dict) -> list[str]:
    """One line per run: the held-out loss every few steps (shows where the adapters start to memorise)."""
    lines = []
    for ratio, r in data["ratios"].items():
        for method in data["settings"]["variants"]:
            log = (r.get(method) or {}).get("eval_loss_log")
            if log:
                stride = max(1, len(log) // 8)
                points = ", ".join(f"{step}: {loss:.3f}" for step, loss in log[stride - 1 :: stride])
                best = min(log, key=lambda e: e[1])
                lines.append(f"- {ratio} {method}: {points} (lowest {best[1]:.3f} at step {best[0]})")
    return lines


def training_minutes(data: dict) -> str:
    seconds = [r[v]["train_seconds"] for r in data["ratios"].values() for v in data["settings"]["variants"] if v in r]
    return f"{min(seconds) / 60:.1f}–{max(seconds) / 60:.1f} min" if seconds else "not run yet"


def training_peak(finetune: dict) -> float | None:
    return (finetune.get("peak_rss_phases_mb") or {}).get("training")


def verdict(data: dict) -> str:
    notes = []
    for ratio, r in data["ratios"].items():
        for variant in data["settings"]["variants"]:
            if not variant.startswith("group-lora"):
                continue
            before, g, lo = r.get("pruned_eval"), r.get(f"{variant}_eval"), r.get("lora_eval")
            if not (before and g and lo):
                continue
            wb, wg, wl = (x["perplexity"]["wikitext2"] for x in (before, g, lo))
            pb, pg, pl = (x["perplexity"]["ptb"] for x in (before, g, lo))
            rg, rl = r[variant]["peak_rss_mb"], r["lora"]["peak_rss_mb"]
            tg, tl = training_peak(r[variant]), training_peak(r["lora"])
            bits = r[variant]["quantized"]["bits"]
            training = (
                f", training peak {tg} MB vs {tl} MB ({'lower' if tg < tl else 'not lower'})" if tg and tl else ""
            )
            wins = [name for name, ours, theirs in (("WikiText-2", wg, wl), ("PTB", pg, pl)) if ours <= theirs]
            recovers = "less than lora" if not wins else f"at least as much as lora on {' and '.join(wins)}"
            recovers += "" if len(wins) != 1 else " only"
            notes.append(
                f"ratio {ratio}, {variant} ({bits}-bit): WikiText-2 {wb:.2f} → {wg:.2f}, PTB {pb:.2f} → {pg:.2f} "
                f"({'better' if wg < wb and pg < pb else 'NOT better'} than before); lora {wl:.2f} / {pl:.2f}: "
                f"recovers {recovers}; "
                f"process peak RSS {rg} MB vs lora {rl} MB ({'lower' if rg and rl and rg < rl else 'not lower'})"
                f"{training}."
            )
    notes += distill_verdict(data)
    return "Against the issue's targets: " + " ".join(notes) if notes else ""


REFERENCE = Path(__file__).resolve().parent / "results" / "recovery-smollm2-135m.json"  # group-lora on Alpaca


def distill_verdict(data: dict) -> list[str]:
    """Each distillation row against the committed group-lora-on-Alpaca row of its ratio (same
    protocol, measured earlier: its machine is named) and against the dense model."""
    reference = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {"ratios": {}, "settings": {}}
    protocol = ("ppl_windows", "limit", "seq_len")
    if any(reference["settings"].get(k) != data["settings"].get(k) for k in protocol):
        reference = {"ratios": {}}  # another evaluation protocol: no comparison
    dense = data.get("dense_eval")
    notes = []
    for ratio, r in data["ratios"].items():
        ref_ratio = reference["ratios"].get(ratio, {})
        ref_variant = next((v for v in ref_ratio if v.startswith("group-lora") and not v.endswith("_eval")), None)
        for variant in data["settings"]["variants"]:
            ev, ft = r.get(f"{variant}_eval"), r.get(variant)
            if not (variant.startswith(DISTILL) and ev and ft):
                continue
            w, p, z = ev["perplexity"]["wikitext2"], ev["perplexity"]["ptb"], ev["zeroshot_average"]
            line = f"ratio {ratio}, {variant} ({ft['train_seconds'] / 60:.1f} min of training): WikiText-2 {w:.2f}, "
            line += f"PTB {p:.2f}, 7-task {fmt(z, 4)}"
            ref = ref_ratio.get(f"{ref_variant}_eval") if ref_variant else None
            if ref:
                rw, rp, rz = ref["perplexity"]["wikitext2"], ref["perplexity"]["ptb"], ref["zeroshot_average"]
                wins = [n for n, ours, theirs in (("WikiText-2", w, rw), ("PTB", p, rp)) if ours < theirs]
                if z is not None and rz is not None and z > rz:
                    wins.append("7-task")
                line += (
                    f"; committed {ref_variant} on Alpaca ({ref_ratio[ref_variant]['train_seconds'] / 60:.1f} min, "
                    f"{reference['environment']['cpu']}): {rw:.2f} / {rp:.2f} / {fmt(rz, 4)}, "
                    f"so distillation is better on {', '.join(wins) or 'none'} of the three"
                )
            if dense:
                dw, dz = dense["perplexity"]["wikitext2"], dense["zeroshot_average"]
                line += f"; {w / dw:.2f} x the dense WikiText-2 (aim 1.5 x)"
                line += f", {z / dz:.1%} of the dense 7-task average (aim 97 %)" if z and dz else ""
            notes.append(line + ".")
    return notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", nargs="+", default=["0.2", "0.5"])
    parser.add_argument(
        "--variants", nargs="+", default=["group-lora:8:16", "lora"], help="group-lora[:BITS[:RANK]], lora[::RANK]"
    )
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--eval-steps", type=int, default=25, help="held-out loss every N fine-tuning steps")
    parser.add_argument("--keep", default="best", help="merge the best (held-out loss) or the last adapter")
    parser.add_argument("--ppl-windows", type=int, default=256)
    parser.add_argument("--limit", type=int, default=100, help="zero-shot documents per task (0: skip zero-shot)")
    parser.add_argument("--work", type=Path, default=WORK, help="pruned/fine-tuned models and stored stages")
    parser.add_argument("--out-name", default="recovery-smollm2-135m", help="benchmarks/results/<name>.{json,md}")
    parser.add_argument("--collect", action="store_true", help="only assemble the stored stage results")
    args = parser.parse_args()
    global COLLECT_ONLY, WORK_DIR
    COLLECT_ONLY, WORK_DIR = args.collect, args.work.resolve()
    collect, out_name = args.collect, args.out_name
    where = "" if args.work == WORK else f" --work {args.work}"
    where += "" if out_name == "recovery-smollm2-135m" else f" --out-name {out_name}"
    del args.collect, args.work, args.out_name  # where things go, not settings of the measurement

    regenerate = (
        "nice -n 10 python benchmarks/recovery.py"
        + "".join(
            f" --{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()
        )
        + where
    )
    data = {
        "regenerate": regenerate,
        "settings": vars(args),
        "data": DATA,
        "ratios": {},
        "environment": environment(),
    }
    steps = ("prune", "pruned_eval", *args.variants, *(f"{v}_eval" for v in args.variants))
    planned = [f"{r}:{s}" for r in args.ratios for s in steps]

    def save() -> None:
        done = {f"{r}:{k}" for r, v in data["ratios"].items() for k in v}
        data["missing"] = [p for p in planned if p not in done]
        data["verdict"] = verdict(data)
        write_results(out_name, data, markdown(data))

    if any(v.startswith(DISTILL) for v in args.variants):  # the distillation targets are relative to it
        try:
            data["dense_eval"] = stage("eval-dense", lambda: evaluate("smollm2-135m", "dense", args))
        except NotRun as e:
            print(f"not run yet: {e}")
    for ratio in args.ratios:
        try:
            run_ratio(ratio, args, data, save)
        except NotRun as e:
            print(f"not run yet: {e}")
    save()
    if collect:
        print("(collected stored stages only)")


def run_ratio(ratio: str, args: argparse.Namespace, data: dict, save) -> None:
    r = data["ratios"].setdefault(ratio, {})
    pruned = work_dir() / f"saap-p{round(float(ratio) * 100)}"

    def prune(ratio=ratio, pruned=pruned) -> dict:
        cmd = ["prune", "--model", "smollm2-135m", "--method", "saap", "--ratio", ratio, "--out", str(pruned)]
        if (pruned / "saap.json").is_file():  # made by this very command earlier (e.g. copied from artifacts/)
            meta = json.loads((pruned / "saap.json").read_text())
            if meta["method"] == "saap" and abs(meta["ratio_requested"] - float(ratio)) < 1e-6:
                return {"command": "saap " + " ".join(cmd), "reused": str(pruned)}
        run = run_saap(*cmd, "--quiet", "--overwrite")
        return {"command": "saap " + " ".join(cmd), **run}

    r["prune"] = stage(f"prune-{ratio}", prune)
    meta = json.loads((pruned / "saap.json").read_text())
    r["summary"] = (
        f"{meta['params_before']:,} → {meta['params_after']:,} parameters ({meta['ratio_achieved']:.1%} removed)"
    )
    r["pruned_eval"] = stage(f"eval-{ratio}-pruned", lambda p=pruned, n=f"p{ratio}": evaluate(p, n, args))
    save()
    for method in args.variants:
        tag = method.replace(":", "-")
        out = work_dir() / f"{pruned.name}-{tag}"
        r[method] = stage(f"finetune-{ratio}-{tag}", lambda o=out, m=method, p=pruned: finetune(p, o, m, args))
        save()
        r[f"{method}_eval"] = stage(f"eval-{ratio}-{tag}", lambda o=out, n=f"p{ratio}-{tag}": evaluate(o, n, args))
        save()


if __name__ == "__main__":
    main()

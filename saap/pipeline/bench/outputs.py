"""The document for people: the terminal table, ``bench.md`` and the ``bench.png`` bar chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from saap.pipeline.bench.noise import warning_lines
from saap.pipeline.bench.results import failures
from saap.runtime.io import atomic_file, write_json_atomic, write_text_atomic

HEADER = [
    "model", "engine", "device", "quant", "thr", "prompt", "prefill tok/s", "decode tok/s (min-max)",
    "TTFT ms", "RSS MB", "size MB", "decode MB/token", "speed-up", "ideal", "efficiency",
]  # fmt: skip


def _mb(n: float | None) -> str:
    return "" if n is None else f"{n / 1e6:.1f}"


def _table_rows(doc: dict[str, Any]) -> list[list[str]]:
    """One row per (model, engine, device, quantization, threads, prompt length); a failed run's row says so."""
    speed = {
        (s["model"], s["engine"], s["device"], s["quant"], s["threads"], str(s["prompt_tokens"])): s
        for s in doc["speedups"]
    }
    rows = []
    for r in doc["results"]:
        run = [r["model"], r["engine"], r["device"], r["quant"], str(r["threads"])]
        if r.get("failed"):  # its worker died: the reason is listed under the table
            rows.append(run + ["", "FAILED", "FAILED"] + [""] * (len(HEADER) - len(run) - 3))
        for p, s in r["by_prompt"].items():
            sp = speed.get((r["model"], r["engine"], r["device"], r["quant"], r["threads"], p))
            d = s["decode_tok_s"]
            rows.append(
                run
                + [
                    p,
                    f"{s['prefill_tok_s']['median']:.0f}",
                    f"{d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f})",
                    f"{s['ttft_ms']['median']:.0f}",
                    "" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}",
                    _mb(r["artifact_bytes"]),
                    _mb(r["decode_weight_bytes"]),
                    f"{sp['decode_speedup']['median']:.3f}" if sp else "",
                    f"{sp['ideal_speedup']:.3f}" if sp else "",
                    f"{sp['efficiency']:.2f}" if sp else "",
                ]  # fmt: skip
            )
    return rows


def format_table(doc: dict[str, Any], markdown: bool = False) -> str:
    """The table, then a line per failed run and per noisy row (``warnings``) under it."""
    rows = _table_rows(doc)
    notes = [f"FAILED {r['model']} {r['engine']} {r['quant']}: {r['failed']}" for r in failures(doc)]
    notes += warning_lines(doc)
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines + ([""] + [f"- {line}" for line in notes] if notes else []))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(HEADER)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines + notes)


def format_references(doc: dict[str, Any]) -> str:
    lines = []
    for r in doc.get("references", []):
        lines.append(
            f"{r['ours']} vs {r['reference']} ({r['engine']} {r['quant']}, {r['threads']} threads, prompt "
            f"{r['prompt_tokens']}): {r['ours_decode_tok_s']:.1f} vs {r['reference_decode_tok_s']:.1f} decode tok/s, "
            f"ratio {r['decode_ratio']['median']:.3f} ({r['decode_ratio']['min']:.3f}-{r['decode_ratio']['max']:.3f})"
        )
    return "\n".join(lines)


def markdown_report(doc: dict[str, Any], title: str | None = None, notes: str = "") -> str:
    env, st = doc["environment"], doc["settings"]
    lines = [
        f"# {title or 'saap bench'}",
        "",
        notes,
        "",
        f"Machine: {env['cpu']} ({env['physical_cores']} physical / {env['logical_cores']} logical cores), "
        f"GPU: {env['gpu'] or 'none'}, threads {env['threads_used']}, git {env['git_revision']}"
        f"{' (dirty)' if env.get('git_dirty') else ''}; libraries: "
        + ", ".join(f"{k} {v}" for k, v in env["libraries"].items())
        + ".",
        "",
        f"Prompt {st['prompt_tokens']} tokens, {st['gen_tokens']} decode steps, {st['repeats']} measured repeats "
        f"after {st['warmup']} warm-up; medians with (min-max). Speed-up = median over repeats of pruned / dense "
        "decode tok/s measured back to back; ideal = dense / pruned weight bytes read per token; "
        "efficiency = speed-up / ideal.",
        "",
        format_table(doc, markdown=True),
        "",
    ]
    if doc.get("references"):
        lines += ["## Our exports vs the reference tools' own (llama.cpp's file, onnxruntime-genai's builder)", ""]
        lines += ["- " + line for line in format_references(doc).splitlines()] + [""]
    return "\n".join(lines)


def _run_name(r: dict[str, Any]) -> str:
    return f"{r['engine']} {r['quant']}\n{r['device']} t{r['threads']}"


def plot(doc: dict[str, Any], out_png: Path) -> None:
    """Bar chart: decode tok/s (median, min-max whiskers) per engine/quant, one bar per model."""
    import matplotlib  # a second of imports: only when a chart is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompt = str(min(doc["settings"]["prompt_tokens"]))
    measured = {(r["model"], _run_name(r)): r for r in doc["results"] if not r.get("failed")}  # failed: no bar
    runs = sorted({run for _, run in measured})
    models = list(dict.fromkeys(model for model, _ in measured))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(runs) * max(1, len(models)) / 2), 4.5))
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(runs))
    for i, model in enumerate(models):
        none = {"median": 0, "min": 0, "max": 0}
        decode = [
            measured[(model, run)]["by_prompt"][prompt]["decode_tok_s"] if (model, run) in measured else none
            for run in runs
        ]
        med = [d["median"] for d in decode]
        whiskers = [[d["median"] - d["min"] for d in decode], [d["max"] - d["median"] for d in decode]]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, med, width, yerr=whiskers, capsize=2, label=model)
    _ideal_marks(ax, doc, measured, runs, models, prompt, width)
    ax.set_xticks(x, runs, fontsize=8)
    ax.set_ylabel("decode tokens/s (median, min-max)")
    ax.set_title(f"saap bench: decode throughput, prompt {prompt} tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(out_png, suffix=".png") as tmp:  # matplotlib picks the format by the suffix
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _ideal_marks(ax, doc: dict[str, Any], measured: dict, runs: list, models: list, prompt: str, width: float) -> None:
    """A dashed line over each pruned bar at its dense parent's speed x the ideal speed-up (weight bytes):
    how fast memory-bound decode could be, so the gap to the bar is visible."""
    labelled = False
    for s in doc.get("speedups", []):
        run = _run_name(s)
        parent = measured.get((s["parent"], run))
        if str(s.get("prompt_tokens")) != prompt or run not in runs or parent is None or not s.get("ideal_speedup"):
            continue
        centre = runs.index(run) + (models.index(s["model"]) - (len(models) - 1) / 2) * width
        ideal = parent["by_prompt"][prompt]["decode_tok_s"]["median"] * s["ideal_speedup"]
        label = None if labelled else "ideal (dense x weight-byte ratio)"
        ax.hlines(ideal, centre - width / 2, centre + width / 2, colors="black", linestyles="dashed", label=label)
        labelled = True


def write_outputs(doc: dict[str, Any], out_json: str | Path, title: str | None = None, notes: str = "") -> list[Path]:
    """``out_json`` plus a markdown report (``.md``) and a bar chart (``.png``) beside it, each atomically."""
    out_json = Path(out_json)
    if out_json.parent and not out_json.parent.exists():
        out_json.parent.mkdir(parents=True)
    write_json_atomic(out_json, doc)
    write_text_atomic(out_json.with_suffix(".md"), markdown_report(doc, title, notes))
    plot(doc, out_json.with_suffix(".png"))
    return [out_json, out_json.with_suffix(".md"), out_json.with_suffix(".png")]

"""The run report: ``report.md`` and a self-contained ``report.html`` (charts inlined as PNG data URIs).

Built only from the stage directories of a run, so it can be rebuilt from any finished run:
per-layer shapes before/after, quality against the dense model, generations, throughput, file sizes,
and the commands that run each artifact in llama.cpp, ONNX Runtime and onnxruntime-genai.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from saap.pipeline.bench import warning_lines
from saap.pipeline.config import RunConfig

PROMPT = "The capital of France is"
# The export directory as it is, through onnxruntime-genai's own generation loop (no saap code).
GENAI_COMMAND = """python - <<'EOF'
import onnxruntime_genai as og
model = og.Model("{path}"); tokenizer = og.Tokenizer(model)
params = og.GeneratorParams(model); params.set_search_options(max_length=64)  # greedy (genai_config.json)
generator = og.Generator(model, params); generator.append_tokens(tokenizer.encode("{prompt}"))
while not generator.is_done():
    generator.generate_next_token()
print(tokenizer.decode(generator.get_sequence(0)))
EOF"""


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def layers_chart(before: list[dict], after: list[dict]) -> bytes:
    """Query heads, KV heads and MLP width of every layer, dense outline behind the pruned bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    index = list(range(len(before)))
    fig, (heads, mlp) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    for ax, key, label in [(heads, "num_attention_heads", "query heads"), (mlp, "intermediate_size", "MLP width")]:
        ax.bar(index, [b[key] for b in before], color="none", edgecolor="#999999", label="dense")
        ax.bar(index, [a[key] for a in after], color="#3b75af", label="pruned")
        ax.set_ylabel(label)
    heads.plot(index, [a["num_key_value_heads"] for a in after], "o", color="#d9812b", label="pruned KV heads")
    heads.legend(loc="upper right", fontsize=8, ncols=3)
    mlp.set_xlabel("layer")
    mlp.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def throughput_rows(bench: dict | None) -> list[dict]:
    """``saap bench``'s results flattened to one row per (model, engine, quantization, prompt length)."""
    rows = []
    for r in (bench or {}).get("results", []):
        if r.get("failed"):  # a worker that died (e.g. llama.cpp by SIGILL): a row saying so, not a gap
            setup = f"{r['engine']} {r.get('quant') or ''}".strip()
            rows.append({"model": r["model"], "setup": setup, "failed": r["failed"], "prompt_tokens": "–"})
            rows[-1] |= {"prefill": None, "decode": None, "ttft_ms": None, "artifact_bytes": r.get("artifact_bytes")}
        for prompt, m in (r.get("by_prompt") or {}).items():
            rows.append(
                {
                    "model": r["model"],
                    "setup": f"{r['engine']} {r.get('quant') or ''}".strip(),
                    "prompt_tokens": prompt,
                    "prefill": (m.get("prefill_tok_s") or {}).get("median"),
                    "decode": (m.get("decode_tok_s") or {}).get("median"),
                    "ttft_ms": (m.get("ttft_ms") or {}).get("median"),
                    "artifact_bytes": r.get("artifact_bytes"),
                }
            )
    return rows


def speedup_rows(bench: dict | None) -> list[list[str]]:
    rows = []
    for s in (bench or {}).get("speedups", []):
        measured = (s.get("decode_speedup") or {}).get("median")
        rows.append(
            [
                s["model"],
                f"{s['engine']} {s.get('quant') or ''}".strip(),
                _fmt(measured, 3),
                _fmt(s.get("ideal_speedup"), 3),
                _fmt(s.get("efficiency"), 2),
            ]
        )
    return rows


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def gather(run_dir: Path, records: dict[str, dict]) -> dict[str, Any]:
    """Everything the report shows, read from the stage directories."""
    source = _read_json(run_dir / "load" / "source.json") or {}
    final_stage = "finetune" if "finetune" in records else "prune"
    pruned = _read_json(run_dir / "prune" / "model" / "saap.json") or {}
    finetuned = _read_json(run_dir / "finetune" / "model" / "saap.json") if "finetune" in records else None
    artifacts = []
    for stage in ("export-onnx", "export-gguf"):
        directory = run_dir / stage
        if stage in records:
            for item in sorted(directory.iterdir()):
                if item.name not in ("stage.json", "log.txt"):
                    artifacts.append({"stage": stage, "path": item, "bytes": _size(item)})
    return {
        "source": source,
        "pruned": pruned,
        "finetuned": finetuned,
        "final_model": run_dir / final_stage / "model",
        "dense_eval": _read_json(run_dir / "eval" / "dense.json"),
        "model_eval": _read_json(run_dir / "eval" / "model.json"),
        "pruned_eval": _read_json(run_dir / "eval" / "pruned.json"),  # with fine-tuning: before recovery
        "bench": _read_json(run_dir / "bench" / "bench.json"),
        "artifacts": artifacts,
        "stages": records,
    }


def _score(value: float | None, stderr: float | None) -> str:
    """An accuracy with its standard error: at 40 documents a task, ±0.07 is the scale of a gap."""
    if value is None:
        return "–"
    return f"{value:.3f} ± {stderr:.3f}" if stderr is not None else f"{value:.3f}"


def quality_rows(columns: list[dict | None]) -> list[list[str]]:
    """One row per metric of the last column's eval, one cell per column (dense, pruned, ...)."""
    last = columns[-1] or {}
    rows = []
    for name in last.get("perplexity") or {}:
        cells = [_fmt(((c or {}).get("perplexity") or {}).get(name, {}).get("perplexity")) for c in columns]
        rows.append([f"{name} perplexity ↓", *cells])
    tasks = (last.get("zeroshot") or {}).get("tasks", {})
    for task, r in tasks.items():
        results = [((c or {}).get("zeroshot") or {}).get("tasks", {}).get(task) or {} for c in columns]
        rows.append([f"{task} {r['metric']} ↑", *_scores([(t.get("value"), t.get("stderr")) for t in results])])
    if tasks:
        label = "**7-task average** ↑" if len(tasks) == 7 else "**average** ↑"
        zeroshots = [(c or {}).get("zeroshot") or {} for c in columns]
        rows.append([label, *_scores([(z.get("average"), z.get("average_stderr")) for z in zeroshots])])
    return rows + _generation_rows(columns)


def _generation_rows(columns: list[dict | None]) -> list[list[str]]:
    """The generation measure (``saap eval --generate``): loops, variety and agreement with dense."""
    qualities = [(c or {}).get("generation_quality") or {} for c in columns]
    last = qualities[-1]
    if not last:
        return []

    def cells(text) -> list[str]:
        return [text(q) if q else "–" for q in qualities]

    rows = [
        [f"repeated 4-grams ({last['prompts']} prompts) ↓",
         *_scores([(q.get("repeated_4gram"), q.get("repeated_4gram_stderr")) for q in qualities])],
        ["prompts that loop ↓", *cells(lambda q: f"{q['looping']} of {q['prompts']}")],
        ["distinct-2 ↑", *cells(lambda q: f"{q['distinct_2']:.3f}")],
    ]  # fmt: skip
    if "first_divergence" in last:  # measured against the dense model's continuations: dense has none
        rows += [
            ["tokens until first divergence from dense ↑", *cells(lambda q: _fmt(q.get("first_divergence"), 1))],
            ["dense tokens' mean log-prob ↑", *cells(lambda q: _fmt(q.get("reference_logprob"), 3))],
        ]
    return rows


NOISE = "≈"  # marks a score within 2 standard errors of the first column's (dense): not a measured difference


def _scores(cells: list[tuple[float | None, float | None]]) -> list[str]:
    """``_score`` of each column; a later column whose difference from the first is within 2 standard
    errors of that difference (independent samples: sqrt(se1^2 + se2^2)) is marked ``NOISE``, so that a
    40-document table does not read as "pruning made the model better"."""
    (base, base_se), texts = cells[0], []
    for i, (value, se) in enumerate(cells):
        text = _score(value, se)
        comparable = i > 0 and None not in (value, se, base, base_se)
        if comparable and abs(value - base) <= 2 * (se**2 + base_se**2) ** 0.5:
            text += f" {NOISE}"
        texts.append(text)
    return texts


def run_commands(data: dict) -> list[tuple[str, str]]:
    """How to run each exported artifact outside saap (and inside it)."""
    commands = []
    for a in data["artifacts"]:
        path = a["path"]
        if path.suffix == ".gguf":
            commands.append(("llama.cpp", f'llama-cli -m {path} -p "{PROMPT}" -n 32'))
            commands.append(
                (
                    "llama-cpp-python",
                    f"python -c \"import llama_cpp; llm = llama_cpp.Llama('{path}', n_ctx=2048); "
                    f"print(llm('{PROMPT}', max_tokens=32, temperature=0)['choices'][0]['text'])\"",
                )
            )
            commands.append(("saap", f'saap generate --engine gguf --model {path} --prompt "{PROMPT}"'))
        else:
            onnx_file = next(iter(sorted(path.glob("*.onnx"))), path / "model.onnx")
            commands.append(
                (
                    "ONNX Runtime",
                    f"python -c \"import onnxruntime as ort; s = ort.InferenceSession('{onnx_file}'); "
                    'print([i.name for i in s.get_inputs()][:4])"  # inputs: see docs/export-onnx.md',
                )
            )
            if (path / "genai_config.json").is_file():
                commands.append(("onnxruntime-genai", GENAI_COMMAND.format(path=path, prompt=PROMPT)))
            commands.append(("saap", f'saap generate --engine onnx --model {path} --prompt "{PROMPT}"'))
    return commands


def build_markdown(data: dict, config: RunConfig, charts: dict[str, str]) -> str:
    lines = [f"# saap run `{config.name}`", ""]
    lines += [f"Model `{config.model}` → `{data['final_model']}`.", ""]
    for section in SECTIONS:
        lines += section(data, charts)
    return "\n".join(lines)


def _size_section(data: dict, charts: dict[str, str]) -> list[str]:
    source, pruned = data["source"], data["pruned"]
    params_after = pruned.get("params_after")
    summary = [
        ["parameters", f"{source.get('params', 0):,}", f"{params_after:,}" if params_after else "–"],
        ["removed", "", f"{pruned.get('ratio_achieved', 0):.1%} ({pruned.get('method', '?')})"],
    ]
    if "decoder_ratio_achieved" in pruned:  # the share that matters where the embedding dominates (Gemma 3)
        summary.append(["removed of the decoder layers", "", f"{pruned['decoder_ratio_achieved']:.1%}"])
    if pruned.get("decode_bytes_after"):
        before, after = _mib(pruned["decode_bytes_before"]), _mib(pruned["decode_bytes_after"])
        summary.append(["weight bytes read per token (fp32)", before, after])
    lines = ["## Size", ""] + _table(["", "dense", "pruned"], summary)
    ft = data["finetuned"]
    if ft:
        teacher = ft.get("teacher")
        how = f"distilled from `{teacher['source'].get('name')}`" if teacher and teacher.get("source") else "fine-tuned"
        data_files = ", ".join(f"`{Path(f['path']).name}`" for f in (ft.get("data") or {}).get("files", []))
        steps = ft.get("steps", ft.get("settings", {}).get("max_steps", "?"))
        on = f" on {data_files}" if data_files else ""
        if (ft.get("data") or {}).get("format") == "tokens":  # saap sample's cache
            on = f" on {ft['data']['records']} sequences the teacher wrote itself ({data_files})"
        method = ft.get("settings", {}).get("method", "?")
        lines += [f"Recovered: {how}, training `{method}` for {steps} steps{on}.", ""]
    return lines


def _layers_section(data: dict, charts: dict[str, str]) -> list[str]:
    lines = ["## Layers", "", f"![heads and MLP width per layer]({charts['layers']})", ""] if "layers" in charts else []
    rows = [
        [
            layer["index"],
            f"{layer['before']['num_attention_heads']}/{layer['before']['num_key_value_heads']}",
            f"{layer['after']['num_attention_heads']}/{layer['after']['num_key_value_heads']}",
            layer["before"]["intermediate_size"],
            layer["after"]["intermediate_size"],
            f"{layer['params_before']:,}",
            f"{layer['params_after']:,}",
        ]
        for layer in data["pruned"].get("layers", [])
    ]
    header = ["layer", "heads q/kv before", "after", "MLP before", "after", "params before", "after"]
    return lines + (_table(header, rows) if rows else [])


def _quality_columns(data: dict) -> list[tuple[str, dict | None]]:
    columns = [("dense", data["dense_eval"])]
    if data["finetuned"] is None:
        return columns + [("pruned", data["model_eval"])]
    distilled = ", distilled" if data["finetuned"].get("teacher") else ""
    recovered = f"recovered ({data['finetuned'].get('method')}{distilled})"
    return columns + [("pruned", data["pruned_eval"]), (recovered, data["model_eval"])]


def _quality_section(data: dict, charts: dict[str, str]) -> list[str]:
    columns = _quality_columns(data)
    quality = quality_rows([c for _, c in columns])
    if not quality:
        return []
    lines = ["## Quality", ""] + _table(["metric", *(name for name, _ in columns)], quality)
    docs = {r.get("documents") for c in columns for r in ((c[1] or {}).get("zeroshot") or {}).get("tasks", {}).values()}
    if docs - {None}:
        counts = ", ".join(map(str, sorted(docs - {None})))
        lines += [f"Accuracies ± their standard errors, from the first {counts} documents of each task.", ""]
    if any(NOISE in cell for row in quality for cell in row[2:]):
        lines += [f"{NOISE}: within 2 standard errors of the dense score, so not a measured difference.", ""]
    skipped = ((data["model_eval"] or {}).get("skipped") or {}).items()
    lines += [f"{name} perplexity not measured: {why}." for name, why in skipped] + ([""] if skipped else [])
    return lines


def _generations_section(data: dict, charts: dict[str, str]) -> list[str]:
    generations = (data["model_eval"] or {}).get("generations") or []
    if not generations:
        return []
    dense = {g["prompt"]: g["completion"] for g in (data["dense_eval"] or {}).get("generations") or []}
    rows = [[g["prompt"], _cell(dense.get(g["prompt"], "–")), _cell(g["completion"])] for g in generations]
    return ["## Generations (greedy)", ""] + _table(["prompt", "dense", _quality_columns(data)[-1][0]], rows)


def _throughput_table(throughput: list[dict]) -> list[str]:
    rows = [
        [
            r["model"],
            r["setup"],
            r["prompt_tokens"],
            _fmt(r["prefill"], 1),
            "**FAILED** (below)" if r.get("failed") else _fmt(r["decode"], 1),
            _fmt(r["ttft_ms"], 0),
            _mib(r["artifact_bytes"]) if r["artifact_bytes"] else "–",
        ]
        for r in throughput
    ]
    header = ["model", "engine", "prompt tokens", "prefill tok/s", "decode tok/s", "TTFT ms", "file"]
    lines = _table(header, rows)
    # The whole reason (signal, rebuild command) once per run, not squeezed into a cell.
    lines += [f"**{r['model']} {r['setup']} failed:** {_cell(r['failed'])}" for r in throughput if r.get("failed")]
    return lines + ([""] if lines[-1] else [])


def _throughput_section(data: dict, charts: dict[str, str]) -> list[str]:
    throughput = throughput_rows(data["bench"])
    if not throughput:
        return []
    lines = ["## Throughput", ""] + _throughput_table(throughput) + bench_warnings(data["bench"])
    speedups = speedup_rows(data["bench"])
    if speedups:
        lines += [
            "Decode speed-up over the dense model, measured interleaved in one run, against the ideal from "
            "weight bytes read per token (the dashed lines in the chart):",
            "",
        ]
        lines += _table(["model", "engine", "measured", "ideal", "efficiency"], speedups)
    if "throughput" in charts:
        lines += [f"![decode tokens/s]({charts['throughput']})", ""]
    return lines


def _artifacts_section(data: dict, charts: dict[str, str]) -> list[str]:
    if not data["artifacts"]:
        return []
    rows = [[f"`{a['path']}`", _mib(a["bytes"])] for a in data["artifacts"]]
    lines = ["## Artifacts", ""] + _table(["artifact", "size"], rows)
    lines += ["## Running the artifacts", ""]
    for artifact in data["artifacts"]:
        lines += [f"### `{artifact['path']}`", "", "```bash"]
        lines += [f"# {where}\n{command}" for where, command in run_commands({"artifacts": [artifact]})]
        lines += ["```", ""]
    return lines


def _stages_section(data: dict, charts: dict[str, str]) -> list[str]:
    def commands(record: dict) -> str:
        return "<br>".join(
            _cell(" ".join(c["args"]) if isinstance(c["args"], list) else c["args"]) for c in record.get("commands", [])
        )

    rows = [[name, _fmt(r.get("wall_s"), 1), r.get("peak_rss_mb"), commands(r)] for name, r in data["stages"].items()]
    return ["## Stages", ""] + _table(["stage", "wall s", "peak RSS MB", "commands (saap …)"], rows)


SECTIONS = [
    _size_section,
    _layers_section,
    _quality_section,
    _generations_section,
    _throughput_section,
    _artifacts_section,
    _stages_section,
]


def bench_warnings(bench: dict | None) -> list[str]:
    """The bench's own warnings (a loaded machine, repeats that spread): numbers not to be trusted."""
    lines = [f"**Noisy measurement:** {_cell(line.removeprefix('warning: '))}" for line in warning_lines(bench or {})]
    return lines + ([""] if lines else [])


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")  # one table row: every kind of line break goes


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } img { max-width: 100%; } pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
code { font-size: 0.9em; }
"""

# Counts the charts that decoded, so a headless browser test can check they render.
_SCRIPT = """
window.addEventListener("load", () => {
  const charts = [...document.querySelectorAll("img.chart")];
  document.body.dataset.chartsRendered = charts.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.chartsTotal = charts.length;
});
"""


def markdown_to_html(markdown: str, images: dict[str, bytes], title: str) -> str:
    """A small converter for exactly what ``build_markdown`` writes: headings, tables, images, code."""
    out, in_code, table = [], False, []

    def flush_table() -> None:
        if not table:
            return
        header, *body = [
            [c.strip() for c in row.strip("|").split(" | ")] for row in table if not row.startswith("|---")
        ]
        out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in header) + "</tr>")
        out.extend("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body)
        out.append("</table>")
        table.clear()

    for line in markdown.splitlines():
        if line.startswith("```"):
            flush_table()
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
        elif in_code:
            out.append(html.escape(line))
        elif line.startswith("|"):
            table.append(line)
        else:
            flush_table()
            if line.startswith("#"):
                level = len(line) - len(line.lstrip("#"))
                out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
            elif line.startswith("!["):
                alt, src = line[2:].split("](", 1)
                data = base64.b64encode(images[src.rstrip(")")]).decode()
                out.append(f'<p><img class="chart" alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>')
            elif line.strip():
                out.append(f"<p>{_inline(line)}</p>")
    flush_table()
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>\n" + "\n".join(out) + "\n</body></html>\n"
    )


def _inline(text: str) -> str:
    import re

    text = html.escape(text).replace("&lt;br&gt;", "<br>").replace("\\|", "|")
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def write_report(run_dir: Path, out: Path, config: RunConfig, records: dict[str, dict]) -> None:
    """Write report.md, report.html and the chart PNGs into ``out`` (the report stage's directory)."""
    data = gather(run_dir, records)
    images: dict[str, bytes] = {}
    pruned, source = data["pruned"], data["source"]
    if pruned.get("layers"):
        images["report/layers.png"] = layers_chart(
            [layer["before"] for layer in pruned["layers"]], [layer["after"] for layer in pruned["layers"]]
        )
    elif source.get("layers"):
        images["report/layers.png"] = layers_chart(source["layers"], source["layers"])
    bench_chart = run_dir / "bench" / "bench.png"  # saap bench draws its own chart
    if data["bench"] and bench_chart.is_file():
        images["report/throughput.png"] = bench_chart.read_bytes()
    charts = {Path(k).stem: k for k in images}
    markdown = build_markdown(data, config, charts)
    for name, png in images.items():
        (out / Path(name).name).write_bytes(png)
    (out / "report.md").write_text(markdown + "\n")
    (out / "report.html").write_text(markdown_to_html(markdown, images, f"saap run {config.name}"))

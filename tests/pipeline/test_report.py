import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from saap.pipeline.config import parse_config
from saap.pipeline.report import markdown_to_html, quality_rows, throughput_rows, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
LAYERS = [
    {
        "index": i,
        "before": {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256},
        "after": {"num_attention_heads": a, "num_key_value_heads": a // 2, "intermediate_size": w},
        "params_before": 1000,
        "params_after": 500,
    }
    for i, (a, w) in enumerate([(4, 256), (2, 128), (0, 64)])
]


def evaluation(ppl: float, acc: float) -> dict:
    return {
        "perplexity": {"wikitext2": {"perplexity": ppl, "windows": 4, "seq_len": 128}},
        "zeroshot": {"tasks": {"piqa": {"metric": "acc", "value": acc}}, "average": acc},
        "generations": [{"prompt": "The capital of France is", "completion": "Paris.\nIt | is"}],
    }


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    (run / "load").mkdir(parents=True)
    (run / "load" / "source.json").write_text(json.dumps({"params": 3000, "layers": [x["before"] for x in LAYERS]}))
    (run / "prune" / "model").mkdir(parents=True)
    pruned = {"params_after": 1500, "ratio_achieved": 0.5, "method": "saap", "layers": LAYERS}
    (run / "prune" / "model" / "saap.json").write_text(json.dumps(pruned))
    (run / "eval").mkdir()
    (run / "eval" / "dense.json").write_text(json.dumps(evaluation(20.0, 0.7)))
    (run / "eval" / "model.json").write_text(json.dumps(evaluation(30.0, 0.6)))
    (run / "bench").mkdir()
    speed = {"128": {"decode_tok_s": {"median": 50.0}, "prefill_tok_s": {"median": 400.0}, "ttft_ms": {"median": 9.0}}}
    bench = {
        "results": [
            {"model": "smollm2-135m", "engine": "gguf", "quant": "q8_0", "by_prompt": speed, "artifact_bytes": 2**20},
            {"model": "model", "engine": "gguf", "quant": "q8_0", "by_prompt": speed, "artifact_bytes": 2**19},
        ],
        "speedups": [
            {
                "model": "model",
                "engine": "gguf",
                "quant": "q8_0",
                "decode_speedup": {"median": 1.2},
                "ideal_speedup": 1.25,
                "efficiency": 0.96,
            }
        ],
    }
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.bar([0, 1], [50, 60])
    fig.savefig(run / "bench" / "bench.png")
    plt.close(fig)
    (run / "bench" / "bench.json").write_text(json.dumps(bench))
    (run / "export-gguf").mkdir()
    (run / "export-gguf" / "model-q8_0.gguf").write_bytes(b"GGUF" + bytes(100))
    (run / "report").mkdir()
    return run


def records(*stages: str) -> dict:
    return {s: {"wall_s": 1.0, "peak_rss_mb": 100, "commands": [{"args": [s, "--x"]}], "outputs": {}} for s in stages}


def test_report_has_every_section(run_dir):
    config = parse_config({"model": "smollm2-135m"}, "demo.yaml")
    write_report(run_dir, run_dir / "report", config, records("load", "prune", "eval", "export-gguf", "bench"))
    markdown = (run_dir / "report" / "report.md").read_text()
    for part in ("## Size", "## Layers", "## Quality", "## Generations", "## Throughput", "## Artifacts"):
        assert part in markdown
    assert "| wikitext2 perplexity ↓ | 20.00 | 30.00 |" in markdown
    assert "Paris. It \\| is" in markdown  # a completion stays inside its table cell
    assert f"llama-cli -m {run_dir / 'export-gguf' / 'model-q8_0.gguf'}" in markdown
    assert (run_dir / "report" / "layers.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "report" / "throughput.png").is_file()
    assert "| model | gguf q8_0 | 1.200 | 1.250 | 0.96 |" in markdown
    page = (run_dir / "report" / "report.html").read_text()
    assert page.count('class="chart"') == 2 and 'src="report/' not in page  # inlined, self-contained


def test_a_failed_benchmark_run_is_a_row_and_its_reason_is_spelled_out(run_dir):
    bench = json.loads((run_dir / "bench" / "bench.json").read_text())
    reason = "llama.cpp (benchmark worker for gguf 'x.gguf') was killed by SIGILL (illegal instruction): rebuild"
    bench["results"].append({"model": "model", "engine": "gguf", "quant": "q4_0", "failed": reason, "by_prompt": {}})
    (run_dir / "bench" / "bench.json").write_text(json.dumps(bench))
    config = parse_config({"model": "smollm2-135m"}, "demo.yaml")
    write_report(run_dir, run_dir / "report", config, records("load", "prune", "eval", "export-gguf", "bench"))
    markdown = (run_dir / "report" / "report.md").read_text()
    assert "| model | gguf q4_0 | – | – | **FAILED** (below) |" in markdown
    assert f"**model gguf q4_0 failed:** {reason}" in markdown


def test_a_recovered_run_shows_dense_pruned_and_recovered_side_by_side(run_dir):
    (run_dir / "finetune" / "model").mkdir(parents=True)
    finetuned = {"method": "full", "teacher": {"spec": "parent"}}
    (run_dir / "finetune" / "model" / "saap.json").write_text(json.dumps(finetuned))
    (run_dir / "eval" / "pruned.json").write_text(json.dumps(evaluation(45.0, 0.55)))
    config = parse_config({"model": "smollm2-135m", "finetune": {"enabled": True}}, "demo.yaml")
    write_report(run_dir, run_dir / "report", config, records("load", "prune", "finetune", "eval", "bench"))
    markdown = (run_dir / "report" / "report.md").read_text()
    assert "| metric | dense | pruned | recovered (full, distilled) |" in markdown
    assert "| wikitext2 perplexity ↓ | 20.00 | 45.00 | 30.00 |" in markdown
    # Distilled on saap sample's cache: the report says the teacher wrote the text.
    finetuned["data"] = {"format": "tokens", "records": 152, "files": [{"path": "/x/teacher-text/samples.jsonl"}]}
    (run_dir / "finetune" / "model" / "saap.json").write_text(json.dumps(finetuned))
    write_report(run_dir, run_dir / "report", config, records("load", "prune", "finetune", "eval", "bench"))
    markdown = (run_dir / "report" / "report.md").read_text()
    assert "on 152 sequences the teacher wrote itself (`samples.jsonl`)" in markdown


def test_helpers():
    assert quality_rows([None, evaluation(3.0, 0.5)])[0] == ["wikitext2 perplexity ↓", "–", "3.00"]
    scored = evaluation(3.0, 0.5)
    scored["zeroshot"]["tasks"]["piqa"]["stderr"] = 0.0712
    assert quality_rows([scored])[1] == ["piqa acc ↑", "0.500 ± 0.071"]


def test_scores_within_two_standard_errors_of_dense_are_marked_as_noise():
    def scored(acc: float, stderr: float) -> dict:
        doc = evaluation(3.0, acc)
        doc["zeroshot"]["tasks"]["piqa"]["stderr"] = stderr
        return doc

    dense, close, far = scored(0.432, 0.03), scored(0.493, 0.03), scored(0.30, 0.03)  # 2 se of the gap: 0.085
    assert quality_rows([dense, close, far])[1] == ["piqa acc ↑", "0.432 ± 0.030", "0.493 ± 0.030 ≈", "0.300 ± 0.030"]
    assert quality_rows([dense, evaluation(3.0, 0.5)])[1][2] == "0.500"  # no standard error: no verdict
    result = {"model": "b", "engine": "onnx", "quant": "int8", "by_prompt": {"32": {"decode_tok_s": {"median": 9.0}}}}
    rows = throughput_rows({"results": [result]})
    assert rows[0]["setup"] == "onnx int8" and rows[0]["decode"] == 9.0 and rows[0]["prompt_tokens"] == "32"
    crashed = {"model": "b", "engine": "gguf", "quant": "q8_0", "failed": "killed by SIGILL", "by_prompt": {}}
    rows = throughput_rows({"results": [result, crashed]})
    assert rows[1]["setup"] == "gguf q8_0" and rows[1]["failed"] == "killed by SIGILL" and rows[1]["decode"] is None
    page = markdown_to_html("# T\n\n| a | b |\n|---|---|\n| `x` | **y** |\n\n```bash\necho <hi>\n```", {}, "t")
    assert "<td><code>x</code></td><td><b>y</b></td>" in page and "echo &lt;hi&gt;" in page


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("SAAP_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required (SAAP_REQUIRE_CHROMIUM is set) but not installed")
        pytest.skip("no chromium on this machine (CI installs it)")
    config = parse_config({"model": "smollm2-135m"}, "demo.yaml")
    write_report(run_dir, run_dir / "report", config, records("load", "prune", "eval", "bench"))
    # Flags as for a sandboxed, offline machine: no background network, a fresh profile.
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    flags += [f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom"]
    page = (run_dir / "report" / "report.html").as_uri()
    dom = subprocess.run([CHROMIUM, *flags, page], capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    rendered = re.search(r'data-charts-rendered="(\d+)"', body.group(1))
    total = re.search(r'data-charts-total="(\d+)"', body.group(1))
    assert rendered and total and int(total.group(1)) == 2 and rendered.group(1) == total.group(1)
    assert "<table>" in dom and "Throughput" in dom

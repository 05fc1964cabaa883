"""``saap bench``: the math (medians, paired ratios, ideal bytes), the regression check, bad input, and
one tiny end-to-end run per engine."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest

from saap.pipeline import bench
from saap.pipeline.bench import (
    BenchSettings,
    compare,
    flatten_metrics,
    format_regressions,
    gguf_decode_bytes,
    onnx_decode_bytes,
    paired_speedup,
    summarize,
    torch_decode_bytes,
)
from saap.pipeline.cli import main
from saap.runtime.checkpoint import save_checkpoint
from saap.runtime.errors import SaapError
from saap.runtime.surgery import decode_parameter_count, layer_shapes
from tests.conftest import make_model
from tests.runtime.test_surgery import slice_groups


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer):
    """A tiny dense checkpoint and a pruned child whose saap.json names it as the source."""
    root = tmp_path_factory.mktemp("bench")
    dense = make_model(heads=4, kv_heads=2, layers=3, intermediate=128)
    save_checkpoint(dense, tokenizer, root / "dense", {"kind": "dense"})
    pruned = slice_groups(dense, {0: [0]}, {1: list(range(64)), 2: list(range(32))})
    source = {"name": str(root / "dense"), "format": "saap", "path": str(root / "dense")}
    save_checkpoint(pruned, tokenizer, root / "pruned", {"kind": "pruned", "source": source})
    return root / "dense", root / "pruned", dense, pruned


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SAAP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "saap-cache"))


# --- math ----------------------------------------------------------------------------------------------


def test_summarize_is_median_min_max():
    assert summarize([3.0, 1.0, 10.0, 2.0, 4.0]) == {"median": 3.0, "min": 1.0, "max": 10.0}
    assert summarize([1.0, 2.0]) == {"median": 1.5, "min": 1.0, "max": 2.0}
    with pytest.raises(ValueError):
        summarize([])


def test_paired_speedup_is_the_median_of_per_repeat_ratios():
    # Machine noise scales both models of a repeat alike: the paired ratio cancels it.
    dense = [100.0, 50.0, 100.0]
    pruned = [125.0, 62.5, 125.0]
    assert paired_speedup(pruned, dense) == {"median": 1.25, "min": 1.25, "max": 1.25}
    with pytest.raises(ValueError):
        paired_speedup([1.0], [1.0, 2.0])


def test_decode_bytes_read_the_output_projection_but_one_embedding_row():
    tied = [("token_embd.weight", 1000, 10), ("blk.0.attn_q.weight", 300, 4), ("output_norm.weight", 16, 1)]
    assert gguf_decode_bytes(tied) == 1316  # tied: the table is the output projection, read whole
    untied = [*tied, ("output.weight", 1000, 10)]
    assert gguf_decode_bytes(untied) == 1316 + 100  # + one row of the separate embedding table
    sizes = {"embed": 1000, "w": 300, "head": 1000}
    consumers = {"embed": {"Gather"}, "w": {"MatMul"}, "head": {"MatMul"}}
    assert onnx_decode_bytes(sizes, consumers) == 1300
    assert onnx_decode_bytes(sizes, consumers | {"embed": {"GatherBlockQuantized", "MatMulNBits"}}) == 2300


def test_torch_decode_bytes_and_ideal_ratio_follow_decode_parameter_count(pair):
    _, _, dense, pruned = pair
    for model in (dense, pruned):
        assert torch_decode_bytes(model.config) == 4 * decode_parameter_count(model.config, layer_shapes(model.config))
    assert torch_decode_bytes(dense.config) > torch_decode_bytes(pruned.config)
    assert bench.total_parameter_count(pruned.config) == sum(
        p.numel() for n, p in pruned.named_parameters() if n != "lm_head.weight"
    )


def test_gguf_config_reads_per_layer_shapes(pair, tmp_path):
    from saap.export.gguf import export_gguf

    _, pruned_dir, _, pruned = pair
    out = tmp_path / "p.gguf"
    export_gguf(str(pruned_dir), out, "f32", progress=False)
    config = bench.gguf_config(out)
    assert layer_shapes(config) == layer_shapes(pruned.config)
    assert bench.total_parameter_count(config) == bench.total_parameter_count(pruned.config)
    # f32 file: every weight read per token is 4 bytes, as torch's count says (which adds the one
    # embedding row that, tied, is already inside the output projection)
    read = bench.decode_bytes(bench.RunConfig("gguf", "cpu", "f32", 1), out, None)
    assert read == torch_decode_bytes(pruned.config) - 4 * pruned.config.hidden_size


# --- regression check ----------------------------------------------------------------------------------


def _doc(speedup=1.25, decode=100.0, size=1000, fingerprint="abc", params=10):
    result = {
        "model": "pruned",
        "engine": "torch",
        "device": "cpu",
        "quant": "fp32",
        "threads": 2,
        "artifact_bytes": size,
        "decode_weight_bytes": size,
        "peak_rss_mb": 500.0,
        "by_prompt": {
            "16": {
                "decode_tok_s": {"median": decode, "min": decode, "max": decode},
                "prefill_tok_s": {"median": 1000.0, "min": 1000.0, "max": 1000.0},
                "ttft_ms": {"median": 16.0, "min": 16.0, "max": 16.0},
            }
        },
    }
    s = {
        "model": "pruned",
        "parent": "dense",
        "engine": "torch",
        "device": "cpu",
        "quant": "fp32",
        "threads": 2,
        "prompt_tokens": 16,
        "decode_speedup": {"median": speedup, "min": speedup, "max": speedup},
        "ideal_speedup": 1.25,
        "efficiency": round(speedup / 1.25, 4),
    }
    return {
        "schema": bench.SCHEMA,
        "environment": {"hardware_fingerprint": fingerprint},
        "models": {"pruned": {"params": params}},
        "results": [result],
        "speedups": [s],
    }


def test_compare_passes_within_tolerance_and_on_improvement():
    assert compare(_doc(speedup=1.2, decode=95.0), _doc(), 0.10) == []
    assert compare(_doc(speedup=2.0, decode=300.0, size=500), _doc(), 0.10) == []


def test_compare_flags_every_metric_beyond_tolerance():
    regressions = compare(_doc(speedup=0.6, decode=50.0, size=1200, params=12), _doc(), 0.10)
    names = {r["metric"].split(" pruned")[0] for r in regressions}
    assert names == {"decode speed-up", "decode tok/s", "artifact bytes", "decode weight bytes", "params"}
    text = format_regressions(regressions, 0.10)
    assert "regressed beyond 10%" in text and "-52.0%" in text and "+20.0%" in text


def test_compare_skips_absolute_speeds_on_other_hardware():
    # 2x slower absolute decode on a different machine is not a regression; the speed-up ratio still is.
    assert compare(_doc(decode=50.0, fingerprint="other"), _doc(), 0.10) == []
    regressions = compare(_doc(speedup=0.6, decode=50.0, fingerprint="other"), _doc(), 0.10)
    assert [r["metric"].split(" pruned")[0] for r in regressions] == ["decode speed-up"]
    assert all(m.machine_independent for k, m in flatten_metrics(_doc()).items() if "speed-up" in k or "bytes" in k)


def test_compare_reports_missing_metrics_and_rejects_bad_input():
    current = _doc()
    current["speedups"] = []
    assert [r["current"] for r in compare(current, _doc(), 0.1)] == [None]
    with pytest.raises(SaapError, match="tolerance"):
        compare(_doc(), _doc(), 1.5)
    with pytest.raises(SaapError, match="not a saap bench document"):
        compare({"schema": "x"}, _doc(), 0.1)


# --- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--engines", "tensorflow"], "unknown engine 'tensorflow'"),
        (["--prompt-tokens", "0"], "--prompt-tokens must be positive"),
        (["--prompt-tokens", "-5"], "--prompt-tokens must be positive"),
        (["--gen-tokens", "0"], "--gen-tokens must be positive"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--engines", "gguf", "--gguf-quant", "q3_x"], "no quantization 'q3_x'"),
        (["--devices", "tpu"], "not device 'tpu'"),
        (["--target", "moon-base"], "unknown target 'moon-base'"),
        (["--compare", "/nonexistent/baseline.json"], "baseline '/nonexistent/baseline.json' does not exist"),
        (["--genai-reference", "/nonexistent/python"], "cannot run the builder's Python '/nonexistent/python'"),
        # this project's own Python has onnxruntime-genai, but the transformers < 5 that optimum-onnx pins
        (["--genai-reference", sys.executable], "has transformers < 5 (the builder needs >= 5)"),
    ],
)
def test_bad_arguments_are_one_line_errors(pair, capsys, args, message):
    dense, *_ = pair
    assert main(["bench", "--models", str(dense), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_truncated_and_wrong_kind_artifacts_are_one_line_errors(pair, tmp_path, capsys):
    from saap.export.gguf import export_gguf

    dense, *_ = pair
    good = tmp_path / "m.gguf"
    export_gguf(str(dense), good, "f32", progress=False)
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = [
        (["--models", str(tmp_path / "nope")], "does not exist"),
        (["--models", str(truncated), "--engines", "gguf"], "truncated or corrupt"),
        (["--models", str(good), "--engines", "onnx"], "GGUF artifact: it runs on engine gguf"),
        (["--models", str(dense / "config.json")], "not a valid GGUF file"),
    ]
    for args, message in cases:
        assert main(["bench", "--quiet", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_target_on_a_cpu_machine_is_a_one_line_error(pair, capsys):
    dense, *_ = pair
    for target in ("jetson-orin", "server-gpu"):
        assert main(["bench", "--models", str(dense), "--target", target, "--engines", "torch,onnx,gguf"]) == 2
        err = capsys.readouterr().err
        assert f"target '{target}' needs" in err and err.count("\n") == 1, err


def test_targets_describe_engines_devices_threads_and_quantizations():
    assert {"laptop-cpu", "jetson-orin", "server-gpu"} <= set(bench.list_targets())
    runs = bench.plan(BenchSettings(models=["x"], engines=["torch", "onnx", "gguf"], target="jetson-orin"))
    assert {(r.engine, r.device) for r in runs} >= {("onnx", "cuda"), ("gguf", "cuda")}
    assert all(r.n_gpu_layers == -1 for r in runs if r.engine == "gguf")
    assert any(r.quant == "fp16" for r in runs if r.engine == "onnx")
    laptop = bench.plan(BenchSettings(models=["x"], engines=["torch", "onnx", "gguf"], target="laptop-cpu"))
    assert {r.device for r in laptop} == {"cpu"} and {r.threads for r in laptop} == {bench.physical_cores()}


# --- end to end ----------------------------------------------------------------------------------------


def test_bench_end_to_end_on_all_engines(pair, tmp_path, capsys):
    dense, pruned, *_ = pair
    out = tmp_path / "bench.json"
    argv = ["bench", "--models", str(dense), str(pruned), "--engines", "torch,onnx,gguf", "--threads", "1"]
    argv += ["--gguf-quant", "f32,q8_0", "--prompt-tokens", "8,16", "--gen-tokens", "4", "--repeats", "2"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "decode tok/s" in printed and "wrote" in printed
    doc = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().startswith("# saap bench")
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert doc["models"]["pruned"]["parent"] == "dense"
    assert {(r["engine"], r["quant"]) for r in doc["results"]} == {
        ("torch", "fp32"),
        ("onnx", "fp32"),
        ("gguf", "f32"),
        ("gguf", "q8_0"),
    }
    for r in doc["results"]:
        assert r["peak_rss_mb"] > 50 and r["artifact_bytes"] > 0 and r["decode_weight_bytes"] > 0
        for p in ("8", "16"):
            s = r["by_prompt"][p]
            assert len(s["decode_tok_s_runs"]) == 2
            assert s["decode_tok_s"]["min"] <= s["decode_tok_s"]["median"] <= s["decode_tok_s"]["max"]
    assert len(doc["speedups"]) == 4 * 2  # every run and prompt length: pruned vs dense
    ideal = {s["engine"] + s["quant"]: s["ideal_speedup"] for s in doc["speedups"]}
    assert ideal["torchfp32"] == pytest.approx(ideal["gguff32"], rel=1e-3)  # same bytes at 4 bytes/weight
    assert ideal["torchfp32"] == pytest.approx(ideal["onnxfp32"], rel=0.02)
    env = doc["environment"]
    assert env["cpu"] and env["threads_used"] == [1] and env["hardware_fingerprint"] and env["libraries"]["torch"]
    # a second run reuses the exports; the document compares clean against itself
    assert compare(doc, copy.deepcopy(doc), 0.0) == []


def test_injected_slowdown_fails_the_regression_check(pair, tmp_path, monkeypatch, capsys):
    dense, pruned, *_ = pair
    argv = ["bench", "--models", str(dense), str(pruned), "--threads", "1", "--prompt-tokens", "4"]
    argv += ["--gen-tokens", "24", "--repeats", "3", "--quiet"]
    baseline = tmp_path / "baseline.json"
    assert main([*argv, "--out", str(baseline)]) == 0
    capsys.readouterr()
    monkeypatch.setenv(bench.SLOWDOWN_ENV, "2")
    assert main([*argv, "--compare", str(baseline), "--tolerance", "0.3"]) == 1
    out = capsys.readouterr().out
    assert "regressed beyond 30%" in out and "decode speed-up pruned vs dense" in out


def test_check_regression_script_passes_fails_and_ignores_other_hardware(tmp_path):
    import subprocess
    import sys

    from saap.pipeline.bench import PROJECT

    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(_doc()))

    def check(doc: dict) -> subprocess.CompletedProcess:
        current = tmp_path / "current.json"
        current.write_text(json.dumps(doc))
        script = PROJECT / "benchmarks" / "check_regression.py"
        argv = [sys.executable, str(script), "--current", str(current), "--baseline", str(baseline)]
        return subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)

    assert check(_doc(speedup=1.1)).returncode == 0
    failed = check(_doc(speedup=0.6))  # the pruned model lost half its lead: a 2x slowdown
    assert failed.returncode == 1 and "decode speed-up pruned vs dense" in failed.stdout
    assert check(_doc(decode=10.0, fingerprint="elsewhere")).returncode == 0  # absolute speeds not compared


# --- workers that die -----------------------------------------------------------------------------------

# The real worker, except that a gguf one kills itself with SIGILL first: what a llama.cpp build with
# kernels this CPU cannot run does (the AMX fault of a native build on our Intel VMs).
SIGILL_GGUF_WORKER = [
    "-c",
    "import json, os, runpy, signal, sys\n"
    "if json.loads(sys.argv[1])['engine'] == 'gguf':\n"
    "    os.kill(os.getpid(), signal.SIGILL)\n"
    "runpy.run_module('saap.pipeline.bench.worker', run_name='__main__')",
]


def test_a_worker_killed_by_a_signal_is_a_failed_row_and_the_rest_is_written(pair, tmp_path, monkeypatch, capsys):
    from saap.runtime.llama_build import rebuild_command

    dense, pruned, *_ = pair
    monkeypatch.setattr("saap.pipeline.bench.running.WORKER_ARGS", SIGILL_GGUF_WORKER)
    out = tmp_path / "bench.json"
    argv = ["bench", "--models", str(dense), str(pruned), "--engines", "torch,gguf", "--threads", "1"]
    argv += ["--gguf-quant", "q8_0", "--prompt-tokens", "4", "--gen-tokens", "2", "--repeats", "1", "--warmup", "0"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 2
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("saap: error: 2 benchmark run(s) failed")
    assert "killed by SIGILL (illegal instruction)" in errors[0] and rebuild_command() in errors[0]
    doc = json.loads(out.read_text())
    failed = {(r["engine"], r["model"]): r["failed"] for r in doc["results"] if r.get("failed")}
    assert set(failed) == {("gguf", "dense"), ("gguf", "pruned")}
    assert all("SIGILL" in why for why in failed.values())
    measured = [r for r in doc["results"] if not r.get("failed")]
    assert {r["engine"] for r in measured} == {"torch"} and all(r["by_prompt"]["4"] for r in measured)
    assert [s["engine"] for s in doc["speedups"]] == ["torch"]  # no speed-up from a failed pair
    assert "FAILED dense gguf q8_0: llama.cpp" in captured.out
    assert "FAILED dense gguf q8_0" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_a_worker_that_dies_mid_run_is_reported_with_its_signal_and_does_not_hang(pair):
    import os
    import signal

    dense, *_ = pair
    config = {"engine": "torch", "artifact": str(dense), "device": "cpu", "threads": 1, "n_ctx": 64}
    worker = bench.Worker(config | {"n_gpu_layers": 0})
    try:
        assert worker.measure(4, 2)["decode_s"] > 0
        os.kill(worker.proc.pid, signal.SIGSEGV)
        worker.proc.wait()
        with pytest.raises(bench.WorkerDied, match=r"torch .* died \(killed by SIGSEGV"):
            worker.measure(4, 2)
    finally:
        worker.kill()


# --- given exports ----------------------------------------------------------------------------------------


def test_given_exports_are_measured_and_nothing_is_written_to_the_cache(pair, tmp_path, monkeypatch):
    from saap.export.gguf import export_gguf

    dense, pruned, *_ = pair
    cache = tmp_path / "cache"
    monkeypatch.setenv("SAAP_CACHE_DIR", str(cache))
    exports = {label: tmp_path / label / "model-f32.gguf" for label in ("dense", "pruned")}
    for label, source in (("dense", dense), ("pruned", pruned)):
        exports[label].parent.mkdir()
        export_gguf(str(source), exports[label], "f32", progress=False)
    settings = BenchSettings(
        models=[str(dense), str(pruned)],
        engines=["gguf"],
        quantizations={"gguf": ["f32"]},
        threads=[1],
        prompt_tokens=[4],
        gen_tokens=2,
        repeats=1,
        warmup=0,
        exports=[str(p) for p in exports.values()],
    )
    doc = bench.run_bench(settings, progress=False)
    assert {r["model"]: (r["artifact"], r["artifact_origin"]) for r in doc["results"]} == {
        label: (str(path), "given") for label, path in exports.items()
    }
    assert doc["speedups"] and doc["settings"]["exports"] == settings.exports
    assert not (cache / "exports").exists()  # the index was looked up before any cache directory was made


def test_the_quantization_of_a_given_gguf_comes_from_its_file_type_confirmed_by_its_tensors(pair, tmp_path):
    from saap.export.gguf import export_gguf

    _, pruned, *_ = pair
    f32 = tmp_path / "weights.gguf"  # no quantization in the name: general.file_type says it
    export_gguf(str(pruned), f32, "f32", progress=False)
    q8 = tmp_path / "model-q8_0.gguf"
    export_gguf(str(pruned), q8, "q8_0", progress=False)
    misnamed = tmp_path / "model-q4_0.gguf"  # the name disagrees, the F32 matrices confirm file_type
    misnamed.write_bytes(f32.read_bytes())
    sha = json.loads((pruned / "saap.json").read_text())["files"]["model.safetensors"]
    for path, quant in ((f32, "f32"), (q8, "q8_0"), (misnamed, "f32")):
        assert bench.read_export(str(path)) == bench.GivenExport(path, "gguf", quant, sha)


def test_an_export_of_weights_no_benchmarked_model_has_is_a_one_line_error(pair, tmp_path, tokenizer):
    from saap.export.gguf import export_gguf

    dense, pruned, *_ = pair
    other = tmp_path / "other"
    save_checkpoint(make_model(layers=2, seed=1), tokenizer, other, {"kind": "dense"})
    stray = tmp_path / "model-f32.gguf"
    export_gguf(str(other), stray, "f32", progress=False)
    settings = BenchSettings(models=[str(dense), str(pruned)], engines=["gguf"], exports=[str(stray)])
    with pytest.raises(SaapError) as error:
        bench.run_bench(settings, progress=False)
    message = str(error.value)
    assert "\n" not in message and f"export '{stray}'" in message and "none of the benchmarked models" in message
    with pytest.raises(SaapError, match="neither a .gguf file nor an ONNX export"):
        bench.index_exports([str(tmp_path)])


# --- labels -----------------------------------------------------------------------------------------------


def test_name_equals_path_labels_a_model_and_parents_still_link(pair, tmp_path):
    dense, pruned, *_ = pair
    models = bench.resolve_models([str(dense), f"p20={pruned}"])
    assert [(m.label, m.spec, m.parent) for m in models] == [("dense", str(dense), None), ("p20", str(pruned), "dense")]
    # an explicit label is reserved first: the derived one steps aside
    models = bench.resolve_models([str(dense), f"dense={pruned}"])
    assert [(m.label, m.parent) for m in models] == [("dense#2", None), ("dense", "dense#2")]
    odd = tmp_path / "ratio=0.2"  # an existing path with "=" is a path
    odd.mkdir()
    assert bench.split_label(str(odd)) == (None, str(odd))
    assert bench.split_label("runs/x=model") == (None, "runs/x=model")  # the left part is a path, not a name
    assert bench.split_label("p20=artifacts/saap-p20/model") == ("p20", "artifacts/saap-p20/model")
    with pytest.raises(SaapError, match="label 'x' is given to more than one"):
        bench.resolve_models([f"x={dense}", f"x={pruned}"])


# --- noise warnings ---------------------------------------------------------------------------------------


def test_rows_measured_on_a_busy_machine_or_with_spread_repeats_are_warned_about():
    quiet = {"load_average_1m": 1.5, "by_prompt": {"16": {"decode_tok_s_runs": [100.0, 104.0, 98.0]}}}
    assert bench.row_warnings(quiet, cores=2) == []
    busy = quiet | {"load_average_1m": 3.25}
    assert bench.row_warnings(busy, cores=2) == ["1-min load average 3.25 above the 2 cores while measuring"]
    spread = quiet | {"by_prompt": {"16": {"decode_tok_s_runs": [100.0, 85.0, 97.0]}}}  # 15 / 97
    assert bench.row_warnings(spread, cores=2) == ["decode tok/s of the 3 repeats spread 15% at prompt 16 (over 10%)"]
    assert bench.row_warnings(quiet | {"load_average_1m": None, "by_prompt": {}}, cores=2) == []
    doc = _doc()
    doc["results"][0]["warnings"] = bench.row_warnings(busy, cores=2)
    line = "warning: pruned torch/cpu/fp32/t2: 1-min load average 3.25 above the 2 cores while measuring"
    assert bench.format_table(doc).splitlines()[-1] == line
    assert bench.format_table(doc, markdown=True).splitlines()[-1] == f"- {line}"


@pytest.mark.skipif(
    not os.environ.get("SAAP_GENAI_BUILDER_PYTHON"),
    reason="needs a virtualenv with onnxruntime-genai's builder (transformers >= 5): SAAP_GENAI_BUILDER_PYTHON",
)
def test_genai_reference_runs_the_builders_model_beside_ours(tmp_path, monkeypatch):
    """--genai-reference: the builder's int4 of the dense alias, built once into the export cache, is
    benchmarked beside our int4 export and paired with it in the references; no int8 twin exists."""
    monkeypatch.setenv("SAAP_CACHE_DIR", str(tmp_path / "cache"))
    settings = BenchSettings(
        models=["smollm2-135m"],
        engines=["onnx"],
        quantizations={"onnx": ["int4", "int8"]},
        threads=[2],
        prompt_tokens=[8],
        gen_tokens=4,
        repeats=1,
        warmup=0,
        genai_reference=os.environ["SAAP_GENAI_BUILDER_PYTHON"],
    )
    doc = bench.run_bench(settings, progress=False)
    rows = {(r["model"], r["quant"]): r for r in doc["results"]}
    reference = "smollm2-135m" + bench.GENAI_REF
    assert set(rows) == {("smollm2-135m", "int4"), ("smollm2-135m", "int8"), (reference, "int4")}
    assert not any(r.get("failed") for r in rows.values())
    assert (Path(rows[(reference, "int4")]["artifact"]) / "genai_config.json").is_file()
    [pairing] = doc["references"]
    assert pairing["ours"] == "smollm2-135m" and pairing["reference"] == reference
    assert pairing["decode_ratio"]["median"] > 0

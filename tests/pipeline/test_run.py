"""``saap run`` end to end on a tiny model: every stage, resume, invalidation, a kill -9 mid-stage."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from saap.pipeline.config import check_semantics, load_config
from saap.pipeline.run import STAGE_FILE, STAGES, manifest, run_pipeline, run_saap
from saap.runtime.checkpoint import load_checkpoint
from saap.runtime.errors import SaapError
from tests.conftest import SAMPLE_TEXT, make_model, make_tokenizer

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    model = make_model(heads=4, kv_heads=2, layers=4, tied=True, intermediate=256)
    model.save_pretrained(root / "tiny")
    make_tokenizer().save_pretrained(root / "tiny")
    (root / "text.txt").write_text(SAMPLE_TEXT)
    return root


def write_config(root: Path, **changes) -> Path:
    text = str(root / "text.txt")
    config = {
        "name": "tiny",
        "model": str(root / "tiny"),
        "artifacts_dir": str(root / "artifacts"),
        # align 32: group-lora's groups of 32 input columns must divide every kept width
        "prune": {
            "method": "saap",
            "ratio": 0.2,
            "align": 32,
            "calibration": text,
            "num_samples": 2,
            "seq_len": 32,
        },
        "finetune": {
            "enabled": True,
            "teacher": "parent",  # the default run's recovery: distillation from the dense tiny model
            "data": text,
            "max_steps": 2,
            "batch_size": 1,
            "seq_len": 32,
            "val_size": 4,
            "save_steps": 1,
        },
        "eval": {"ppl": [text], "ppl_windows": 2, "seq_len": "32", "generate": True},
        "export": {"onnx": ["fp32"], "gguf": ["f16"]},
        "bench": {"engines": ["torch"], "prompt_tokens": [8], "gen_tokens": 4, "repeats": 1, "warmup": 0},
    }
    for section, values in changes.items():
        config[section] = {**config.get(section, {}), **values}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(path: Path, **kwargs) -> dict[str, str]:
    config = load_config(path)
    check_semantics(config, str(path))
    return {row["stage"]: row["status"] for row in run_pipeline(config, path, **kwargs)}


@pytest.fixture(scope="module")
def first_run(workspace) -> dict[str, str]:
    return run(write_config(workspace))


def test_every_stage_writes_a_verifiable_record(workspace, first_run):
    assert first_run == {s: "ran" for s in STAGES}
    run_dir = workspace / "artifacts" / "tiny"
    for stage in STAGES:
        record = json.loads((run_dir / stage / STAGE_FILE).read_text())
        assert record["outputs"] == manifest(run_dir / stage) and record["outputs"]
        assert record["wall_s"] >= 0 and record["peak_rss_mb"] > 0
        assert all(set(v) == {"path", "sha256"} for v in record["inputs"].values())
    prune = json.loads((run_dir / "prune" / STAGE_FILE).read_text())
    assert prune["commands"][0]["args"][:3] == ["prune", "--model", str(workspace / "tiny")]
    assert str(run_dir / "prune" / "model") in prune["commands"][0]["args"]  # the final path, not the temp one
    model, _, metadata = load_checkpoint(run_dir / "prune" / "model")
    assert metadata["params_after"] < metadata["params_before"]
    finetuned = json.loads((run_dir / "finetune" / "model" / "saap.json").read_text())
    assert finetuned["kind"] == "finetuned" and finetuned["parent"]["model"] == str(run_dir / "prune" / "model")
    assert finetuned["teacher"]["source"]["path"] == str(workspace / "tiny") and finetuned["method"] == "full"
    pruned_eval = json.loads((run_dir / "eval" / "pruned.json").read_text())  # the report's "before recovery"
    assert pruned_eval["model"] == str(run_dir / "prune" / "model")
    evaluation = json.loads((run_dir / "eval" / "model.json").read_text())
    assert evaluation["model"] == str(run_dir / "finetune" / "model")  # later stages take the fine-tuned model
    dense = json.loads((run_dir / "eval" / "dense.json").read_text())
    assert evaluation["params"] < dense["params"] and evaluation["generations"]
    # Agreement is measured against the dense model's continuations: the recovered and pruned models have it.
    assert "first_divergence" not in dense["generation_quality"]
    assert (
        "first_divergence" in evaluation["generation_quality"]
        and "first_divergence" in pruned_eval["generation_quality"]
    )
    assert (run_dir / "export-onnx" / "fp32").is_dir() and (run_dir / "export-gguf" / "model-f16.gguf").is_file()
    report = (run_dir / "report.md").read_text()
    bench = json.loads((run_dir / "bench" / "bench.json").read_text())
    assert bench["speedups"] and bench["speedups"][0]["engine"] == "torch"  # pruned vs its dense parent
    for heading in (
        "## Size",
        "## Layers",
        "## Quality",
        "## Generations",
        "## Throughput",
        "## Artifacts",
        "llama-cli",
        "tokens until first divergence from dense",
    ):
        assert heading in report
    assert (run_dir / "report" / "layers.png").is_file() and (run_dir / "report.html").is_file()
    assert not list(run_dir.glob(".*"))  # no temporary directories left


def test_teacher_text_is_sampled_into_the_stage_then_distilled_on(workspace, first_run):
    changes = {"finetune": {"data": "teacher"}, "sample": {"count": 12, "tokens": 20}}
    config = yaml.safe_load(write_config(workspace, **changes).read_text()) | {"name": "tiny-teacher"}
    path = workspace / "tiny-teacher.yaml"  # its own run directory: the first run's stays as it was
    path.write_text(yaml.safe_dump(config))
    statuses = run(path, until_stage="finetune")
    assert statuses["finetune"] == "ran"
    stage_dir = workspace / "artifacts" / "tiny-teacher" / "finetune"
    record = json.loads((stage_dir / STAGE_FILE).read_text())
    sample, finetune = (c["args"] for c in record["commands"])
    assert sample[:3] == ["sample", "--model", str(workspace / "tiny")] and "--count" in sample
    assert str(stage_dir / "teacher-text" / "samples.jsonl") in finetune
    assert record["settings"]["sample"]["count"] == 12
    finetuned = json.loads((stage_dir / "model" / "saap.json").read_text())
    assert finetuned["data"]["format"] == "tokens" and finetuned["data"]["records"] == 12
    assert run(path, until_stage="finetune")["finetune"] == "skipped"


def test_rerun_skips_every_stage(workspace, first_run):
    statuses = run(write_config(workspace))
    assert statuses == {s: "skipped" for s in STAGES}


def test_changed_setting_reruns_its_stage_and_what_depends_on_it(workspace, first_run):
    statuses = run(write_config(workspace, eval={"ppl_windows": 3}, export={"gguf": ["f32"]}))
    assert {s for s, v in statuses.items() if v == "ran"} == {"eval", "export-gguf", "report"}
    run_dir = workspace / "artifacts" / "tiny"
    assert [p.name for p in (run_dir / "export-gguf").glob("*.gguf")] == ["model-f32.gguf"]
    eval_record = json.loads((run_dir / "eval" / STAGE_FILE).read_text())
    assert eval_record["commands"][0].get("reused") is None  # dense re-scored: its settings changed too

    statuses = run(write_config(workspace, eval={"ppl_windows": 3}, export={"gguf": ["f32"]}), force=["eval"])
    assert {s for s, v in statuses.items() if v == "ran"} == {"eval", "report"}
    eval_record = json.loads((run_dir / "eval" / STAGE_FILE).read_text())
    assert eval_record["commands"][0].get("reused")  # same source and settings: dense scores kept

    statuses = run(write_config(workspace, eval={"ppl_windows": 3}, export={"gguf": ["f32"]}), until_stage="load")
    assert statuses == {"load": "skipped"}


def test_corrupt_output_is_rebuilt(workspace, first_run):
    path = write_config(workspace, eval={"ppl_windows": 3}, export={"gguf": ["f32"]})
    run(path)
    gguf = workspace / "artifacts" / "tiny" / "export-gguf" / "model-f32.gguf"
    gguf.write_bytes(gguf.read_bytes()[:100])
    statuses = run(path)
    assert statuses["export-gguf"] == "ran" and statuses["prune"] == "skipped"
    assert gguf.stat().st_size > 100


def test_from_needs_earlier_stages_and_reruns_the_rest(workspace, first_run):
    path = write_config(workspace, eval={"ppl_windows": 3}, export={"gguf": ["f32"]})
    statuses = run(path, from_stage="export-gguf")
    assert statuses["prune"] == "reused" and statuses["export-gguf"] == "ran" and statuses["report"] == "ran"
    with pytest.raises(SaapError, match="unknown stage"):
        run(path, force=["compile"])


def test_kill_9_mid_stage_resumes_there_with_nothing_corrupt(workspace, first_run):
    run_dir = workspace / "artifacts" / "tiny"
    path = write_config(workspace, prune={"seed": 1}, eval={"ppl_windows": 3}, export={"gguf": ["f32"]})
    old_prune = json.loads((run_dir / "prune" / STAGE_FILE).read_text())
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    child = subprocess.Popen(
        [sys.executable, "-m", "saap.pipeline.cli", "run", str(path)],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not list(run_dir.glob(".prune.tmp-*/log.txt")) and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)  # the `saap prune` child is now importing or pruning: well before it can finish
    os.killpg(child.pid, signal.SIGKILL)  # the orchestrator and its `saap prune` child, mid-write
    child.wait()
    assert list(run_dir.glob(".prune.tmp-*")), "the kill came too late to interrupt the prune stage"
    # The previous, complete prune output is untouched and still verifies.
    assert json.loads((run_dir / "prune" / STAGE_FILE).read_text()) == old_prune
    assert manifest(run_dir / "prune") == old_prune["outputs"]

    statuses = run(path, until_stage="prune")
    assert statuses == {"load": "skipped", "prune": "ran"}
    assert not list(run_dir.glob(".*"))
    load_checkpoint(run_dir / "prune" / "model")  # verifies every sha256


def test_a_command_that_fails_after_writing_its_partial_output_is_recorded_not_fatal(tmp_path):
    """``saap bench`` with a worker killed by a signal exits 2 but writes bench.json with the failed
    row: the stage keeps it, records the error, and the pipeline goes on to the report."""
    from saap.pipeline.run import Context, Stage, _command, _execute

    def bench_like(write_partial: bool):
        def fill(ctx, out):
            if write_partial:
                (out / "bench.json").write_text("{}")
            return [_command(["bench", "--models", str(tmp_path / "missing")], partial="bench.json")]

        return Stage("bench", lambda ctx: {}, lambda ctx: {}, fill)

    ctx = Context(config=None, config_path=tmp_path / "run.yaml", run_dir=tmp_path / "run")
    ctx.run_dir.mkdir()
    record = _execute(bench_like(True), ctx, "a" * 64, {}, {})
    assert len(record["errors"]) == 1 and "'saap bench' exit 2: model" in record["errors"][0]
    assert (ctx.run_dir / "bench" / "bench.json").is_file() and "bench.json" in record["outputs"]
    with pytest.raises(SaapError, match="does not exist"):  # nothing written: an error at once
        _execute(bench_like(False), ctx, "b" * 64, {}, {})


def test_a_stage_child_prints_only_progress_bars_and_the_rest_goes_to_its_log(workspace, tmp_path, capfd):
    log, bars = tmp_path / "log.txt", []
    args = ["prune", "--model", str(workspace / "tiny"), "--ratio", "0.2", "--align", "4", "--num-samples", "2"]
    args += ["--calibration", str(workspace / "text.txt"), "--seq-len", "16", "--out", str(tmp_path / "p")]
    assert run_saap(args, log, progress=bars.append).error is None
    assert capfd.readouterr().err == "" and bars and all("%|" in bar for bar in bars)
    failed = run_saap(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"], log, False, bars.append)
    assert "does not exist" in failed.error and capfd.readouterr().err == ""
    assert "saap: error:" in log.read_text() and "%|" not in log.read_text()

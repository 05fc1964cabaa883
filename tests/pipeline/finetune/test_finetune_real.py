"""`saap finetune` on the real SmolLM2-135M, pruned by SAAP: two steps of each method, in a fresh process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[3]
ARGS = ["--max-steps", "2", "--batch-size", "1", "--seq-len", "64", "--val-size", "4", "--quiet"]

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "saap-p20"
    cmd = [sys.executable, "-m", "saap.pipeline.cli", "prune", "--model", "smollm2-135m", "--method", "saap"]
    subprocess.run(
        # The plan evolution is pinned off: on 2 search sequences it only adds noise and minutes, and
        # these tests are about fine-tuning a pruned checkpoint, not about the plan (test_evolve covers it).
        [*cmd, "--ratio", "0.2", "--num-samples", "4", "--search-samples", "2", "--search-generations", "0"]
        + ["--out", str(out), "--quiet"],
        cwd=PROJECT,
        check=True,
    )
    return out


@pytest.mark.parametrize("method", ["group-lora", "lora"])
def test_two_steps_on_the_pruned_model_give_a_loadable_checkpoint(pruned, tmp_path, method):
    out = tmp_path / method
    cmd = [sys.executable, "-m", "saap.pipeline.cli", "finetune", "--model", str(pruned), "--method", method]
    cmd += ["--data", "finetune/alpaca_en_demo.json", "--out", str(out), *ARGS]
    proc = subprocess.run(cmd, cwd=PROJECT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "saap.json").read_text())
    assert meta["steps"] == 2 and meta["parent"]["saap_json_sha256"] and meta["data"]["records"] == 999
    assert (out / "quantized" / "quantization.json").is_file() == (method == "group-lora")
    generate = [sys.executable, "-m", "saap.pipeline.cli", "generate", "--model", str(out), "--max-new-tokens", "4"]
    proc = subprocess.run([*generate, "--prompt", "Paris is"], cwd=PROJECT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("Paris is"), proc.stderr[-2000:]


def test_distillation_from_the_embedded_parent_lowers_the_held_out_loss(pruned, tmp_path):
    """--teacher parent finds the dense SmolLM2 through the pruned checkpoint's saap.json, and a few
    steps of all kept weights on plain web text already move the held-out loss down."""
    out = tmp_path / "distilled"
    cmd = [sys.executable, "-m", "saap.pipeline.cli", "finetune", "--model", str(pruned), "--teacher", "parent"]
    cmd += ["--data", "calibration/c4_sample.jsonl", "--out", str(out), "--max-steps", "4", "--batch-size", "2"]
    cmd += ["--seq-len", "64", "--val-size", "8", "--eval-steps", "0", "--quiet"]
    proc = subprocess.run(cmd, cwd=PROJECT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "saap.json").read_text())
    assert meta["method"] == "full" and meta["teacher"]["source"]["name"] == "smollm2-135m"
    assert meta["teacher"]["params"] == 134_515_008 and meta["eval_loss"]["after"] < meta["eval_loss"]["parent"]

"""The product on the real model: SmolLM2-135M pruned at 0.2, reloaded in fresh processes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
SAAP = [sys.executable, "-m", "saap.pipeline.cli"]
PPL_WINDOWS = "64"

pytestmark = pytest.mark.real_model


def saap(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([*SAAP, *args], cwd=PROJECT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "smol-p20"
    saap("prune", "--model", "smollm2-135m", "--ratio", "0.2", "--method", "llm-pruner", "--out", str(out), "--quiet")
    return out


def test_pruned_checkpoint_records_what_was_done(pruned):
    meta = json.loads((pruned / "saap.json").read_text())
    assert meta["params_before"] == 134_515_008
    assert abs(meta["ratio_achieved"] - 0.2) <= 0.01
    assert meta["pruned_layers"] == [4, 28]
    assert meta["source"]["name"] == "smollm2-135m" and len(meta["source"]["sha256"]) == 64
    config = json.loads((pruned / "config.json").read_text())
    widths = config["intermediate_size_per_layer"]
    assert widths[:4] == [1536] * 4 and all(w % 32 == 0 and w < 1536 for w in widths[4:28])


def test_reloaded_model_generates_ten_greedy_tokens(pruned):
    proc = saap("generate", "--model", str(pruned), "--prompt", "The capital of France is", "--max-new-tokens", "10")
    completion = proc.stdout.strip().removeprefix("The capital of France is")
    assert len(completion.split()) >= 3, proc.stdout


def test_pruned_perplexity_is_finite_and_within_6x_of_dense(pruned, tmp_path):
    dense_json, pruned_json = tmp_path / "dense.json", tmp_path / "pruned.json"
    common = ["--ppl", "wikitext2", "--ppl-windows", PPL_WINDOWS, "--seq-len", "128", "--quiet"]
    saap("eval", "--model", "smollm2-135m", *common, "--out", str(dense_json))
    saap("eval", "--model", str(pruned), *common, "--out", str(pruned_json))
    dense = json.loads(dense_json.read_text())["perplexity"]["wikitext2"]["perplexity"]
    ppl = json.loads(pruned_json.read_text())["perplexity"]["wikitext2"]["perplexity"]
    print(f"wikitext2 ppl over {PPL_WINDOWS} windows: dense {dense:.1f}, pruned {ppl:.1f}")
    assert 1 < dense < ppl < 6 * dense

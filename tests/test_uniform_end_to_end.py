"""The real SmolLM2-135M pruned with ``--shape uniform``: a standard Llama checkpoint that plain transformers
loads and llama.cpp's own converter turns into a GGUF that runs, with no saap code in either.

Magnitude importance and two search sequences keep the prune fast; the uniform search, the compaction
and the checkpoint are the same as with the default importance."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from saap.export.genai_builder import build_reference
from saap.runtime.checkpoint import load_checkpoint
from saap.runtime.engine import EngineSettings, load_engine
from tests.export.test_gguf import STRINGS, f32_kv_logits
from tests.pipeline.prune.test_uniform import llama_cpp_convert

PROJECT = Path(__file__).resolve().parents[1]
PROMPT = "The three primary colors are red, yellow and blue. Mixing red and yellow gives"

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def uniform(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uniform") / "smollm2-uniform-20"
    cmd = [sys.executable, "-m", "saap.pipeline.cli", "prune", "--model", "smollm2-135m", "--ratio", "0.2",
           "--shape", "uniform", "--importance", "magnitude", "--num-samples", "8", "--search-samples", "2",
           "--out", str(out), "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=PROJECT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_the_checkpoint_is_a_standard_llama_config(uniform):
    config = json.loads((uniform / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert not [k for k in config if k.endswith("_per_layer") or k in ("auto_map", "per_layer_config")]
    record = json.loads((uniform / "saap.json").read_text())
    assert config["num_hidden_layers"] == 30 - len(record["uniform"]["removed_layers"])
    assert record["ratio_achieved"] >= 0.2
    assert {k: config[k] for k in record["uniform"]["kept_shape"]} == record["uniform"]["kept_shape"]


def test_plain_transformers_loads_it_as_saap_does(uniform):
    plain = AutoModelForCausalLM.from_pretrained(uniform)
    ours, tokenizer, _ = load_checkpoint(uniform)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, ours(ids).logits)
        assert torch.equal(plain.generate(ids, max_new_tokens=12, do_sample=False),
                           ours.generate(ids, max_new_tokens=12, do_sample=False))  # fmt: skip


def test_llama_cpps_converter_makes_a_gguf_that_runs_it(uniform, tmp_path):
    llama_cpp_convert(uniform, tmp_path / "m.gguf")
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.architecture"].contents() == "llama"
    settings = EngineSettings(threads=2, n_ctx=256)
    torch_engine, gguf_engine = (
        load_engine("torch", str(uniform), settings),
        load_engine("gguf", str(tmp_path / "m.gguf"), settings),
    )
    ids = torch_engine.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    diff = np.abs(f32_kv_logits(tmp_path / "m.gguf", ids) - torch_engine.prefill(ids))
    print(f"converter's f32 GGUF, F32 KV cache: max |logit diff| {diff.max():.2e}")
    assert diff.max() < 1e-2
    assert gguf_engine.generate(ids, 24, stop_at_eos=False) == torch_engine.generate(ids, 24, stop_at_eos=False)
    import llama_cpp

    vocab = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    for text in STRINGS:
        assert (
            vocab.tokenize(text.encode(), add_bos=False, special=False)
            == torch_engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        )


@pytest.mark.skipif(
    not os.environ.get("SAAP_GENAI_BUILDER_PYTHON"),
    reason="needs a virtualenv with onnxruntime-genai's builder (transformers >= 5): SAAP_GENAI_BUILDER_PYTHON",
)
def test_onnxruntime_genais_builder_builds_it_and_genai_runs_it(uniform, tmp_path):
    built = build_reference(os.environ["SAAP_GENAI_BUILDER_PYTHON"], uniform, tmp_path / "genai", "fp32")
    settings = EngineSettings(threads=2, n_ctx=256)
    torch_engine, genai = load_engine("torch", str(uniform), settings), load_engine("onnx-genai", str(built), settings)
    ids = torch_engine.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert genai.generate(ids, 24, stop_at_eos=False) == torch_engine.generate(ids, 24, stop_at_eos=False)

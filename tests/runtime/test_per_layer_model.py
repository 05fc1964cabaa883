"""Per-layer checkpoints in the user's own tools: transformers (remote code) and lm-eval's ``hf`` model."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from saap.pipeline.zeroshot import prepare_tasks
from saap.runtime.checkpoint import MODELING_FILE, load_checkpoint, save_checkpoint
from saap.runtime.surgery import PER_LAYER_KEYS
from tests.conftest import FAMILY_EXTRAS, make_model
from tests.runtime.test_surgery import slice_groups

# Layer 1 loses a KV group and half its MLP, layer 2 its attention, layer 3 everything.
REMOVED_KV = {1: [0], 2: [0, 1], 3: [0, 1]}
REMOVED_CHANNELS = {1: list(range(0, 128, 2)), 3: list(range(128))}


def per_layer(family: str, tied: bool = True):
    model = make_model(heads=4, kv_heads=2, tied=tied, layers=6, family=family)
    return slice_groups(model, REMOVED_KV, REMOVED_CHANNELS)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("family", list(FAMILY_EXTRAS))
def test_transformers_loads_a_per_layer_checkpoint_with_its_modeling_file(tokenizer, tmp_path, family, tied):
    model = per_layer(family, tied)
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", {"kind": "pruned"})
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_saap.SaapForCausalLM"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        assert torch.equal(loaded.generate(ids[:1, :4], max_new_tokens=5, do_sample=False),
                           model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False))  # fmt: skip
    # saap's own loader reads the same directory (the modeling file is one more checksummed file)
    ours, _, meta = load_checkpoint(tmp_path / "ckpt")
    assert MODELING_FILE in meta["files"]
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, model(ids).logits)


def test_per_layer_config_is_transformers_5s_sparse_form(tokenizer, tmp_path):
    save_checkpoint(per_layer("llama"), tokenizer, tmp_path / "ckpt", {})
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["per_layer_config"] == {
        "1": {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64},
        "2": {"skip": ["attention"]},
        "3": {"skip": ["attention", "mlp"]},
    }
    assert all(key in config for key in PER_LAYER_KEYS.values())  # saap's lists stay beside it


def test_without_remote_code_transformers_refuses_rather_than_loading_wrong_shapes(tokenizer, tmp_path):
    save_checkpoint(per_layer("llama"), tokenizer, tmp_path / "ckpt", {})
    with pytest.raises(RuntimeError, match="size mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")


def test_the_modeling_file_needs_no_saap(tokenizer, tmp_path):
    model = per_layer("qwen2")
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", {})
    ids = [[5, 6, 7, 8]]
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits[0, -1].argmax().item()
    code = (
        "import sys, torch\n"
        "sys.modules['saap'] = None  # any import of saap now fails\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True)\n"
        f"print(m(torch.tensor({ids})).logits[0, -1].argmax().item())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-1500:]
    assert int(out.stdout.split()[-1]) == expected


def test_lm_eval_scores_a_per_layer_checkpoint_with_its_hf_model(tokenizer, tmp_path):
    """lm-eval's own command line, ``--model hf``: the tool users score models with, no saap code."""
    model = per_layer("llama", tied=False)
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", {})
    tasks = prepare_tasks(["piqa"], None, tmp_path / "tasks")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={tmp_path / 'ckpt'},trust_remote_code=True,dtype=float32",
           "--tasks", "piqa", "--include_path", str(tasks), "--limit", "6", "--device", "cpu", "--batch_size", "2",
           "--output_path", str(tmp_path / "out")]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    piqa = results["results"]["piqa"]
    assert 0.0 <= piqa["acc,none"] <= 1.0
    assert results["n-samples"]["piqa"]["effective"] == 6

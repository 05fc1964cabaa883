"""``--shape uniform``: one kept shape, whole layers removed, a standard checkpoint of every family."""

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

from saap.pipeline.prune import PruneSettings, prune
from saap.pipeline.prune.speed_model import CostModel
from saap.runtime.checkpoint import MODELING_FILE, save_checkpoint
from saap.runtime.engine import EngineSettings, load_engine
from saap.runtime.errors import SaapError
from saap.runtime.families import family_of
from saap.runtime.models import LoadedModel, load_model
from saap.runtime.surgery import PER_LAYER_KEYS, LayerShape, layer_shapes
from tests.conftest import FAMILY_EXTRAS, SAMPLE_TEXT, make_model
from tests.export.test_gguf import EXACT, GELU_TABLE, STRINGS, f32_kv_logits
from tests.pipeline.prune.test_speed_model import make_profile

FAMILIES = list(FAMILY_EXTRAS)
# (heads, kv heads, tied): multi-head and grouped-query attention, tied and untied output
ATTENTION = {"mha-tied": (4, 4, True), "gqa-untied": (4, 2, False)}


def uniform_prune(tokenizer, text_file, family: str, case: str, ratio: float = 0.3, **settings):
    heads, kv_heads, tied = ATTENTION[case]
    model = make_model(heads=heads, kv_heads=kv_heads, tied=tied, layers=6, family=family)
    settings = PruneSettings(ratio=ratio, shape="uniform", calibration=str(text_file), num_samples=8, seq_len=16,
                             align=8, search_samples=4, **settings)  # fmt: skip
    record = prune(LoadedModel(model, tokenizer, {"name": "tiny", "sha256": "0" * 64}), settings, progress=False)
    return model, record


@pytest.mark.parametrize("case", list(ATTENTION))
@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_prune_writes_a_standard_checkpoint_plain_transformers_loads(
    tokenizer, text_file, tmp_path, family, case
):
    model, record = uniform_prune(tokenizer, text_file, family, case)
    assert record["ratio_achieved"] >= 0.3 - 1e-9  # the knapsack meets the budget, never falls short
    search = record["uniform"]
    kept = LayerShape(**search["kept_shape"])
    assert layer_shapes(model.config) == [kept] * model.config.num_hidden_layers
    assert model.config.num_hidden_layers == 6 - len(search["removed_layers"])
    assert search["deleted_layers"] == search["removed_layers"] and 0 not in search["removed_layers"]
    assert search["kl"] == min(f["kl"] for f in search["finalists"])  # chosen on the whole-model KL
    if family == "qwen2":  # llama.cpp's qwen2 needs q at hidden x hidden
        assert kept.num_attention_heads == ATTENTION[case][0]
    if family == "gemma3_text":  # its converter writes no layer pattern: depth stays
        assert search["removed_layers"] == []

    save_checkpoint(model, tokenizer, tmp_path / "ckpt", {"kind": "pruned"})
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert not set(PER_LAYER_KEYS.values()) & set(config) and "auto_map" not in config
    assert "per_layer_config" not in config and not (tmp_path / "ckpt" / MODELING_FILE).exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")  # no saap code, no remote code
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)
        generated = plain.generate(ids[:, :4], max_new_tokens=6, do_sample=False)
        assert torch.equal(generated, model.generate(ids[:, :4], max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_narrowed_query_heads_are_chosen_by_measured_scores_under_the_uniform_constraint(
    tokenizer, text_file, tmp_path, family
):
    model, record = uniform_prune(tokenizer, text_file, family, "gqa-untied", ratio=0.3, narrow_queries=True)
    assert (
        layer_shapes(model.config) == [LayerShape(**record["uniform"]["kept_shape"])] * model.config.num_hidden_layers
    )
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", {"kind": "pruned"})
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)


def test_a_speed_budget_is_met_under_the_uniform_constraint(tokenizer, text_file, tmp_path):
    model = make_model(heads=8, kv_heads=4, layers=6, intermediate=256, head_dim=8)
    path = tmp_path / "profile.json"
    make_profile(model.config, CostModel(0.5, 0.2, 0.2, 0.01, 4.0)).save(path)
    settings = PruneSettings(target_speedup=1.4, profile=str(path), shape="uniform", align=8,
                             calibration=str(text_file), num_samples=4, seq_len=16, search_samples=2)  # fmt: skip
    record = prune(LoadedModel(model, tokenizer, {"name": "tiny"}), settings, progress=False)
    assert record["budget"]["speedup_predicted"] >= 1.4
    assert len(set(layer_shapes(model.config))) == 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"shape": "ragged"}, "--shape is one of per-layer, uniform"),
        ({"shape": "uniform", "method": "flap"}, "--shape uniform needs --allocation measured"),
    ],
)
def test_bad_shape_settings_are_refused(kwargs, message):
    with pytest.raises(SaapError, match=message):
        PruneSettings(**kwargs)


def test_uniform_needs_an_unpruned_model(tokenizer, text_file):
    from tests.runtime.test_surgery import slice_groups

    model = slice_groups(make_model(heads=4, kv_heads=2, layers=4), {}, {1: list(range(32))})
    settings = PruneSettings(ratio=0.2, shape="uniform", calibration=str(text_file), num_samples=4, seq_len=16,
                             align=8, search_samples=2)  # fmt: skip
    with pytest.raises(SaapError, match="needs a model whose layers all have one shape"):
        prune(LoadedModel(model, tokenizer, {"name": "tiny"}), settings, progress=False)


# --- llama.cpp's own converter --------------------------------------------------------------------------
# scripts/install-llama-converter.sh puts convert_hf_to_gguf.py, from the llama.cpp release saap builds, here.
CONVERTER = Path(sys.prefix) / "share" / "llama.cpp" / "convert_hf_to_gguf.py"


def llama_cpp_convert(checkpoint: Path, out: Path) -> None:
    assert CONVERTER.is_file(), "llama.cpp's converter is missing: run bash scripts/install-llama-converter.sh"
    env = dict(os.environ, PYTHONPATH=str(CONVERTER.parent / "gguf-py"))
    cmd = [sys.executable, str(CONVERTER), str(checkpoint), "--outfile", str(out), "--outtype", "f32"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def real_tokenizer():
    """SmolLM2's byte-level BPE: llama.cpp's converter only takes vocabularies it recognises."""
    return load_model("smollm2-135m").tokenizer


@pytest.mark.real_model
@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpps_own_converter_runs_every_familys_uniform_checkpoint(real_tokenizer, text_file, tmp_path, family):
    vocab = len(real_tokenizer)
    model = make_model(heads=4, kv_heads=2, tied=False, layers=6, family=family, vocab_size=vocab)
    settings = PruneSettings(ratio=0.3, ratio_of="decoder", shape="uniform", calibration=str(text_file),
                             num_samples=8, seq_len=16, align=8, search_samples=4)  # fmt: skip
    prune(LoadedModel(model, real_tokenizer, {"name": "tiny", "sha256": "0" * 64}), settings, progress=False)
    save_checkpoint(model, real_tokenizer, tmp_path / "ckpt", {"kind": "pruned"})
    llama_cpp_convert(tmp_path / "ckpt", tmp_path / "m.gguf")
    arch = gguf.GGUFReader(tmp_path / "m.gguf").fields["general.architecture"].contents()
    assert arch == family_of(model).gguf_arch
    ids = real_tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"][:24]
    reference = load_engine("torch", str(tmp_path / "ckpt"), EngineSettings(threads=1, n_ctx=128)).prefill(ids)
    bound = GELU_TABLE if family == "gemma3_text" else EXACT
    assert float(np.abs(f32_kv_logits(tmp_path / "m.gguf", ids) - reference).max()) < bound
    import llama_cpp

    vocab_only = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    for text in STRINGS:  # the converter wrote a tokenizer llama.cpp runs, and it tokenizes as HF does
        expected = real_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert vocab_only.tokenize(text.encode(), add_bos=False, special=False) == expected

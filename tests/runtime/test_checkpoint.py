import json
import subprocess
import sys

import pytest
import torch

from saap.runtime.checkpoint import load_checkpoint, save_checkpoint
from saap.runtime.errors import SaapError
from saap.runtime.io import write_json_atomic
from saap.runtime.surgery import layer_shapes
from tests.runtime.test_surgery import slice_groups

PROJECT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture
def pruned(tiny_model):
    return slice_groups(tiny_model, {1: [0]}, {0: [3, 4], 2: list(range(32))})


def test_round_trip_keeps_shapes_and_logits(pruned, tokenizer, tmp_path):
    out = tmp_path / "ckpt"
    meta = save_checkpoint(pruned, tokenizer, out, {"method": "test"})
    assert {"config.json", "model.safetensors", "saap.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert set(meta["files"]) >= {"config.json", "model.safetensors"}
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size_per_layer"] == [s.intermediate_size for s in layer_shapes(pruned.config)]
    model, tok, loaded_meta = load_checkpoint(out)
    assert loaded_meta["method"] == "test"
    assert layer_shapes(model.config) == layer_shapes(pruned.config)
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, pruned(ids).logits)
    if pruned.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tok("quick brown fox")["input_ids"] == tokenizer("quick brown fox")["input_ids"]


def test_load_builds_pruned_shapes_without_random_init(pruned, tokenizer, tmp_path, monkeypatch):
    save_checkpoint(pruned, tokenizer, tmp_path / "ckpt", {})

    def no_init(self):
        raise AssertionError("a real (non-meta) Linear was initialised during load")

    original = torch.nn.Linear.reset_parameters
    monkeypatch.setattr(
        torch.nn.Linear, "reset_parameters", lambda self: None if self.weight.is_meta else no_init(self)
    )
    load_checkpoint(tmp_path / "ckpt")
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", original)


def test_load_in_a_process_without_the_pruning_code(pruned, tokenizer, tmp_path):
    save_checkpoint(pruned, tokenizer, tmp_path / "ckpt", {})
    code = (
        "import sys, torch\n"
        "from saap.runtime.checkpoint import load_checkpoint\n"
        f"model, tok, meta = load_checkpoint({str(tmp_path / 'ckpt')!r})\n"
        "out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)\n"
        "assert out.shape == (1, 7)\n"
        "assert not any(m == 'pipeline' or m.startswith('pipeline.') for m in sys.modules), 'pruning code imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PROJECT)


def test_truncated_weights_are_refused(pruned, tokenizer, tmp_path):
    out = tmp_path / "ckpt"
    save_checkpoint(pruned, tokenizer, out, {})
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(SaapError, match="corrupt"):
        load_checkpoint(out)
    with pytest.raises(SaapError, match="cannot read"):  # even when the checksums are not checked
        load_checkpoint(out, verify=False)


def test_wrong_shapes_in_config_are_refused(pruned, tokenizer, tmp_path):
    out = tmp_path / "ckpt"
    save_checkpoint(pruned, tokenizer, out, {})
    config = json.loads((out / "config.json").read_text())
    config["intermediate_size_per_layer"][0] += 32
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(SaapError, match="shape"):
        load_checkpoint(out, verify=False)


def test_existing_output_is_refused_unless_overwrite(pruned, tokenizer, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    with pytest.raises(SaapError, match="already exists"):
        save_checkpoint(pruned, tokenizer, out, {})
    save_checkpoint(pruned, tokenizer, out, {}, overwrite=True)
    assert (out / "saap.json").is_file()


def test_failed_save_leaves_nothing_behind(pruned, tokenizer, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", broken)
    with pytest.raises(RuntimeError):
        save_checkpoint(pruned, tokenizer, tmp_path / "ckpt", {})
    assert list(tmp_path.iterdir()) == []


def test_write_json_atomic(tmp_path):
    write_json_atomic(tmp_path / "a" / "r.json", {"x": 1})
    assert json.loads((tmp_path / "a" / "r.json").read_text()) == {"x": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["r.json"]


def test_a_gemma_derivative_carries_the_gemma_notice_and_a_llama_none(tokenizer, tmp_path):
    from tests.conftest import make_model

    save_checkpoint(make_model(family="gemma3_text"), tokenizer, tmp_path / "gemma", {"kind": "test"})
    save_checkpoint(make_model(), tokenizer, tmp_path / "llama", {"kind": "test"})
    assert "Gemma Terms of Use" in (tmp_path / "gemma" / "NOTICE").read_text()
    assert "NOTICE" in json.loads((tmp_path / "gemma" / "saap.json").read_text())["files"]
    assert not (tmp_path / "llama" / "NOTICE").exists()

import builtins

import numpy as np
import pytest

from saap.export.onnx import export_onnx
from saap.runtime.checkpoint import save_checkpoint
from saap.runtime.engine import EngineSettings, load_engine
from saap.runtime.errors import SaapError
from tests.conftest import make_model
from tests.runtime.test_surgery import slice_groups

pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tokenizer):
    """A per-layer pruned GQA model (layer 1 keeps one KV group) and its fp32 ONNX export."""
    root = tmp_path_factory.mktemp("genai-engine")
    model = slice_groups(make_model(heads=6, kv_heads=2, tied=False), {1: [1]}, {0: list(range(8))})
    save_checkpoint(model, tokenizer, root / "ckpt", {})
    export_onnx(root / "ckpt", root / "onnx", progress=False)
    return root


def test_the_genai_engine_matches_the_torch_engine(export_dir):
    torch_engine = load_engine("torch", str(export_dir / "ckpt"), EngineSettings(threads=1))
    engine = load_engine("onnx-genai", str(export_dir / "onnx"), EngineSettings(threads=1))
    prompt = [5, 9, 17, 33, 2, 40, 7]
    logits = engine.prefill(prompt)
    assert logits.shape == (len(prompt), torch_engine.model.config.vocab_size) and logits.dtype == np.float32
    worst = float(np.abs(logits - torch_engine.prefill(prompt)).max())
    for token in [11, 250, 3]:
        worst = max(worst, float(np.abs(engine.decode_step(token) - torch_engine.decode_step(token)).max()))
    assert worst <= 1e-3
    assert engine.generate(prompt, 12, stop_at_eos=False) == torch_engine.generate(prompt, 12, stop_at_eos=False)
    text = "The quick brown fox"
    assert engine.tokenize(text) == torch_engine.tokenize(text)
    assert engine.detokenize(engine.tokenize(text)) == torch_engine.detokenize(torch_engine.tokenize(text))


def test_what_the_genai_engine_refuses(export_dir, monkeypatch, tmp_path):
    (tmp_path / "model.onnx").write_bytes((export_dir / "onnx" / "model.onnx").read_bytes())
    with pytest.raises(SaapError, match="has no genai_config.json"):
        load_engine("onnx-genai", str(tmp_path))
    with pytest.raises(SaapError, match="runs on cpu or cuda, not 'tensorrt'"):
        load_engine("onnx-genai", str(export_dir / "onnx"), EngineSettings(device="tensorrt"))
    real_import = builtins.__import__

    def no_genai(name, *args, **kwargs):
        if name == "onnxruntime_genai":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_genai)
    with pytest.raises(SaapError, match=r"needs onnxruntime-genai \(pip install 'saap\[genai\]'\)"):
        load_engine("onnx-genai", str(export_dir / "onnx"))

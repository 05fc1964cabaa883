import shutil

import numpy as np
import onnxruntime as ort
import pytest

from saap.export.onnx import export_onnx
from saap.runtime import onnx_engine
from saap.runtime.checkpoint import save_checkpoint
from saap.runtime.engine import ENGINES, EngineSettings, load_engine
from saap.runtime.errors import SaapError
from saap.runtime.onnx_engine import OnnxEngine
from saap.runtime.surgery import layer_shapes
from tests.conftest import make_model
from tests.runtime.test_surgery import slice_groups


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("onnx-engine")
    model = slice_groups(make_model(heads=6, kv_heads=2, tied=True), {1: [1]}, {0: list(range(8))})
    save_checkpoint(model, tokenizer, root / "ckpt", {})
    export_onnx(root / "ckpt", root / "onnx", progress=False)
    return root / "onnx", model


def test_engine_reads_each_layers_kv_heads_from_the_graph(export_dir):
    path, model = export_dir
    engine = OnnxEngine(str(path), EngineSettings(threads=1))
    assert "onnx" in ENGINES
    assert [spec.kv_heads for spec in engine.graph.past[::2]] == [
        s.num_key_value_heads for s in layer_shapes(model.config)
    ]
    assert engine.graph.session.get_session_options().intra_op_num_threads == 1
    logits = engine.prefill([5, 9, 17])
    assert logits.shape == (3, model.config.vocab_size) and logits.dtype == np.float32
    assert engine.shared.length == 3 and engine.decode_step(4).shape == (model.config.vocab_size,)
    assert engine.shared.length == 4
    np.testing.assert_array_equal(engine.prefill([5, 9, 17]), logits)  # prefill starts a new sequence


def test_shared_kv_buffer_decodes_like_a_growing_cache_and_grows_in_place(export_dir, monkeypatch, tmp_path):
    """The fused export's past and present are one bound buffer per cache; past its capacity it is
    reallocated with the tokens so far. The traced export (Concat-grown cache) gives the same logits."""
    path, _ = export_dir
    monkeypatch.setattr(onnx_engine, "FIRST_CAPACITY", 4)
    engine = OnnxEngine(str(path), EngineSettings(threads=1))
    engine.prefill([5, 9, 17])
    buffer = engine.shared.buffers
    assert engine.shared.capacity == 4
    steps = [engine.decode_step(t) for t in (4, 8, 15, 16, 23, 42)]
    assert engine.shared.capacity == 16 and engine.shared.length == 9 and engine.shared.buffers is not buffer
    traced = tmp_path / "traced"
    export_onnx(path.parent / "ckpt", traced, graph="traced", progress=False)
    reference = OnnxEngine(str(traced), EngineSettings(threads=1))
    assert reference.shared is None
    reference.prefill([5, 9, 17])
    for token, logits in zip((4, 8, 15, 16, 23, 42), steps, strict=True):
        np.testing.assert_allclose(reference.decode_step(token), logits, atol=1e-4)


def test_engine_accepts_the_onnx_file_and_round_trips_text(export_dir):
    path, _ = export_dir
    engine = load_engine("onnx", str(path / "model.onnx"))
    ids = engine.tokenize("The quick brown fox")
    assert engine.detokenize(ids) == "The quick brown fox"
    assert engine.eos_token_ids == {2}


def test_corrupt_or_missing_models_are_one_line_errors(export_dir, tmp_path):
    path, _ = export_dir
    truncated = tmp_path / "truncated"
    shutil.copytree(path, truncated)
    size = (truncated / "model.onnx").stat().st_size
    with open(truncated / "model.onnx", "r+b") as f:
        f.truncate(size // 2)
    errors = []
    with pytest.raises(SaapError, match="is corrupt: model.onnx has") as e:  # caught by the export record
        load_engine("onnx", str(truncated))
    errors.append(e.value)
    (truncated / "saap-onnx.json").unlink()
    with pytest.raises(SaapError, match="cannot load ONNX model") as e:  # and by ONNX Runtime without it
        load_engine("onnx", str(truncated))
    errors.append(e.value)
    (tmp_path / "garbage.onnx").write_bytes(b"\x00not a protobuf" * 10)
    with pytest.raises(SaapError, match="cannot load ONNX model") as e:
        load_engine("onnx", str(tmp_path / "garbage.onnx"))
    errors.append(e.value)
    with pytest.raises(SaapError, match="does not exist"):
        load_engine("onnx", str(tmp_path / "nothing-here"))
    with pytest.raises(SaapError, match="not an ONNX export directory"):
        load_engine("onnx", str(tmp_path))
    assert all("\n" not in str(error) for error in errors)


@pytest.mark.parametrize("device,provider", [("cuda", "CUDA"), ("tensorrt", "TensorRT")])
def test_missing_execution_provider_is_refused_not_silently_cpu(export_dir, device, provider):
    path, _ = export_dir
    if f"{provider.replace('TensorRT', 'Tensorrt')}ExecutionProvider" in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has the {provider} provider")
    with pytest.raises(SaapError, match=f"onnxruntime here has no {provider} execution provider"):
        load_engine("onnx", str(path), EngineSettings(device=device))


def test_unknown_device_is_refused(export_dir):
    with pytest.raises(SaapError, match="runs on cpu, cuda, tensorrt, not 'mps'"):
        load_engine("onnx", str(export_dir[0]), EngineSettings(device="mps"))

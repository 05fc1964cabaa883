"""Device settings of every engine: a GPU that is not there is a clear error, never a silent CPU run."""

from __future__ import annotations

from pathlib import Path

import pytest

from saap.runtime.engine import EngineSettings
from saap.runtime.errors import SaapError
from saap.runtime.gguf_engine import gpu_layers
from saap.runtime.onnx_engine import PROVIDERS, provider_options


def test_gguf_offload_follows_the_device():
    assert gpu_layers(EngineSettings(device="cpu"), supports_offload=False) == 0
    assert gpu_layers(EngineSettings(device="cuda"), supports_offload=True) == -1  # GPU device: all layers
    assert gpu_layers(EngineSettings(device="cuda", n_gpu_layers=12), supports_offload=True) == 12
    with pytest.raises(SaapError, match=r"built without GPU offload \(CUDA\)"):
        gpu_layers(EngineSettings(device="cuda"), supports_offload=False)
    with pytest.raises(SaapError, match=r"built without GPU offload \(METAL\).*GGML_METAL"):
        gpu_layers(EngineSettings(device="metal"), supports_offload=False)
    with pytest.raises(SaapError, match="not 'tpu'"):
        gpu_layers(EngineSettings(device="tpu"), supports_offload=True)


def test_onnx_gpu_providers_and_tensorrt_fp16():
    assert PROVIDERS["tensorrt"][0] == "TensorrtExecutionProvider"
    options = provider_options("TensorrtExecutionProvider", Path("/m/model.onnx"))
    assert options["trt_fp16_enable"] == "True" and options["trt_engine_cache_path"] == "/m/trt-cache"
    assert provider_options("CPUExecutionProvider", Path("/m/model.onnx")) == {}


def test_onnx_cuda_without_the_provider_is_a_clear_error(tmp_path):
    import onnxruntime as ort

    from saap.runtime.onnx_engine import create_session

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(SaapError, match="no CUDA execution provider.*onnxruntime-gpu"):
        create_session(tmp_path / "model.onnx", EngineSettings(device="cuda"))

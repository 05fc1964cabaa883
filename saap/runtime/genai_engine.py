"""The onnxruntime-genai engine: an ONNX export run by onnxruntime-genai's own generation loop, the
way a deployment would (``og.Model(export_dir)`` reads the ``genai_config.json`` every export writes).

An optional dependency (``pip install 'saap[genai]'``); without it, choosing this engine is one
clear error. Tokens come from onnxruntime-genai's tokenizer too, so what is measured is what ships.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from saap.runtime.engine import Engine, EngineSettings
from saap.runtime.errors import SaapError
from saap.runtime.onnx_engine import resolve_onnx_path

CONFIG_FILE = "genai_config.json"
PROVIDERS = {"cpu": None, "cuda": "cuda"}  # settings.device -> onnxruntime-genai's provider name


def _import_genai():
    try:
        import onnxruntime_genai
    except ImportError:
        raise SaapError("--engine onnx-genai needs onnxruntime-genai (pip install 'saap[genai]')") from None
    return onnxruntime_genai


class GenaiEngine(Engine):
    name = "onnx-genai"

    def __init__(self, model_spec: str, settings: EngineSettings):
        og = _import_genai()
        directory = resolve_onnx_path(model_spec).parent
        if not (directory / CONFIG_FILE).is_file():
            raise SaapError(f"'{directory}' has no {CONFIG_FILE} (export it again with saap export onnx)")
        if settings.device not in PROVIDERS:
            raise SaapError(f"the onnx-genai engine runs on {' or '.join(PROVIDERS)}, not '{settings.device}'")
        config = og.Config(str(directory))
        config.clear_providers()
        if PROVIDERS[settings.device]:
            config.append_provider(PROVIDERS[settings.device])
        if settings.threads:
            options = {"intra_op_num_threads": settings.threads}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.og = og
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        model_config = json.loads((directory / CONFIG_FILE).read_text())["model"]
        eos = model_config.get("eos_token_id")
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.context = int(model_config["context_length"])
        self.generator = None

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(np.asarray(list(ids), dtype=np.int32))

    def prefill(self, input_ids: Sequence[int]) -> np.ndarray:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.context, do_sample=False)
        self.generator = self.og.Generator(self.model, params)
        self.generator.append_tokens(np.asarray(list(input_ids), dtype=np.int32))
        return np.asarray(self.generator.get_output("logits"), dtype=np.float32)[0]

    def decode_step(self, token_id: int) -> np.ndarray:
        if self.generator is None:
            raise SaapError("decode_step before prefill")
        self.generator.append_tokens(np.asarray([token_id], dtype=np.int32))
        return np.asarray(self.generator.get_output("logits"), dtype=np.float32)[0, -1]


def cuda_available() -> bool:
    og = _import_genai()
    return bool(og.is_cuda_available())

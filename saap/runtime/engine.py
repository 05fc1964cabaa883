"""One interface over the runtimes that execute saap artifacts: torch, ONNX Runtime, llama.cpp.

An engine owns a model and its tokenizer and keeps one sequence's KV cache:

    engine = load_engine("torch", "artifacts/smol-p20")
    logits = engine.prefill(engine.tokenize("The capital of France is"))  # [n, vocab], resets the cache
    logits = engine.decode_step(token_id)                                 # [vocab], extends the cache
    ids = engine.generate("The capital of France is", max_new_tokens=20)   # greedy unless temperature > 0

Logits are float32 numpy arrays whatever the engine, so parity checks compare like with like.
Device and thread settings come from ``EngineSettings`` for every engine.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from saap.runtime.errors import SaapError

# name -> "module:class", imported on first use: the ONNX and llama.cpp engines import this module
# for ``Engine`` (so importing them here would be a cycle), and nobody should pay for onnxruntime or
# llama_cpp to run torch. A new runtime is one line here.
ENGINES = {
    "torch": "saap.runtime.engine:TorchEngine",
    "onnx": "saap.runtime.onnx_engine:OnnxEngine",
    "gguf": "saap.runtime.gguf_engine:GgufEngine",
    "onnx-genai": "saap.runtime.genai_engine:GenaiEngine",  # optional: pip install 'saap[genai]'
}


@dataclass
class EngineSettings:
    device: str = "cpu"  # cpu | cuda | mps (torch) | tensorrt (onnx) | metal, gpu (gguf: offloads all layers)
    threads: int | None = None  # None: the runtime's default (usually all physical cores)
    n_ctx: int = 2048  # llama.cpp context size
    n_gpu_layers: int = 0  # llama.cpp offload; -1 = all layers (the default on a GPU device)
    # llama.cpp: run the file once in a child first, so a build this CPU cannot run is an error, not a
    # signal (runtime.native). Off where the caller is itself such a child (the bench worker, the probe).
    probe: bool = True


class Engine(ABC):
    name: str
    eos_token_ids: set[int]

    @abstractmethod
    def tokenize(self, text: str) -> list[int]: ...

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def prefill(self, input_ids: Sequence[int]) -> np.ndarray:
        """Start a new sequence from ``input_ids``; logits of every position, ``[n, vocab]``."""

    @abstractmethod
    def decode_step(self, token_id: int) -> np.ndarray:
        """Append one token to the current sequence; its logits, ``[vocab]``."""

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        stop_at_eos: bool = True,
    ) -> list[int]:
        """New token ids after ``prompt``: greedy, or sampled at ``temperature``."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        rng = np.random.default_rng(seed)
        logits = self.prefill(ids)[-1]
        generated: list[int] = []
        while True:
            token = _pick(logits, temperature, rng)
            generated.append(token)
            if len(generated) >= max_new_tokens or (stop_at_eos and token in self.eos_token_ids):
                return generated
            logits = self.decode_step(token)


def _pick(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = (logits - logits.max()) / temperature
    probs = np.exp(scaled)
    return int(rng.choice(len(probs), p=probs / probs.sum()))


class TorchEngine(Engine):
    """The reference engine: the float checkpoint through transformers, with a DynamicCache."""

    name = "torch"

    def __init__(self, model_spec: str, settings: EngineSettings):
        import torch

        from saap.runtime.models import load_model

        self.torch = torch
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.device = torch.device(torch_device(settings.device))
        loaded = load_model(model_spec)
        self.model = loaded.model.to(self.device)
        self.tokenizer = loaded.tokenizer
        eos = self.model.generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.cache = None

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _forward(self, ids: Sequence[int]) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([list(ids)], device=self.device), past_key_values=self.cache, use_cache=True
            )
        self.cache = out.past_key_values
        return out.logits[0].float().cpu().numpy()

    def prefill(self, input_ids: Sequence[int]) -> np.ndarray:
        from transformers import DynamicCache

        self.cache = DynamicCache()
        return self._forward(input_ids)

    def decode_step(self, token_id: int) -> np.ndarray:
        return self._forward([token_id])[-1]


def torch_device(device: str) -> str:
    """``device`` if this torch build can use it, else one clear error (never a silent CPU run)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SaapError("device 'cuda' requested but this torch build sees no CUDA GPU")
    if device == "mps" and not torch.backends.mps.is_available():
        raise SaapError("device 'mps' requested but Metal (MPS) is not available to this torch build")
    if device not in ("cpu", "cuda", "mps"):
        raise SaapError(f"the torch engine runs on cpu, cuda or mps, not '{device}'")
    return device


def load_engine(kind: str, model: str, settings: EngineSettings | None = None) -> Engine:
    """Open ``model`` (a checkpoint/alias for torch, an .onnx dir for onnx, a .gguf file for gguf)."""
    settings = settings or EngineSettings()
    if kind not in ENGINES:
        raise SaapError(f"unknown engine '{kind}' (choose from {', '.join(ENGINES)})")
    module, cls = ENGINES[kind].split(":")
    return getattr(importlib.import_module(module), cls)(model, settings)

"""The llama.cpp engine: a .gguf file through llama-cpp-python, behind the common Engine interface.

Tokenization is llama.cpp's own (it honours the file's add_bos flag and special tokens), so what
runs here is what ``llama-cli -m file.gguf`` would run. ``logits_all=True`` keeps the logits of
every evaluated position, which ``prefill`` returns and perplexity needs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from saap.runtime.engine import Engine, EngineSettings
from saap.runtime.errors import SaapError
from saap.runtime.native import exit_description, run_module


def check_gguf_file(path: Path) -> None:
    """Refuse a missing, truncated or corrupt file before llama.cpp sees it (it may abort the process)."""
    from gguf import GGUFReader

    if not path.is_file():
        raise SaapError(f"GGUF file '{path}' does not exist")
    try:
        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for tensor in reader.tensors:
            # gguf-py maps tensor data lazily: a truncated file shows up as data shorter than declared.
            if tensor.data_offset + tensor.n_bytes > size or tensor.data.nbytes != tensor.n_bytes:
                raise ValueError(f"tensor {tensor.name} extends past the end of the file ({size} bytes)")
        if "general.architecture" not in reader.fields:
            raise ValueError("no general.architecture key")
    except SaapError:
        raise
    except Exception as e:  # gguf-py raises ValueError, struct errors, IndexError on damaged files
        raise SaapError(f"'{path}' is not a valid GGUF file (truncated or corrupt?): {e}") from None


GGUF_DEVICES = ("cpu", "cuda", "metal", "gpu")  # gpu: whichever backend this llama.cpp build offloads to
REBUILD_HINT = {
    "cuda": 'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python',
    "metal": 'CMAKE_ARGS="-DGGML_METAL=on" pip install --force-reinstall --no-cache-dir llama-cpp-python',
}


def gpu_layers(settings: EngineSettings, supports_offload: bool) -> int:
    """Layers to offload for ``settings``: 0 on the CPU, all (-1) by default on a GPU device.

    A GPU device or a non-zero ``n_gpu_layers`` on a build without offload is an error, not a CPU run.
    """
    if settings.device not in GGUF_DEVICES:
        raise SaapError(f"the gguf engine runs on {', '.join(GGUF_DEVICES)}, not '{settings.device}'")
    layers = settings.n_gpu_layers
    if settings.device != "cpu" and layers == 0:
        layers = -1
    if layers != 0 and not supports_offload:
        backend = settings.device if settings.device in REBUILD_HINT else "cuda"
        raise SaapError(
            f"this llama-cpp-python was built without GPU offload ({backend.upper()}), so device "
            f"'{settings.device}' / n_gpu_layers={layers} cannot run; reinstall it with {REBUILD_HINT[backend]}"
        )
    return layers


class NativeCrash(SaapError):
    """llama.cpp killed the process that ran it (a signal): the build has kernels this CPU cannot run."""


def crash_message(what: str, returncode: int) -> str:
    """One line: what failed, how, and the rebuild command that gives a build this CPU runs."""
    from saap.runtime.llama_build import rebuild_command

    return (
        f"llama.cpp {what} was {exit_description(returncode)}: this llama-cpp-python build has kernels this CPU "
        f"cannot run; rebuild it with: {rebuild_command()}  (or: bash scripts/install-llama-cpp.sh)"
    )


def build_info() -> str:
    """The installed llama-cpp-python and what its llama.cpp was compiled with (AVX2 = 1, AMX_INT8 = 1, ...)."""
    try:
        import llama_cpp
    except ImportError:
        return "not installed"
    return f"llama-cpp-python {llama_cpp.__version__}: {llama_cpp.llama_print_system_info().decode().strip()}"


PROBE_TEXT = "The capital of France is"
_probed: set[tuple] = set()  # (file, size, mtime, settings) already run in a child by this process


def probe(model_path: Path, settings: EngineSettings, n_gpu_layers: int) -> None:
    """Load, prefill and decode ``model_path`` in a child before this process does (once per file).

    The child runs the same kernels (prefill's batched matmuls, decode's single-row ones) on the same
    tensor types and shapes, so a SIGILL there means one here; it costs a second load (~1 s at 135M).
    """
    stat = model_path.stat()
    key = (str(model_path.resolve()), stat.st_size, stat.st_mtime_ns, settings.device, settings.threads, n_gpu_layers)
    if key in _probed:
        return
    config = {"path": str(model_path), "device": settings.device, "threads": settings.threads}
    config["n_gpu_layers"] = n_gpu_layers
    child = run_module("saap.runtime.gguf_engine", [json.dumps(config)], settings.threads)
    if child.returncode < 0:
        raise NativeCrash(crash_message(f"running '{model_path}'", child.returncode))
    # Any other failure (a file llama.cpp rejects, ...) is reported by this process's own load.
    _probed.add(key)


def _probe_main(config: dict) -> int:
    settings = EngineSettings(
        device=config["device"], threads=config["threads"], n_ctx=64, n_gpu_layers=config["n_gpu_layers"], probe=False
    )
    engine = GgufEngine(config["path"], settings)
    token = int(np.argmax(engine.prefill(engine.tokenize(PROBE_TEXT))[-1]))
    for _ in range(2):
        token = int(np.argmax(engine.decode_step(token)))
    return 0


class GgufEngine(Engine):
    name = "gguf"

    def __init__(self, path: str, settings: EngineSettings):
        try:
            import llama_cpp
        except ImportError:
            raise SaapError("the gguf engine needs llama-cpp-python: pip install llama-cpp-python") from None
        model_path = Path(path).expanduser()
        check_gguf_file(model_path)
        n_gpu_layers = gpu_layers(settings, llama_cpp.llama_supports_gpu_offload())
        if settings.probe:
            probe(model_path, settings, n_gpu_layers)
        # llama-cpp-python routes llama.cpp's log through Python's stderr; with verbose=False it discards
        # the load log, and with it the reason a load failed. So load verbosely into a buffer, keep the
        # error lines for the message, and silence the log afterwards.
        log = io.StringIO()
        try:
            with contextlib.redirect_stderr(log):
                self.llm = llama_cpp.Llama(
                    model_path=str(model_path),
                    n_ctx=settings.n_ctx,
                    n_threads=settings.threads,
                    n_threads_batch=settings.threads,  # prefill; llama-cpp-python's default is every core
                    n_gpu_layers=n_gpu_layers,
                    logits_all=True,
                    verbose=True,
                )
        except (ValueError, RuntimeError) as e:
            reason = [line.strip() for line in log.getvalue().splitlines() if "error" in line.lower()]
            raise SaapError(f"llama.cpp could not load '{model_path}': {reason[-1] if reason else e}") from None
        finally:
            # above CRITICAL: this llama-cpp-python maps llama.cpp's warnings to ERROR
            logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL + 1)
        self.llm.verbose = False
        # llama.cpp may round the context up; llama-cpp-python's buffers keep the size asked for.
        self.n_ctx = min(self.llm.n_ctx(), len(self.llm.input_ids), len(self.llm.scores))
        template = self.llm.metadata.get("tokenizer.chat_template")
        self.tokenizer = GgufChatTemplate(self, template) if template else None
        vocab = self.llm._model.vocab
        eot = llama_cpp.llama_vocab_eot(vocab)
        self.eos_token_ids = {t for t in (self.llm.token_eos(), eot) if t is not None and t >= 0}

    def tokenize(self, text: str) -> list[int]:
        # add_bos=True means "add what the file's add_bos/add_eos flags ask for"; special=True parses
        # "<|im_start|>" and friends as the Hugging Face tokenizer does.
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids), special=False).decode("utf-8", errors="replace")

    def _eval(self, ids: Sequence[int]) -> np.ndarray:
        ids = [int(t) for t in ids]
        start = self.llm.n_tokens
        if start + len(ids) > self.n_ctx:
            raise SaapError(f"sequence of {start + len(ids)} tokens exceeds the context size n_ctx={self.n_ctx}")
        self.llm.eval(ids)
        return np.array(self.llm.scores[start : start + len(ids)], dtype=np.float32)

    def prefill(self, input_ids: Sequence[int]) -> np.ndarray:
        if len(input_ids) == 0:
            raise SaapError("prefill needs at least one token")
        self.llm.reset()
        return self._eval(input_ids)

    def decode_step(self, token_id: int) -> np.ndarray:
        return self._eval([token_id])[-1]

    def close(self) -> None:
        self.llm.close()


class GgufChatTemplate:
    """The file's chat template, with the part of a Hugging Face tokenizer's interface that
    ``saap generate --chat`` uses (``chat_template``, ``apply_chat_template``)."""

    def __init__(self, engine: GgufEngine, template: str):
        self.engine, self.chat_template = engine, template

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = True
    ) -> list[int] | str:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llm = self.engine.llm
        bos, eos = (llm._model.token_get_text(t) if t >= 0 else "" for t in (llm.token_bos(), llm.token_eos()))
        formatter = Jinja2ChatFormatter(self.chat_template, eos, bos, add_generation_prompt=add_generation_prompt)
        text = formatter(messages=messages).prompt
        if not tokenize:
            return text
        # As transformers: the template writes its own special tokens, none are added around it.
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


if __name__ == "__main__":  # the probe's child: python -m runtime.gguf_engine '{"path": ..., ...}'
    try:
        sys.exit(_probe_main(json.loads(sys.argv[1])))
    except SaapError as e:
        print(f"saap: error: {e}", file=sys.stderr)
        sys.exit(2)

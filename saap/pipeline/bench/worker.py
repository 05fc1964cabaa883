"""One measured engine in its own process, driven by ``saap.pipeline.bench`` through JSON lines.

    python -m saap.pipeline.bench.worker '{"engine": "gguf", "artifact": "x.gguf", "device": "cpu", "threads": 2}'

It loads the engine and prints ``{"ok": true, "load_s": ..., "vocab": ...}`` (or ``{"ok": false,
"error": ...}`` and exits 2). Then for every request line ``{"prompt_tokens": P, "gen_tokens": G}``
on stdin it prefills P fixed token ids and feeds G more fixed ids one decode step at a time, and
prints the timings. ``"quit"`` (or end of input) prints the peak RSS (VmHWM: this engine and model
alone) and peak GPU memory, and exits.

A separate process per engine keeps the RSS of one model from polluting another's, and JSON (never
pickle) is the only thing that crosses the boundary. The protocol uses a private copy of stdout:
fd 1 is pointed at stderr so that a C library printing to stdout cannot corrupt it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from saap.runtime.memory import peak_rss_mb

SEED = 0
LOW_ID = 3  # skip the usual <unk>/<s>/</s> ids so no engine special-cases a token
HIGH_ID = 32000  # inside every LLaMA-family vocabulary, so all models get the same ids


def fixed_ids(count: int, vocab: int) -> list[int]:
    """The same pseudo-random token ids for every model with the same vocabulary (dense and pruned)."""
    rng = np.random.default_rng(SEED)
    return rng.integers(LOW_ID, min(vocab, HIGH_ID), size=count).tolist()


def measure(engine, prompt_tokens: int, gen_tokens: int, vocab: int, slowdown: float = 1.0) -> dict:
    """Time a prefill of ``prompt_tokens`` fixed ids and ``gen_tokens`` decode steps of fixed ids.

    Fixed ids rather than the argmax: every model does the same work whatever it predicts (no early
    end-of-sequence). ``slowdown`` > 1 sleeps inside every step so it takes that many times longer:
    the regression check's injected fault (``SAAP_BENCH_INJECT_SLOWDOWN``).
    """
    ids = fixed_ids(prompt_tokens + gen_tokens, vocab)
    started = time.perf_counter()
    logits = engine.prefill(ids[:prompt_tokens])
    int(np.argmax(logits[-1]))  # the first token exists once it is picked
    ttft = time.perf_counter() - started
    decode_start = time.perf_counter()
    for token in ids[prompt_tokens:]:
        step = time.perf_counter()
        engine.decode_step(token)
        if slowdown > 1:
            time.sleep((slowdown - 1) * (time.perf_counter() - step))
    decode = time.perf_counter() - decode_start
    return {"prefill_s": ttft, "ttft_s": ttft, "decode_s": decode}


def peak_gpu_mb(engine_name: str, device: str) -> float | None:
    """Peak GPU memory of this process: torch's allocator on CUDA, else nvidia-smi's per-process figure."""
    if device == "cpu":
        return None
    if engine_name == "torch" and device == "cuda":
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return float(used)
    return None


def main() -> int:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def say(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    config = json.loads(sys.argv[1])
    from saap.runtime.engine import EngineSettings, load_engine
    from saap.runtime.errors import SaapError

    settings = EngineSettings(
        device=config.get("device", "cpu"),
        threads=config.get("threads"),
        n_ctx=config.get("n_ctx", 2048),
        n_gpu_layers=config.get("n_gpu_layers", 0),
        probe=False,  # this process is the child: if llama.cpp kills it, the parent reports a failed row
    )
    try:
        started = time.perf_counter()
        engine = load_engine(config["engine"], config["artifact"], settings)
        vocab = int(engine.prefill([LOW_ID]).shape[-1])  # also a smoke test of the loaded model
        say({"ok": True, "load_s": round(time.perf_counter() - started, 3), "vocab": vocab})
    except SaapError as e:
        say({"ok": False, "error": str(e)})
        return 2
    slowdown = float(config.get("slowdown", 1.0))
    for line in sys.stdin:
        request = json.loads(line)
        if request == "quit":
            break
        try:
            say(measure(engine, request["prompt_tokens"], request["gen_tokens"], vocab, slowdown))
        except SaapError as e:
            say({"ok": False, "error": str(e)})
            return 2
    say({"peak_gpu_mb": peak_gpu_mb(config["engine"], settings.device), "peak_rss_mb": peak_rss_mb()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

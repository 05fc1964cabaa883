"""Text the teacher writes: ``saap sample`` draws continuations from a model (the dense parent) into a
cache directory, which ``saap finetune --teacher`` then distils on like any data file.

Why: windows of someone else's text (C4, books) never show the student the kind of text it will
write itself, and SAAP's pruned-and-recovered models loop on greedy decoding (issue 37). Sequences the
teacher samples are text the teacher finds likely, and they need no data from the user: any model can
be recovered from nothing but its own checkpoint. The cache is a directory (``samples.jsonl`` of token
ids and ``sample.json``, its record), so one sampling run serves any number of students of that teacher.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from saap.pipeline.data import bos_prefix, read_documents, resolve_data_file
from saap.pipeline.generation_quality import continuations
from saap.pipeline.options import option
from saap.runtime.errors import SaapError
from saap.runtime.io import atomic_dir

SAMPLES_FILE = "samples.jsonl"  # one {"input_ids": [...]} a line: the start tokens, then the sampled ones
RECORD_FILE = "sample.json"
TEACHER_DATA = "teacher"  # a run config's finetune.data: sample the teacher first (saap.pipeline.run)


@dataclass
class SampleSettings:
    """How ``saap sample`` draws the teacher's text (recorded in the cache's sample.json)."""

    count: int = option(256, "sequences to sample")
    tokens: int = option(128, "new tokens per sequence (a sequence ends early at end-of-sequence)")
    temperature: float = option(1.0, "softmax temperature of the sampling")
    top_p: float = option(0.95, "nucleus sampling: draw from the fewest tokens holding this much probability")
    prefixes: str | None = option(
        None, "text file whose documents' first --prefix-tokens tokens start the samples, in turn "
        "(default: none; every sample starts from the start-of-text token alone, so no data is needed)",
    )  # fmt: skip
    prefix_tokens: int = option(8, "with --prefixes: tokens of each document that start a sample")
    batch_size: int = option(32, "sequences sampled at once")
    seed: int = option(0, "seeds the sampling: two runs write the same samples")

    def validate(self) -> None:
        for flag, value in {"--count": self.count, "--tokens": self.tokens, "--batch-size": self.batch_size}.items():
            if value < 1:
                raise SaapError(f"{flag} must be at least 1")
        if self.prefix_tokens < 1:
            raise SaapError("--prefix-tokens must be at least 1")
        if not self.temperature > 0:
            raise SaapError("--temperature must be positive (0 would be greedy decoding: use saap generate)")
        if not 0 < self.top_p <= 1:
            raise SaapError("--top-p must be in (0, 1]")


# Tokens that end one pre-training document and begin the next (GPT-2's, kept by SmolLM2 and Qwen). An
# instruct model's BOS may be a chat token (SmolLM2's is <|im_start|>): after it the model writes one
# short chat turn, after a separator a document.
DOCUMENT_SEPARATORS = ("<|endoftext|>",)


def start_token(tokenizer) -> list[int]:
    """What a sample with no prefix starts from: the BOS a tokenizer puts before every text (Gemma), else
    the document separator, else the BOS or EOS token."""
    prefix = bos_prefix(tokenizer)
    if prefix:
        return prefix
    vocab = tokenizer.get_vocab()
    candidates = [vocab.get(t) for t in DOCUMENT_SEPARATORS] + [tokenizer.bos_token_id, tokenizer.eos_token_id]
    token_id = next((i for i in candidates if i is not None), None)
    if token_id is None:
        raise SaapError("the tokenizer has no start, separator or end token to start a sample from: pass --prefixes")
    return [token_id]


def start_ids(tokenizer, documents: list[str] | None, settings: SampleSettings) -> list[list[int]]:
    """The ``count`` token sequences the samples continue: the start token alone, or each document's
    first ``prefix_tokens`` tokens after it (documents shorter than that are passed over), in turn."""
    start = start_token(tokenizer)
    if documents is None:
        return [list(start) for _ in range(settings.count)]
    prefixes = []
    for document in documents:
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        if len(ids) >= settings.prefix_tokens:
            prefixes.append(start + ids[: settings.prefix_tokens])
    if not prefixes:
        raise SaapError(f"--prefixes '{settings.prefixes}' has no document of {settings.prefix_tokens} tokens or more")
    return list(itertools.islice(itertools.cycle(prefixes), settings.count))


def sample_teacher_text(
    model: str, out: str | Path, settings: SampleSettings, progress: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """Sample ``settings.count`` sequences from ``model`` into the cache directory ``out`` (written
    whole or not at all); returns its record. Raises ``SaapError`` on bad input, before the model loads."""
    from saap.runtime.models import load_model

    settings.validate()
    out = Path(out)
    if out.exists() and not overwrite:
        raise SaapError(f"output '{out}' already exists (pass --overwrite to replace it)")
    documents = read_documents(resolve_data_file(settings.prefixes)) if settings.prefixes else None
    loaded = load_model(model)
    starts = start_ids(loaded.tokenizer, documents, settings)
    torch.manual_seed(settings.seed)
    began = time.perf_counter()
    sampled = continuations(
        loaded.model, loaded.tokenizer, starts, settings.tokens, settings.batch_size, progress,
        desc="sampling the teacher's text", do_sample=True, temperature=settings.temperature,
        top_p=settings.top_p, top_k=0,  # top_k=0: no top-k cut beside top-p (a generation_config may set one)
    )  # fmt: skip
    seconds = time.perf_counter() - began
    new_tokens = sum(map(len, sampled))
    record = {
        "kind": "teacher-text",
        "model": model,
        "source": loaded.source,
        "settings": asdict(settings),
        "sequences": len(sampled),
        "new_tokens": new_tokens,
        "ended_at_eos": sum(len(s) < settings.tokens for s in sampled),
        "vocab_size": len(loaded.tokenizer),
        "seconds": round(seconds, 2),
        "tokens_per_second": round(new_tokens / seconds, 1) if seconds else None,
    }
    with atomic_dir(out, overwrite) as tmp:
        lines = (json.dumps({"input_ids": s + c}) for s, c in zip(starts, sampled, strict=True))
        (tmp / SAMPLES_FILE).write_text("\n".join(lines) + "\n")
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record

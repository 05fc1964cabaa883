"""Does the model still write text? Greedy continuations of a fixed prompt set, measured for loops
(repeated n-grams), variety (distinct-n) and, against a reference model's continuations (the dense
parent's), agreement: where the two first diverge and how likely the reference's tokens are.

Perplexity does not see loops: a pruned-and-recovered SmolLM2 at 1.6x dense WikiText-2 perplexity
answered "Once upon a time, there was a" with "... The story of the story of the story of ...".
The prompts (``saap/data/prompts/generation.jsonl``) are dev text, never a test split; all counts are
over generated token ids, so they do not depend on how a tokenizer decodes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from saap.pipeline.data import PACKAGED_DATA, resolve_data_file
from saap.runtime.errors import SaapError

PROMPTS_DATA = "prompts/generation.jsonl"  # relative to a data dir (saap/data, or the user's --data-dir)
PACKAGED_PROMPTS = PACKAGED_DATA / PROMPTS_DATA  # saap's own copy: scripts/make_generation_prompts.py writes it
# The prompts the run report shows side by side, dense against pruned: the first of the set.
REPORT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a",
    "def fibonacci(n):",
    "The three primary colors are",
)
NEW_TOKENS = 64
LOOP_N = 4
# A continuation "loops" when over this share of its 4-grams repeat an earlier one (issue 37's measure:
# the dense SmolLM2 stays under it on 16 of 20 everyday prompts, its pruned models on almost none).
LOOP_THRESHOLD = 0.3


def load_prompts() -> list[str]:
    path = resolve_data_file(PROMPTS_DATA)
    return [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line]


# --- measures on token ids (known answers: tests/pipeline/test_generation_quality.py) ----------------


def ngrams(ids: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def repeated_ngram_rate(ids: list[int], n: int = LOOP_N) -> float:
    """Share of the ``n``-grams that repeat an earlier one in the same sequence (0: none; a sequence
    that is one token over and over: (k - n) / (k - n + 1))."""
    grams, seen, repeats = ngrams(ids, n), set(), 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams) if grams else 0.0


def distinct_n(ids: list[int], n: int) -> float:
    """Distinct ``n``-grams over all ``n``-grams (Li et al. 2016): 1.0 when none repeats."""
    grams = ngrams(ids, n)
    return len(set(grams)) / len(grams) if grams else 1.0


def first_divergence(ids: list[int], reference: list[int]) -> int:
    """Tokens the two continuations share before they first differ (both whole: their common length)."""
    common = min(len(ids), len(reference))
    return next((i for i in range(common) if ids[i] != reference[i]), common)


# --- generation -----------------------------------------------------------------------------------


def greedy_continuations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    new_tokens: int = NEW_TOKENS,
    batch_size: int = 8,
    progress: bool = True,
) -> list[list[int]]:
    """Plain greedy decoding (no repetition penalty, no n-gram blocking: those hide loops)."""
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    return continuations(model, tokenizer, prompt_ids, new_tokens, batch_size, progress, do_sample=False)


def continuations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    new_tokens: int,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "greedy continuations",
    **decoding: object,
) -> list[list[int]]:
    """``model.generate`` of each prompt, batched with left padding; ``decoding``: its sampling
    arguments. Each continuation ends at the first end-of-sequence token, which it keeps."""
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    out_ids = []
    batches = [prompt_ids[i : i + batch_size] for i in range(0, len(prompt_ids), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        ids, mask = _left_padded(batch, pad)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=new_tokens,
                pad_token_id=pad,
                eos_token_id=sorted(eos),
                **decoding,
            )
        out_ids += [_until_eos(row.tolist(), eos) for row in out[:, ids.shape[1] :]]
    return out_ids


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts padded on the left (generation appends on the right), with their attention mask; by
    hand, since many tokenizers have no pad token and the caller's tokenizer is not ours to change."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _eos_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return {i for i in [*configured, tokenizer.eos_token_id] if i is not None}


def _until_eos(ids: list[int], eos: set[int]) -> list[int]:
    end = next((i for i, token in enumerate(ids) if token in eos), None)
    return ids if end is None else ids[: end + 1]


def reference_logprob(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, reference: list[int]) -> float:
    """Mean log-probability, under ``model``, of the reference model's greedy tokens after ``prompt``."""
    device = next(model.parameters()).device
    prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"][0].tolist()
    ids = torch.tensor([prompt_ids + reference], device=device)
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1 : -1].float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, ids[0, len(prompt_ids) :, None])
    return logprobs.mean().item()


# --- the measure ----------------------------------------------------------------------------------


def generation_quality(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str] | None = None,
    new_tokens: int = NEW_TOKENS,
    reference: dict | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """The measure over ``prompts`` (default: the shipped set); ``reference``: another model's
    ``generation_quality`` on the same prompts (the dense parent's), for the agreement columns."""
    prompts = prompts or load_prompts()
    continuations = greedy_continuations(model, tokenizer, prompts, new_tokens, batch_size, progress)
    rows = [
        {
            "prompt": prompt,
            "ids": ids,
            "text": tokenizer.decode(ids, skip_special_tokens=True),
            "repeated_4gram": repeated_ngram_rate(ids, LOOP_N),
        }
        for prompt, ids in zip(prompts, continuations, strict=True)
    ]
    result = {"prompts": len(rows), "new_tokens": new_tokens, **summary(rows), "per_prompt": rows}
    if reference is not None:
        result.update(agreement(model, tokenizer, rows, reference))
    return result


def summary(rows: list[dict]) -> dict:
    """Means over prompts (each continuation counts once, however long) and the looping count."""
    ids = [r["ids"] for r in rows]
    rates = [r["repeated_4gram"] for r in rows]
    return {
        "repeated_4gram": _mean(rates),
        "repeated_4gram_stderr": _stderr(rates),
        "distinct_1": _mean([distinct_n(i, 1) for i in ids]),
        "distinct_2": _mean([distinct_n(i, 2) for i in ids]),
        "looping": sum(rate > LOOP_THRESHOLD for rate in rates),
        "looping_prompts": [r["prompt"] for r in rows if r["repeated_4gram"] > LOOP_THRESHOLD],
    }


def agreement(model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict], reference: dict) -> dict:
    """First divergence from, and log-probability of, the reference's continuations, prompt by prompt."""
    theirs = {r["prompt"]: r["ids"] for r in reference.get("per_prompt") or []}
    missing = [r["prompt"] for r in rows if r["prompt"] not in theirs]
    if missing:
        raise SaapError(f"the reference generations lack {len(missing)} of the prompts (first: {missing[0]!r})")
    for row in rows:
        ref = theirs[row["prompt"]]
        row["first_divergence"] = first_divergence(row["ids"], ref)
        row["reference_logprob"] = reference_logprob(model, tokenizer, row["prompt"], ref) if ref else 0.0
    return {
        "first_divergence": _mean([r["first_divergence"] for r in rows]),
        "reference_logprob": _mean([r["reference_logprob"] for r in rows]),
        "reference_logprob_stderr": _stderr([r["reference_logprob"] for r in rows]),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _stderr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def load_reference(path: str | Path) -> dict:
    """The ``generation_quality`` part of a ``saap eval --generate --out`` JSON (the dense model's)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SaapError(f"cannot read reference generations {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("generation_quality"), dict):
        raise SaapError(f"{path} has no generation_quality: write it with saap eval --generate --out {path}")
    return data["generation_quality"]

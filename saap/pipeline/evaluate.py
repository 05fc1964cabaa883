"""Perplexity on WikiText-2 / PTB the way LLM-Pruner reports it: the joined text tokenized once,
cut into non-overlapping windows of ``seq_len`` tokens, mean next-token loss over all windows."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from saap.pipeline.data import PERPLEXITY_SETS, bos_prefix, perplexity_text, resolve_data_file
from saap.pipeline.generation_quality import LOOP_THRESHOLD, NEW_TOKENS, REPORT_PROMPTS
from saap.pipeline.options import option
from saap.runtime.errors import SaapError


@dataclass
class EvalSettings:
    """What ``saap eval`` scores (its flags and the run config's ``eval:`` section come from these)."""

    ppl: list[str] = option(help="perplexity sets: wikitext2, ptb, or text files", factory=list)
    seq_len: str = option("128", "perplexity window in tokens (LLM-Pruner: 128), or 'max'")
    ppl_windows: int | None = option(None, "evaluate only the first N perplexity windows")
    tasks: list[str] = option(help="zero-shot tasks (lm-eval), or 'all' for the 7-task suite", factory=list)
    limit: int | None = option(None, "first N documents of every zero-shot task")
    per_document: bool = option(
        False, "also store each zero-shot document's label and predicted choice (for paired comparisons)"
    )
    data_dir: Path | None = option(
        None, "data directory (its zeroshot/ and ppl/; default: $SAAP_DATA_DIR, then saap's own copy)"
    )
    generate: bool = option(
        False, "greedy continuations of a fixed prompt set: repeated 4-grams (loops), distinct-n, samples"
    )
    generate_tokens: int = option(NEW_TOKENS, "tokens each --generate continuation runs to")
    generate_reference: Path | None = option(
        None, "the dense model's saap eval --generate JSON: adds agreement with its continuations"
    )
    batch_size: int = option(8, "sequences per forward pass")


def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: str,
    seq_len: int = 128,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` on a named set (``wikitext2``, ``ptb``) or a text file."""
    device = next(model.parameters()).device

    def batch_nll(batch: torch.Tensor) -> float:
        batch = batch.to(device)
        with torch.inference_mode():
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
        ).item()

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return _windowed_perplexity(
        dataset, seq_len, limit, tokenize, batch_nll, batch_size, progress, bos_prefix(tokenizer)
    )


def engine_perplexity(
    engine, dataset: str, seq_len: int = 128, limit: int | None = None, progress: bool = True
) -> dict:
    """``perplexity`` of a deployed artifact through its engine (llama.cpp, ONNX Runtime): same text, same
    windows, each prefilled on its own, the engine's own tokenizer without the tokens it adds around a text."""
    added = len(engine.tokenize(""))  # BOS (or nothing): what the engine puts around any text

    def window_nll(batch: torch.Tensor) -> float:  # a batch of one window: an engine holds one sequence
        logits = torch.from_numpy(engine.prefill(batch[0].tolist())[:-1]).double()
        return nn.functional.cross_entropy(logits, batch[0, 1:], reduction="sum").item()

    def tokenize(text: str) -> list[int]:
        return engine.tokenize(text)[added:]

    prefix = engine.tokenize("")[:added]
    return _windowed_perplexity(dataset, seq_len, limit, tokenize, window_nll, 1, progress, prefix)


def _windowed_perplexity(
    dataset: str,
    seq_len: int,
    limit: int | None,
    tokenize: Callable[[str], list[int]],
    batch_nll: Callable[[torch.Tensor], float],
    batch_size: int,
    progress: bool,
    prefix: list[int] | None = None,
) -> dict:
    """LLM-Pruner's protocol: the text tokenized once, cut into non-overlapping windows of ``seq_len``,
    ``exp`` of the mean next-token loss (``batch_nll`` sums it over a batch of windows).

    ``prefix``: the BOS a model's tokenizer puts before every text (``data.bos_prefix``) starts every
    window, followed by ``seq_len - 1`` tokens of text, all of them scored: the same count as without
    it. Gemma 3 270M scores 64 WikiText-2 windows at 482 without it and 52 with it; a tokenizer that
    adds none (SmolLM2) gets the windows it always had."""
    path = resolve_data_file(dataset, PERPLEXITY_SETS)
    text = perplexity_text(path, dataset if dataset in PERPLEXITY_SETS else None)
    ids, prefix = torch.tensor(tokenize(text)), torch.tensor(prefix or [], dtype=torch.long)
    chunk = seq_len - len(prefix)
    num_windows = len(ids) // chunk if limit is None else min(len(ids) // chunk, limit)
    if num_windows == 0:
        raise SaapError(f"'{path}' has {len(ids)} tokens: fewer than one window of {seq_len}")
    windows = ids[: num_windows * chunk].view(num_windows, chunk)
    windows = torch.cat([prefix.expand(num_windows, len(prefix)), windows], dim=1)
    total_nll = 0.0
    for batch in tqdm(windows.split(batch_size), desc=f"perplexity {dataset}", unit="batch", disable=not progress):
        total_nll += batch_nll(batch)
    tokens = num_windows * (seq_len - 1)
    return {
        "dataset": dataset,
        "path": str(path),
        "seq_len": seq_len,
        "windows": num_windows,
        "tokens_scored": tokens,
        "perplexity": math.exp(total_nll / tokens),
    }


def engine_generations(engine, max_new_tokens: int = NEW_TOKENS) -> list[dict]:
    """The report's prompts through an engine: greedy, stopping at end of sequence as ``model.generate`` does."""
    samples = []
    for prompt in REPORT_PROMPTS:
        completion = engine.detokenize(engine.generate(prompt, max_new_tokens))
        samples.append({"prompt": prompt, "completion": completion})
    return samples


def results_markdown(results: dict) -> str:
    """One markdown table per part of ``saap eval``'s JSON."""
    params = f" ({results['params']:,} parameters)" if results.get("params") else ""
    lines = [f"# Evaluation of `{results['model']}`{params}", ""]
    if results.get("perplexity"):
        lines += ["| perplexity set | windows × tokens | perplexity |", "|---|---|---|"]
        for name, r in results["perplexity"].items():
            lines.append(f"| {name} | {r['windows']} × {r['seq_len']} | {r['perplexity']:.2f} |")
        lines.append("")
    if results.get("zeroshot"):
        z = results["zeroshot"]
        lines += ["| task | metric | documents | score ± stderr |", "|---|---|---|---|"]
        for task, r in z["tasks"].items():
            lines.append(f"| {task} | {r['metric']} | {r['documents']} | {r['value']:.4f} ± {r['stderr'] or 0:.4f} |")
        lines += [f"| **average** | | | **{z['average']:.4f} ± {z['average_stderr']:.4f}** |", ""]
    if results.get("generation_quality"):
        lines += generation_quality_markdown(results["generation_quality"])
    if results.get("generations"):
        lines += ["| prompt | greedy completion |", "|---|---|"]
        for g in results["generations"]:
            completion = g["completion"].replace("\n", " ").replace("|", "\\|")
            lines.append(f"| {g['prompt']} | {completion} |")
        lines.append("")
    return "\n".join(lines)


def generation_quality_markdown(quality: dict) -> list[str]:
    """``saap eval --generate``'s measure as one table (agreement rows only against a reference)."""
    rows = [
        ("repeated 4-grams (mean share)", f"{quality['repeated_4gram']:.3f} ± {quality['repeated_4gram_stderr']:.3f}"),
        (f"prompts that loop (> {LOOP_THRESHOLD:.0%} repeated)", f"{quality['looping']} of {quality['prompts']}"),
        ("distinct-1 / distinct-2", f"{quality['distinct_1']:.3f} / {quality['distinct_2']:.3f}"),
    ]
    if "first_divergence" in quality:
        rows += [
            ("tokens before first divergence from the reference", f"{quality['first_divergence']:.1f}"),
            (
                "reference tokens' mean log-probability",
                f"{quality['reference_logprob']:.3f} ± {quality['reference_logprob_stderr']:.3f}",
            ),
        ]
    title = f"| greedy continuations ({quality['prompts']} prompts, {quality['new_tokens']} tokens) | |"
    return [title, "|---|---|", *(f"| {name} | {value} |" for name, value in rows), ""]

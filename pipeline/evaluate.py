"""Perplexity on WikiText-2 / PTB the way LLM-Pruner reports it: the joined text tokenized once,
cut into non-overlapping windows of ``seq_len`` tokens, mean next-token loss over all windows."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from pipeline.data import PERPLEXITY_SETS, perplexity_text, resolve_data_file


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
    path = resolve_data_file(dataset, PERPLEXITY_SETS)
    text = perplexity_text(path, dataset if dataset in PERPLEXITY_SETS else None)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    num_windows = len(ids) // seq_len
    if limit is not None:
        num_windows = min(num_windows, limit)
    windows = ids[: num_windows * seq_len].view(num_windows, seq_len)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for batch in tqdm(windows.split(batch_size), desc=f"perplexity {dataset}", unit="batch", disable=not progress):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            nll = nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += nll.item()
            total_tokens += batch[:, 1:].numel()
    return {
        "dataset": dataset,
        "path": str(path),
        "seq_len": seq_len,
        "windows": num_windows,
        "tokens_scored": total_tokens,
        "perplexity": math.exp(total_nll / total_tokens),
    }

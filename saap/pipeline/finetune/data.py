"""Training data: reading Alpaca / plain-text files, tokenizing, batching, the held-out loss."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from saap.pipeline.data import bos_prefix, resolve_data_files
from saap.runtime.errors import SaapError

IGNORE = -100  # label of tokens left out of the loss (prompt and padding)

# The Stanford Alpaca prompt template (with and without an input field).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def read_records(path: Path) -> tuple[str, list[Any]]:
    """``("alpaca", records)``, ``("text", documents)`` or ``("tokens", id lists)`` (``saap sample``'s
    cache) from a .json/.jsonl/.txt file; bad input
    raises a one-line SaapError. Runs before the model load, so a broken file fails fast."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SaapError(f"cannot read data file '{path}': {e}") from None
    if not raw.strip():
        raise SaapError(f"data file '{path}' is empty")
    if path.suffix not in (".json", ".jsonl"):
        return "text", [raw]
    try:
        if path.suffix == ".jsonl":
            records = []
            for n, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SaapError(f"data file '{path}' line {n} is not valid JSON: {e}") from None
        else:
            records = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SaapError(f"data file '{path}' is not valid JSON: {e}") from None
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list) or not records:
        raise SaapError(f"data file '{path}' holds no records (expected a list of Alpaca records)")
    if not all(isinstance(r, dict) for r in records):
        raise SaapError(f"data file '{path}': every record must be a JSON object")
    if all("instruction" not in r and "output" not in r and isinstance(r.get("text"), str) for r in records):
        return "text", [r["text"] for r in records]
    if all("input_ids" in r for r in records):  # saap sample's cache: the teacher's own text, as token ids
        return "tokens", [_token_ids(path, n, r["input_ids"]) for n, r in enumerate(records)]
    for n, record in enumerate(records):
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                what = "has no" if key not in record else "has a non-string"
                raise SaapError(
                    f"data file '{path}': record {n} {what} '{key}' (Alpaca format: instruction, input, output)"
                )
        if not isinstance(record.get("input", ""), str):
            raise SaapError(f"data file '{path}': record {n} has a non-string 'input'")
    return "alpaca", records


def _token_ids(path: Path, n: int, ids: Any) -> list[int]:
    if not isinstance(ids, list) or len(ids) < 2 or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise SaapError(f"data file '{path}': record {n}'s 'input_ids' is not a list of two or more token ids")
    return ids


def read_data(data: str | list[str]) -> tuple[list[Path], str, list[Any]]:
    """(paths, kind, records) of one or more data files of one kind (all Alpaca, all text or all token ids)."""
    paths = resolve_data_files(data)
    if not paths:
        raise SaapError("no data file given")
    kinds, records = set(), []
    for path in paths:
        kind, these = read_records(path)
        kinds.add(kind)
        records += these
    if len(kinds) > 1:
        raise SaapError("the data files mix Alpaca records and plain text: give files of one kind")
    return paths, kinds.pop(), records


def alpaca_prompt(record: dict[str, str]) -> str:
    template = ALPACA_PROMPT if record.get("input", "").strip() else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def tokenize_examples(
    kind: str, records: list[Any], tokenizer: PreTrainedTokenizerBase, seq_len: int
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """Token ids and labels; prompt tokens of Alpaca records get label -100 (not in the loss).

    Alpaca: BOS (if the tokenizer adds one) + prompt + output + EOS, cut at ``seq_len``; an example
    with no output token left is dropped. Plain text: consecutive ``seq_len``-token windows. Token ids
    (``saap sample``): one example a sequence, cut at ``seq_len``.
    """
    stats = {"truncated": 0, "dropped": 0}
    examples = []
    if kind == "tokens":
        return _token_examples(records, tokenizer, seq_len, stats), stats
    if kind == "text":
        ids = tokenizer("\n\n".join(records), add_special_tokens=False)["input_ids"]
        bos = bos_prefix(tokenizer)  # Gemma's windows start with BOS, as every sequence it saw did
        for start in range(0, len(ids) - 1, seq_len - len(bos)):
            window = bos + ids[start : start + seq_len - len(bos)]
            if len(window) >= 2 + len(bos):
                examples.append({"input_ids": window, "labels": list(window)})
        return examples, stats
    bos = bos_prefix(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for record in records:
        # Tokenized apart so the prompt/response boundary (and so the mask) is exact.
        prompt = bos + tokenizer(alpaca_prompt(record), add_special_tokens=False)["input_ids"]
        answer = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + eos
        ids, labels = prompt + answer, [IGNORE] * len(prompt) + answer
        if len(ids) > seq_len:
            stats["truncated"] += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
        if all(label == IGNORE for label in labels[1:]):
            stats["dropped"] += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    return examples, stats


def _token_examples(
    records: list[list[int]], tokenizer: PreTrainedTokenizerBase, seq_len: int, stats: dict[str, int]
) -> list[dict[str, list[int]]]:
    """One example per sampled sequence, every token in the loss (the teacher wrote them all)."""
    vocab = len(tokenizer)
    if max(max(ids) for ids in records) >= vocab:
        raise SaapError(
            f"the token ids in the data are not this model's (its vocabulary has {vocab} tokens): "
            "sample them from a model with the same tokenizer"
        )
    stats["truncated"] = sum(len(ids) > seq_len for ids in records)
    return [{"input_ids": ids[:seq_len], "labels": ids[:seq_len]} for ids in records]


class Collator:
    """Right-pads a batch to its longest example; padding is masked out and not in the loss."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, e in enumerate(batch):
            n = len(e["input_ids"])
            ids[row, :n] = torch.tensor(e["input_ids"])
            labels[row, :n] = torch.tensor(e["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def split_examples(examples: list, val_size: int, seed: int) -> tuple[list, list]:
    """Seeded held-out slice: ``val_size`` examples, at most a tenth of the data."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(val_size, len(examples) // 10)
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    return train, val


@torch.no_grad()
def evaluation_loss(model: torch.nn.Module, examples: list, collate: Collator, batch_size: int) -> float | None:
    """Mean next-token loss over every labelled token of ``examples`` (None when there are none)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        ).item()
        count += int((labels != IGNORE).sum())
    model.train(was_training)
    return total / count if count else None

"""Text sources for calibration and evaluation: saap's own copy of the data sets, a user's data
directory, or any file a user passes.

Lookup order for a relative data path (``calibration/c4_sample.jsonl``) or a named set (``wikitext2``):
``--data-dir`` / ``$SAAP_DATA_DIR`` first, then the copy that ships inside the package
(``saap/data``: see its README.md for each file's source, licence and checksum). A set whose terms do
not allow redistribution (Penn Treebank) is not shipped: a run that asks for it skips it with one line
that says where to put the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from saap.runtime.errors import SaapError

DATA_DIR_ENV = "SAAP_DATA_DIR"  # set by --data-dir too, so that a run's stages inherit it
PACKAGED_DATA = Path(__file__).resolve().parents[1] / "data"
# The calibration texts of the method presets (saap/pipeline/prune/methods.py): Gutenberg books, the stand-in
# for LLM-Pruner's BookCorpus, for the baselines; C4 web text, as Wanda and SparseGPT calibrate, for saap.
BOOKS_CALIBRATION = "calibration/simplebooks92_valid.txt"
WEB_CALIBRATION = "calibration/c4_sample.jsonl"

# name -> file under the data dir: the perplexity protocols LLM-Pruner uses.
PERPLEXITY_SETS = {
    "wikitext2": "ppl/wikitext2/wiki.test.raw",
    "ptb": "ppl/ptb/ptb.valid.txt",
}
# Named sets saap may not redistribute, with why: asked for and absent, they are skipped, not an error.
NOT_SHIPPED = {
    "ptb": "Penn Treebank is LDC text for research use only, so saap does not ship it",
}


def data_dirs() -> list[Path]:
    """Where data files are looked up, in order: ``$SAAP_DATA_DIR`` (``--data-dir``), then saap's own copy."""
    user = os.environ.get(DATA_DIR_ENV)
    return ([Path(user).expanduser()] if user else []) + [PACKAGED_DATA]


def find_data_file(relative: str) -> Path | None:
    """``relative`` (``zeroshot/boolq/dev.jsonl``) in the first data directory that has it."""
    return next((d / relative for d in data_dirs() if (d / relative).is_file()), None)


def resolve_data_file(spec: str, named: dict[str, str] | None = None) -> Path:
    """A named data set (``wikitext2``) or a path; relative paths also tried under the data dirs."""
    if named and spec in named:
        path = find_data_file(named[spec]) or data_dirs()[0] / named[spec]  # the error names the first
    else:
        path = Path(spec).expanduser()
        if not path.exists() and not path.is_absolute():
            path = find_data_file(spec) or path
    if not path.is_file():
        choices = f" (or one of: {', '.join(named)})" if named else ""
        raise SaapError(f"data file '{spec}' not found at {path}{choices}")
    return path


def missing_unshipped(specs: list[str]) -> dict[str, str]:
    """The named perplexity sets in ``specs`` that saap does not ship and the user has not added:
    name -> why it is skipped and how to add it, one line."""
    missing = {}
    for spec in specs:
        if spec in NOT_SHIPPED and find_data_file(PERPLEXITY_SETS[spec]) is None:
            where = Path("$SAAP_DATA_DIR") / PERPLEXITY_SETS[spec]
            missing[spec] = (
                f"{NOT_SHIPPED[spec]}; to add it, put the file at {where} "
                f"(or pass --data-dir DIR with it at DIR/{PERPLEXITY_SETS[spec]})"
            )
    return missing


def resolve_data_files(data: str | list[str]) -> list[Path]:
    """``resolve_data_file`` of one spec or of each of a list (``saap finetune --data A B``)."""
    return [resolve_data_file(spec) for spec in ([data] if isinstance(data, str) else data)]


def read_documents(path: Path) -> list[str]:
    """Documents of a .txt (one document), .jsonl (field ``text``) or .json (list of records) file."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SaapError(f"cannot read '{path}': {e}") from None
    if path.suffix not in (".jsonl", ".json"):
        documents = [raw]
    else:
        try:
            records = (
                [json.loads(line) for line in raw.splitlines() if line.strip()]
                if path.suffix == ".jsonl"
                else json.loads(raw)
            )
        except json.JSONDecodeError as e:
            raise SaapError(f"'{path}' is not valid JSON: {e}") from None
        documents = [_record_text(r) for r in (records if isinstance(records, list) else [records])]
    documents = [d for d in documents if d and d.strip()]
    if not documents:
        raise SaapError(f"'{path}' contains no text")
    return documents


def _record_text(record) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return record["text"]
        return "\n".join(v for v in record.values() if isinstance(v, str))
    return ""


def perplexity_text(path: Path, name: str | None) -> str:
    """The evaluation text as LLM-Pruner builds it from the HF data sets: rows joined with "\\n\\n"."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if name == "wikitext2":  # HF rows keep their newline; blank rows are "" (as the HF builder yields them)
        rows = [line if line.strip() else "" for line in lines]
    else:  # PTB sentences (and plain text files) without surrounding whitespace
        rows = [line.strip() for line in lines]
    return "\n\n".join(rows)


def bos_prefix(tokenizer) -> list[int]:
    """``[BOS]`` where the tokenizer puts one before every text (Gemma: the model was trained with it on
    every sequence, and without it WikiText-2 perplexity is ~9x), else ``[]`` (SmolLM2). Every window
    saap cuts from a text (calibration, perplexity, distillation) starts with it."""
    probe = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and probe and probe[0] == bos else []


def calibration_batches(
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    num_samples: int,
    seq_len: int,
    batch_size: int,
    seed: int,
) -> list[torch.Tensor]:
    """``num_samples`` random windows of ``seq_len`` tokens from the file, grouped into batches. Where the
    tokenizer puts a BOS before every text (Gemma), each window starts with it, as the model always saw."""
    documents = read_documents(path)
    ids = torch.tensor(tokenizer("\n\n".join(documents), add_special_tokens=False)["input_ids"])
    prefix = bos_prefix(tokenizer)
    chunk = seq_len - len(prefix)
    if len(ids) < chunk + 1:
        raise SaapError(f"calibration file '{path}' has {len(ids)} tokens, fewer than --seq-len {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - chunk, (num_samples,), generator=generator)
    windows = torch.stack([torch.tensor(prefix + ids[s : s + chunk].tolist()) for s in starts.tolist()])
    return list(windows.split(batch_size))

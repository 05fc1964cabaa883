"""Text sources for calibration and evaluation: the shared data sets or any file a user passes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from runtime.errors import SaapError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The calibration texts of the method presets (pipeline/prune/methods.py): Gutenberg books, the stand-in
# for LLM-Pruner's BookCorpus, for the baselines; C4 web text, as Wanda and SparseGPT calibrate, for saap.
BOOKS_CALIBRATION = "calibration/simplebooks92_valid.txt"
WEB_CALIBRATION = "calibration/c4_sample.jsonl"

# name -> (file under the data dir, how its rows are joined): the perplexity protocols LLM-Pruner uses.
PERPLEXITY_SETS = {
    "wikitext2": "ppl/wikitext2/wiki.test.raw",
    "ptb": "ppl/ptb/ptb.valid.txt",
}


def data_dir() -> Path:
    """``$SAAP_DATA_DIR``, else ``../shared/data`` beside the project checkout or the working dir."""
    if os.environ.get("SAAP_DATA_DIR"):
        return Path(os.environ["SAAP_DATA_DIR"])
    for base in (PROJECT_ROOT, Path.cwd()):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return PROJECT_ROOT.parent / "shared" / "data"


def resolve_data_file(spec: str, named: dict[str, str] | None = None) -> Path:
    """A named data set (``wikitext2``) or a path; relative paths also tried under the data dir."""
    if named and spec in named:
        path = data_dir() / named[spec]
    else:
        path = Path(spec).expanduser()
        if not path.exists() and (data_dir() / spec).exists():
            path = data_dir() / spec
    if not path.is_file():
        choices = f" (or one of: {', '.join(named)})" if named else ""
        raise SaapError(f"data file '{spec}' not found at {path}{choices}")
    return path


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


def calibration_batches(
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    num_samples: int,
    seq_len: int,
    batch_size: int,
    seed: int,
) -> list[torch.Tensor]:
    """``num_samples`` random windows of ``seq_len`` tokens from the file, grouped into batches."""
    documents = read_documents(path)
    ids = torch.tensor(tokenizer("\n\n".join(documents), add_special_tokens=False)["input_ids"])
    if len(ids) < seq_len + 1:
        raise SaapError(f"calibration file '{path}' has {len(ids)} tokens, fewer than --seq-len {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (num_samples,), generator=generator)
    windows = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
    return list(windows.split(batch_size))

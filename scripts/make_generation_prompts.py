"""Write ``saap/data/prompts/generation.jsonl``: the fixed prompt set of ``saap eval --generate``.

Every prompt is the first eight words of a sentence of ``calibration/wikipedia_articles.txt``, the
held-out development text (never a test split, never a fine-tuning text): sentences after each
article's first, round-robin over the 30 articles until there are 60. The four prompts the run report
shows come first. Run from the repository root; ``tests/pipeline/test_generation_quality.py`` checks
that the committed file is what this script writes.
"""

from __future__ import annotations

import json
import re
import sys
from itertools import zip_longest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saap.pipeline.data import PACKAGED_DATA  # noqa: E402
from saap.pipeline.generation_quality import PACKAGED_PROMPTS, REPORT_PROMPTS  # noqa: E402

SOURCE = PACKAGED_DATA / "calibration" / "wikipedia_articles.txt"
COUNT, WORDS = 60, 8
# The dump joins some sentences and section titles with no space ("socialism.Humans", "HistoryIn").
SENTENCE_END = re.compile(r"(?<=[a-z0-9][.!?])\s*(?=[A-Z])")
PLAIN = re.compile(r"[A-Za-z0-9 ,'\-]+")


def usable(words: list[str]) -> bool:
    """Whole plain words, no section title glued on, no word left doubled by the dump's removed numbers."""
    head = " ".join(words[:WORDS])
    return (
        len(words) >= 2 * WORDS
        and PLAIN.fullmatch(head) is not None
        and not re.search(r"[a-z][A-Z]", head)
        and not re.search(r"\b(\w+) \1\b", head)
    )


def candidates(article: str) -> list[str]:
    sentences = [s.split() for s in SENTENCE_END.split(article)[1:]]
    return [" ".join(words[:WORDS]) for words in sentences if usable(words)]


def main() -> None:
    articles = SOURCE.read_text(encoding="utf-8").splitlines()
    ordered = [p for row in zip_longest(*map(candidates, articles)) for p in row if p]
    prompts = list(REPORT_PROMPTS) + ordered[:COUNT]
    lines = [json.dumps({"prompt": p, "source": "report" if p in REPORT_PROMPTS else SOURCE.name}) for p in prompts]
    PACKAGED_PROMPTS.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(prompts)} prompts -> {PACKAGED_PROMPTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

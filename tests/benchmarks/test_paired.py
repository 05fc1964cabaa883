"""The paired comparison's statistics and table, on hand-made per-document predictions."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import paired  # noqa: E402


def test_paired_difference_cancels_documents_both_models_get_alike():
    assert paired.paired_difference([1, 0, 1, 0], [1, 0, 1, 0]) == (0.0, 0.0)
    mean, se = paired.paired_difference([1, 1, 0, 0], [0, 1, 0, 0])  # one document differs: d = 1, 0, 0, 0
    assert mean == 0.25 and se == pytest.approx(math.sqrt(0.25 / 4))
    assert paired.average_difference([(0.1, 0.03), (0.0, 0.04)]) == pytest.approx((0.05, 0.025))


def _cell(method, ratio, predictions, labels, limit=4):
    tasks = {
        task: {"metric": "acc", "value": sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels),
               "stderr": 0.1, "documents": len(labels), "labels": labels, "predictions": predictions}
        for task in ("boolq", "arc_easy")
    }  # fmt: skip
    average = sum(t["value"] for t in tasks.values()) / len(tasks)
    settings = {"limit": limit, "device": "cpu"}
    return {"method": method, "ratio": ratio, "settings": settings, "tasks": tasks, "average": average,
            "average_stderr": 0.07}  # fmt: skip


def test_summary_gives_leads_agreement_and_label_bias(tmp_path):
    labels = [0, 1, 0, 1]
    dense = _cell("dense", None, [0, 1, 1, 1], labels)
    saap = _cell("saap", 0.2, [0, 1, 1, 0], labels)  # keeps 3 of 4 dense predictions, right on 2
    yes = _cell("shortgpt", 0.2, [1, 1, 1, 1], labels)  # "yes" everywhere: right on 2, agrees on 3
    (tmp_path / "saap-0.2.json").write_text(json.dumps({"settings": {"limit": 4, "device": "cpu"},
                                                        "zeroshot": {"tasks": saap["tasks"]}}))  # fmt: skip
    summary = paired.summarise([dense, saap, yes], tmp_path)
    rows = {m["model"]: m for m in summary["models"]}
    assert rows["saap 0.2"]["reproduces_quality_cell"] is True
    assert rows["shortgpt 0.2"]["reproduces_quality_cell"] is None  # no stored cell to check against
    assert rows["shortgpt 0.2"]["second_choice_share"] == {"boolq": 1.0}
    assert rows["saap 0.2"]["agreement_with_dense"]["boolq"] == 0.75
    assert summary["label_second_choice_share"] == {"boolq": 0.5}
    (lead,) = summary["leads"]
    assert (lead["of"], lead["over"]) == ("saap", "shortgpt") and lead["average"][0] == 0.0
    table = paired.markdown({"settings": {"model": "m", "limit": 4, "device": "cpu", "eval_batch_size": 8},
                             "regenerate": "python benchmarks/paired.py", "summary": summary})  # fmt: skip
    widths = {line.count("|") for line in table.splitlines() if line.startswith("| ") and "lead" not in line}
    assert "| saap − shortgpt (0.2) | +0.000 ± 0.408 | +0.000 ± 0.408 | **+0.0000 ± 0.2887** |" in table
    assert len({w for w in widths if w > 5}) == 1  # the first table's rows, labels row included, line up

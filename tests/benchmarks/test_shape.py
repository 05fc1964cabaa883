"""benchmarks/shape.py's table and its default-shape choice, on hand-made cells."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import shape  # noqa: E402


def _eval(correct: list[int], dev: bool, wikitext2: float) -> dict:
    task = {"metric": "acc", "value": sum(correct) / len(correct), "stderr": 0.1, "labels": [1] * len(correct),
            "predictions": correct}  # fmt: skip
    tasks = {t: dict(task) for t in shape.TASKS}
    if dev:
        tasks |= {t: dict(task) for t in shape.DEV_TASKS}
    return {"params": 100, "wikitext2": wikitext2, "tasks": tasks}


def _cell(correct: list[int], loss: float) -> dict:
    return {"prune": {"layers": 27}, "pruned": _eval(correct, False, 90.0),
            "finetune": {"eval_loss": {"start": 5.0, "after": loss}},
            "recovered": _eval(correct, True, 70.0)}  # fmt: skip


def test_the_default_is_the_shape_with_the_lower_held_out_loss_and_leads_are_paired():
    data = {
        "regenerate": "python benchmarks/shape.py", "recovery": "saap finetune ...",
        "settings": {"limit": 4, "ppl_windows": 512},
        "ratios": {"0.2": {"per-layer": _cell([1, 1, 0, 0], 3.1), "uniform": _cell([1, 1, 1, 0], 3.0)}},
    }  # fmt: skip
    data["default"] = shape.choose_default(data)
    assert "**uniform**" in data["default"]
    assert data["dev_evidence"]["0.2"]["lower_loss"] == "uniform"
    table = shape.markdown(data)
    assert (
        "| 0.2 | uniform | 27 | 100 | recovered | 70.00 | 0.7500 ± 0.0378 | +0.2500 ± 0.0945 | 0.7500 | 3.0000 |"
        in table
    )
    assert "| 0.2 | per-layer | 27 | 100 | pruned | 90.00 | 0.5000 ± 0.0378 | – | – | – |" in table


def test_no_default_until_every_shape_is_recovered():
    cells = {"per-layer": _cell([1, 0], 3.1), "uniform": {"prune": {"layers": 27}}}
    assert shape.choose_default({"ratios": {"0.2": cells}}) is None


def test_generation_rows_show_agreement_only_against_the_dense_reference():
    common = {"repeated_4gram": 0.5, "repeated_4gram_stderr": 0.05, "looping": 30, "prompts": 64, "distinct_2": 0.6}
    data = {"generation": {"dense": dict(common, looping=3),
                           "uniform-0.2": dict(common, first_divergence=7.25, reference_logprob=-2.5)}}  # fmt: skip
    rows = shape.generation_rows(data)
    assert rows[0] == "| dense | 0.500 ± 0.050 | 3 of 64 | 0.600 | – | – |"
    assert rows[1] == "| uniform-0.2 | 0.500 ± 0.050 | 30 of 64 | 0.600 | 7.2 | -2.500 |"

import json

import pytest

from saap.pipeline.data import PACKAGED_DATA
from saap.pipeline.zeroshot import TASKS, evaluate_zeroshot, prepare_tasks
from saap.runtime.errors import SaapError
from tests.conftest import make_model

ZEROSHOT = PACKAGED_DATA / "zeroshot"  # saap's own copy: a test never skips for want of data
# Full document counts of the local copies, and the gold index of each task's first document.
EXPECTED = {
    "boolq": (3270, 0),
    "piqa": (1838, 0),
    "hellaswag": (10042, 3),
    "winogrande": (1267, 1),
    "arc_easy": (2376, 0),
    "arc_challenge": (1172, 2),
    "openbookqa": (500, 1),
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_tasks(list(TASKS), ZEROSHOT, tmp_path_factory.mktemp("tasks"))


def test_task_yamls_load_in_lm_eval_with_every_document(prepared):
    from lm_eval.tasks import TaskManager, get_task_dict

    tasks = get_task_dict(list(TASKS), TaskManager(include_path=str(prepared), include_defaults=False))
    for name, (count, gold) in EXPECTED.items():
        task = tasks[name]
        docs = list(task.test_docs())
        assert len(docs) == count, name
        assert task.doc_to_target(docs[0]) == gold or name == "winogrande", name
        assert len(task.doc_to_choice(docs[0])) >= 2


def test_prompts_mirror_lm_evals_own_tasks(prepared):
    from lm_eval.tasks import TaskManager, get_task_dict

    tasks = get_task_dict(
        ["boolq", "winogrande", "arc_easy"], TaskManager(include_path=str(prepared), include_defaults=False)
    )
    boolq = next(iter(tasks["boolq"].test_docs()))
    assert (
        tasks["boolq"]
        .doc_to_text(boolq)
        .endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    )
    assert tasks["boolq"].doc_to_choice(boolq) == ["no", "yes"]
    wino = tasks["winogrande"]
    doc = next(iter(wino.test_docs()))
    assert wino.doc_to_text(doc) == 1  # gold index: "answer": "2"
    assert wino.doc_to_choice(doc) == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert wino.doc_to_target(doc) == "always got the easier cases."
    arc = next(iter(tasks["arc_easy"].test_docs()))
    assert tasks["arc_easy"].doc_to_text(arc).startswith("Question: Which statement best explains")


def _tiny_data(root):
    """A handful of documents per task in the official formats."""
    (root / "boolq").mkdir(parents=True)
    (root / "boolq" / "dev.jsonl").write_text(
        "".join(
            json.dumps({"question": f"is it {i}", "passage": "The quick brown fox.", "answer": i % 2 == 0}) + "\n"
            for i in range(3)
        )
    )
    (root / "arc").mkdir()
    doc = {
        "question": {
            "stem": "Which is a fox?",
            "choices": [{"text": "brown", "label": "1"}, {"text": "lazy", "label": "2"}],
        },
        "answerKey": "1",
    }
    (root / "arc" / "ARC-Easy-Test.jsonl").write_text(json.dumps(doc) + "\n")


def test_a_tiny_model_is_scored_end_to_end(tmp_path, tokenizer):
    _tiny_data(tmp_path / "data")
    result = evaluate_zeroshot(
        make_model(),
        tokenizer,
        ["boolq", "arc_easy"],
        limit=2,
        batch_size=2,
        data_root=tmp_path / "data",
        work_dir=tmp_path / "work",
    )
    assert result["tasks"]["boolq"]["documents"] == 2 and result["tasks"]["arc_easy"]["documents"] == 1
    assert result["tasks"]["arc_easy"]["metric"] == "acc_norm"
    assert 0 <= result["average"] <= 1


def test_unknown_task_or_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(SaapError, match="unknown zero-shot task"):
        prepare_tasks(["mmlu"], tmp_path, tmp_path / "w")
    with pytest.raises(SaapError, match="not found"):
        prepare_tasks(["piqa"], tmp_path, tmp_path / "w")


def test_no_progress_silences_lm_evals_request_bar(tmp_path, tokenizer, capfd):
    _tiny_data(tmp_path / "data")
    evaluate_zeroshot(
        make_model(), tokenizer, ["boolq"], limit=2, batch_size=2, data_root=tmp_path / "data",
        work_dir=tmp_path / "work", progress=False,
    )  # fmt: skip
    assert "Running loglikelihood requests" not in capfd.readouterr().err


def test_per_document_predictions_reproduce_lm_evals_scores(tmp_path, tokenizer):
    _tiny_data(tmp_path / "data")
    result = evaluate_zeroshot(
        make_model(), tokenizer, ["boolq", "arc_easy"], limit=2, batch_size=2, data_root=tmp_path / "data",
        work_dir=tmp_path / "work", progress=False, per_document=True,
    )  # fmt: skip
    for task in result["tasks"].values():  # acc (boolq) and acc_norm (arc_easy)
        hits = [p == y for p, y in zip(task["predictions"], task["labels"], strict=True)]
        assert len(hits) == task["documents"] and sum(hits) / len(hits) == task["value"]
    assert result["tasks"]["boolq"]["labels"] == [1, 0]  # "answer": true, false

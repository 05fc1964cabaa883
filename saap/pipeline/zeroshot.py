"""Zero-shot accuracy with lm-eval-harness on the local copies of the standard pruning suite.

lm-eval's built-in tasks fetch their data from the Hub, so saap ships its own task YAMLs that use
lm-eval's ``json`` loader on files prepared here from ``<data dir>/zeroshot/`` (labels merged in,
fields normalised). Prompts, choices and metrics mirror lm-eval's own task definitions (noted per
task below), so the scores are comparable with papers that report lm-eval numbers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from saap.pipeline.data import data_dirs
from saap.runtime.errors import SaapError

TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# The metric each paper table reports per task: acc_norm where lm-eval length-normalises choices.
REPORTED_METRIC = {
    "boolq": "acc",
    "piqa": "acc",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
}
REPORTED_METRIC |= {f"{task}_dev": REPORTED_METRIC[task] for task in ("arc_easy", "arc_challenge", "openbookqa")}
PREPARED_VERSION = 1  # bump when the preparation below changes, so caches are rebuilt


def _jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _labels(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _hellaswag_clean(text: str) -> str:
    # lm-eval's hellaswag.utils.preprocess: WikiHow "[title]" artefacts and doubled spaces removed.
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _boolq(root: Path) -> Iterator[dict]:
    for doc in _jsonl(root / "boolq" / "dev.jsonl"):
        yield {"passage": doc["passage"], "question": doc["question"], "label": int(doc["answer"])}


def _piqa(root: Path) -> Iterator[dict]:
    labels = _labels(root / "piqa" / "valid-labels.lst")
    for doc, label in zip(_jsonl(root / "piqa" / "valid.jsonl"), labels, strict=True):
        yield {"goal": doc["goal"], "sol1": doc["sol1"], "sol2": doc["sol2"], "label": int(label)}


def _hellaswag(root: Path) -> Iterator[dict]:
    for doc in _jsonl(root / "hellaswag" / "hellaswag_val.jsonl"):
        yield {
            "query": _hellaswag_clean(f"{doc['activity_label']}: {doc['ctx']}"),
            "choices": [_hellaswag_clean(e) for e in doc["endings"]],
            "label": int(doc["label"]),
        }


def _winogrande(root: Path) -> Iterator[dict]:
    # lm-eval scores the continuation after the blank under each filled-in context ("partial scoring").
    labels = _labels(root / "winogrande" / "dev-labels.lst")
    for doc, label in zip(_jsonl(root / "winogrande" / "dev.jsonl"), labels, strict=True):
        blank = doc["sentence"].index("_")
        yield {
            "contexts": [doc["sentence"][:blank] + doc["option1"], doc["sentence"][:blank] + doc["option2"]],
            "continuation": doc["sentence"][blank + 1 :].strip(),
            "label": int(label) - 1,
        }


def _multiple_choice(path: Path) -> Iterator[dict]:
    # ARC / OpenBookQA official jsonl; some ARC items have 3 or 5 choices and labels "1".."4".
    for doc in _jsonl(path):
        choices = doc["question"]["choices"]
        keys = [c["label"] for c in choices]
        yield {
            "question": doc["question"]["stem"],
            "choices": [c["text"] for c in choices],
            "label": keys.index(doc["answerKey"].strip()),
        }


PREPARE: dict[str, Callable[[Path], Iterator[dict]]] = {
    "boolq": _boolq,
    "piqa": _piqa,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "arc_easy": lambda root: _multiple_choice(root / "arc" / "ARC-Easy-Test.jsonl"),
    "arc_challenge": lambda root: _multiple_choice(root / "arc" / "ARC-Challenge-Test.jsonl"),
    "openbookqa": lambda root: _multiple_choice(root / "openbookqa" / "test.jsonl"),
    # Dev splits, for choosing defaults (never reported as results): not in TASKS, named explicitly.
    "arc_easy_dev": lambda root: _multiple_choice(root / "arc" / "ARC-Easy-Dev.jsonl"),
    "arc_challenge_dev": lambda root: _multiple_choice(root / "arc" / "ARC-Challenge-Dev.jsonl"),
    "openbookqa_dev": lambda root: _multiple_choice(root / "openbookqa" / "dev.jsonl"),
}
DEV_TASKS = ("arc_easy_dev", "arc_challenge_dev", "openbookqa_dev")

# Prompt templates as in lm-eval 0.4 (super_glue/boolq, piqa, hellaswag, winogrande, arc, openbookqa).
TEMPLATES: dict[str, dict] = {
    "boolq": {
        "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
        "doc_to_choice": ["no", "yes"],
        "metrics": ["acc"],
    },
    "piqa": {"doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_choice": "{{[sol1, sol2]}}"},
    "hellaswag": {"doc_to_text": "{{query}}", "doc_to_choice": "choices"},
    "winogrande": {
        "doc_to_text": "label",
        "doc_to_target": "continuation",
        "doc_to_choice": "contexts",
        "metrics": ["acc"],
    },
    "arc_easy": {"doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}"},
    "arc_challenge": {"doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}"},
    "openbookqa": {"doc_to_text": "question", "doc_to_choice": "{{choices}}"},
}
TEMPLATES |= {f"{task}_dev": TEMPLATES[task] for task in ("arc_easy", "arc_challenge", "openbookqa")}


def zeroshot_root(data_root: Path | None) -> Path:
    """The zero-shot data: ``data_root`` (a data dir with ``zeroshot/``, or that folder itself), else
    the first data dir that has one (``$SAAP_DATA_DIR``, then saap's own copy)."""
    if data_root:
        return Path(data_root) / "zeroshot" if (Path(data_root) / "zeroshot").is_dir() else Path(data_root)
    return next((d / "zeroshot" for d in data_dirs() if (d / "zeroshot").is_dir()), data_dirs()[-1] / "zeroshot")


def prepare_tasks(tasks: list[str], data_root: Path | None, work_dir: Path) -> Path:
    """Write prepared jsonl files and lm-eval task YAMLs (absolute paths) under ``work_dir``."""
    root = zeroshot_root(data_root)
    unknown = [t for t in tasks if t not in PREPARE]
    if unknown:
        raise SaapError(f"unknown zero-shot task(s) {', '.join(unknown)} (choose from {', '.join(PREPARE)})")
    work_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        try:
            docs = list(PREPARE[task](root))
        except FileNotFoundError as e:
            raise SaapError(f"zero-shot data for {task} not found: {e.filename} (set --data-dir)") from None
        except (KeyError, ValueError, json.JSONDecodeError) as e:
            raise SaapError(f"zero-shot data for {task} under {root} is malformed: {e}") from None
        data_file = work_dir / f"{task}.jsonl"
        data_file.write_text("".join(json.dumps(d) + "\n" for d in docs))
        template = TEMPLATES[task]
        config = {
            "task": task,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": template["doc_to_text"],
            "doc_to_target": template.get("doc_to_target", "label"),
            "doc_to_choice": template["doc_to_choice"],
            "metric_list": [
                {"metric": m, "aggregation": "mean", "higher_is_better": True}
                for m in template.get("metrics", ["acc", "acc_norm"])
            ],
            "metadata": {"version": 1.0, "source": "saap local copy"},
        }
        (work_dir / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return work_dir


def evaluate_zeroshot(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,
    data_root: Path | None = None,
    work_dir: Path | None = None,
    progress: bool = True,
    per_document: bool = False,
) -> dict:
    """Score ``model`` (a loaded object: pruned models have per-layer shapes) with lm-eval.

    ``per_document``: each task also gets every document's label and predicted choice (lm-eval's
    ``log_samples``), so two models scored on the same documents can be compared pair by pair."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from saap.runtime.models import cache_dir

    key = hashlib.sha256(f"{PREPARED_VERSION}:{zeroshot_root(data_root)}:{sorted(tasks)}".encode())
    work_dir = work_dir or cache_dir() / "zeroshot" / key.hexdigest()[:16]
    prepare_tasks(tasks, data_root, work_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=2048)
    if not progress:  # lm-eval's evaluator calls these without its disable_tqdm switch
        for request in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            setattr(lm, request, functools.partial(getattr(lm, request), disable_tqdm=True))
    manager = TaskManager(include_path=str(work_dir), include_defaults=False)
    output = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=per_document)
    results = {}
    for task in tasks:
        raw = output["results"][task]
        metric = REPORTED_METRIC[task]
        results[task] = {
            "metric": metric,
            "value": raw[f"{metric},none"],
            "stderr": _number(raw.get(f"{metric}_stderr,none")),  # lm-eval says "N/A" for one document
            "documents": output["n-samples"][task]["effective"],
            "all": {k.split(",")[0]: v for k, v in raw.items() if k.endswith(",none")},
        }
        if per_document:
            results[task] |= documents(output["samples"][task], metric)
    values = [r["value"] for r in results.values()]
    # stderr of a mean of independent task means: sqrt(sum se^2) / n
    errors = [r["stderr"] or 0.0 for r in results.values()]
    return {
        "tasks": results,
        "average": sum(values) / len(values),
        "average_stderr": (sum(e * e for e in errors) ** 0.5) / len(errors),
        "limit": limit,
        "lm_eval_version": _lm_eval_version(),
    }


def documents(samples: list[dict], metric: str) -> dict:
    """Every document's ``labels`` and ``predictions`` entry (a choice index) from lm-eval's logged samples, in order.

    The prediction is lm-eval's own argmax: of the log-likelihoods for ``acc``, of the log-likelihood
    per character of the choice for ``acc_norm``. It is checked against the score lm-eval logged."""
    labels, predictions = [], []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        scores = [float(r[0]) for r in sample["filtered_resps"]]
        if metric == "acc_norm":
            scores = [s / len(c) for s, c in zip(scores, sample["doc"]["choices"], strict=True)]
        prediction = max(range(len(scores)), key=scores.__getitem__)  # the first of a tie, as numpy's argmax
        label = sample["doc"]["label"]  # lm-eval's "target" is WinoGrande's continuation text, not its index
        if (prediction == label) != bool(sample[metric]):
            raise SaapError(f"document {sample['doc_id']}: the predicted choice does not reproduce lm-eval's {metric}")
        labels.append(label)
        predictions.append(prediction)
    return {"labels": labels, "predictions": predictions}


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _lm_eval_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("lm-eval")

"""The regression check: every comparable number of a document against a stored baseline's."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saap.pipeline.bench.settings import SCHEMA
from saap.runtime.errors import SaapError


@dataclass
class Metric:
    value: float
    higher_is_better: bool
    machine_independent: bool


def flatten_metrics(doc: dict[str, Any]) -> dict[str, Metric]:
    """Every comparable number of a document, keyed by a stable name."""
    metrics: dict[str, Metric] = {}
    for s in doc.get("speedups", []):
        run = f"{s['engine']}/{s['device']}/{s['quant']}/t{s['threads']}/p{s['prompt_tokens']}"
        key = f"{s['model']} vs {s['parent']} {run}"
        metrics[f"decode speed-up {key}"] = Metric(s["decode_speedup"]["median"], True, True)
    for r in doc.get("results", []):
        key = f"{r['model']} {r['engine']}/{r['device']}/{r['quant']}/t{r['threads']}"
        metrics[f"artifact bytes {key}"] = Metric(r["artifact_bytes"], False, True)
        metrics[f"decode weight bytes {key}"] = Metric(r["decode_weight_bytes"], False, True)
        for p, s in r["by_prompt"].items():
            metrics[f"decode tok/s {key}/p{p}"] = Metric(s["decode_tok_s"]["median"], True, False)
            metrics[f"prefill tok/s {key}/p{p}"] = Metric(s["prefill_tok_s"]["median"], True, False)
            metrics[f"TTFT ms {key}/p{p}"] = Metric(s["ttft_ms"]["median"], False, False)
        if r.get("peak_rss_mb") is not None:
            metrics[f"peak RSS MB {key}"] = Metric(r["peak_rss_mb"], False, False)
    for label, m in doc.get("models", {}).items():
        if m.get("params") is not None:
            metrics[f"params {label}"] = Metric(m["params"], False, True)
    return metrics


def compare(
    current: dict[str, Any], baseline: dict[str, Any], tolerance: float, absolute: bool = True
) -> list[dict[str, Any]]:
    """Metrics of ``current`` worse than ``baseline`` by more than ``tolerance`` (a fraction), or missing.

    Machine-independent metrics (speed-up ratios measured within one run, sizes, parameter counts) are
    always compared; absolute speeds, TTFT and RSS only when both runs have the same hardware fingerprint
    (and ``absolute`` is true: a shared CI box may match the fingerprint yet not the load).
    """
    if not 0 <= tolerance < 1:
        raise SaapError(f"--tolerance must be in [0, 1), not {tolerance}")
    for name, doc in (("current run", current), ("baseline", baseline)):
        if doc.get("schema") != SCHEMA:
            raise SaapError(f"{name} is not a saap bench document (schema {doc.get('schema')!r}, expected {SCHEMA})")
    same_hardware = absolute and current["environment"].get("hardware_fingerprint") == baseline["environment"].get(
        "hardware_fingerprint"
    )
    now, before = flatten_metrics(current), flatten_metrics(baseline)
    regressions = []
    for name, base in before.items():
        if not base.machine_independent and not same_hardware:
            continue
        cur = now.get(name)
        if cur is None:
            regressions.append({"metric": name, "baseline": base.value, "current": None, "change": None})
            continue
        change = (cur.value - base.value) / base.value if base.value else 0.0
        worse = -change if base.higher_is_better else change
        if worse > tolerance:
            regressions.append(
                {"metric": name, "baseline": base.value, "current": cur.value, "change": round(change, 4)}
            )
    return regressions


def format_regressions(regressions: list[dict[str, Any]], tolerance: float) -> str:
    if not regressions:
        return f"no metric regressed beyond {tolerance:.0%}"
    width = max(len(r["metric"]) for r in regressions)
    lines = [
        f"{len(regressions)} metric(s) regressed beyond {tolerance:.0%}:",
        f"{'metric'.ljust(width)}  baseline    current     change",
    ]
    for r in regressions:
        cur = "missing" if r["current"] is None else f"{r['current']:.4g}"
        change = "" if r["change"] is None else f"{r['change']:+.1%}"
        lines.append(f"{r['metric'].ljust(width)}  {r['baseline']:<10.4g}  {cur:<10}  {change}")
    return "\n".join(lines)


def load_document(path: str | Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SaapError(f"baseline '{path}' does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise SaapError(f"cannot read '{path}': {e}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise SaapError(f"'{path}' is not a saap bench JSON document (schema {SCHEMA})")
    return doc

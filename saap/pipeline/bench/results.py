"""What the result rows say together: the failed runs, each pruned model's speed-up over its dense parent,
and our GGUF export of an alias against llama.cpp's own file of it."""

from __future__ import annotations

from typing import Any

from saap.pipeline.bench.settings import REFERENCE_SUFFIXES
from saap.pipeline.bench.stats import paired_speedup


def failures(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The result rows whose worker died (their ``failed`` says why)."""
    return [r for r in doc["results"] if r.get("failed")]


def _run_key(r: dict[str, Any]) -> tuple:
    return (r["engine"], r["device"], r["quant"], r["threads"])


def _run_fields(r: dict[str, Any]) -> dict[str, Any]:
    return {"engine": r["engine"], "device": r["device"], "quant": r["quant"], "threads": r["threads"]}


def speedups(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each pruned model against its dense parent on the same run: measured (paired), ideal, efficiency."""
    by_key = {(r["model"], *_run_key(r)): r for r in doc["results"]}
    rows = []
    for r in doc["results"]:
        parent = doc["models"].get(r["model"], {}).get("parent")
        dense = by_key.get((parent, *_run_key(r))) if parent else None
        if dense is None or dense.get("failed") or r.get("failed"):
            continue
        ideal = dense["decode_weight_bytes"] / r["decode_weight_bytes"]
        for p, stats in r["by_prompt"].items():
            measured = paired_speedup(stats["decode_tok_s_runs"], dense["by_prompt"][p]["decode_tok_s_runs"])
            prefill = paired_speedup(stats["prefill_tok_s_runs"], dense["by_prompt"][p]["prefill_tok_s_runs"])
            rows.append(
                {"model": r["model"], "parent": parent, **_run_fields(r), "prompt_tokens": int(p)}
                | {"decode_speedup": measured, "prefill_speedup": prefill, "ideal_speedup": round(ideal, 4)}
                | {"efficiency": round(measured["median"] / ideal, 4)}
            )
    return rows


def references(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Our export of a dense alias against the reference tool's own: llama.cpp's file requantized to the same
    type (--llamacpp-reference), onnxruntime-genai's builder at the same precision (--genai-reference)."""
    by_key = {(r["model"], *_run_key(r)): r for r in doc["results"]}
    rows = []
    for r in doc["results"]:
        suffix = next((s for s in REFERENCE_SUFFIXES if r["model"].endswith(s)), None)
        if suffix is None:
            continue
        ours = by_key.get((r["model"][: -len(suffix)], *_run_key(r)))
        if ours is None or ours.get("failed") or r.get("failed"):
            continue
        for p, stats in r["by_prompt"].items():
            mine = ours["by_prompt"][p]
            rows.append(
                {"ours": ours["model"], "reference": r["model"], **_run_fields(r), "prompt_tokens": int(p)}
                | {"ours_decode_tok_s": mine["decode_tok_s"]["median"]}
                | {"reference_decode_tok_s": stats["decode_tok_s"]["median"]}
                | {"decode_ratio": paired_speedup(mine["decode_tok_s_runs"], stats["decode_tok_s_runs"])}
            )
    return rows

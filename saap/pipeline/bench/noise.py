"""Warnings on measurements not to trust: taken while the machine was busier than its cores, or whose
repeats disagree. The paired speed-up cancels a slowdown both models share; these say when even the
absolute speeds (and a baseline made from them) are suspect."""

from __future__ import annotations

from typing import Any

from saap.pipeline.bench.stats import relative_spread

SPREAD_LIMIT = 0.10  # (max - min) / median of the repeats' decode tok/s; above it a repeat was disturbed


def row_warnings(row: dict[str, Any], cores: int | None) -> list[str]:
    """Why one result row is noisy (empty when it is not): ``load_average_1m`` above ``cores``, or the
    decode tok/s of its repeats spread beyond ``SPREAD_LIMIT`` at some prompt length."""
    found = []
    load = row.get("load_average_1m")
    if load is not None and cores and load > cores:
        found.append(f"1-min load average {load:.2f} above the {cores} cores while measuring")
    for prompt, stats in (row.get("by_prompt") or {}).items():
        runs = stats.get("decode_tok_s_runs") or []
        spread = relative_spread(runs) if len(runs) > 1 else 0.0
        if spread > SPREAD_LIMIT:
            found.append(
                f"decode tok/s of the {len(runs)} repeats spread {spread:.0%} at prompt {prompt} "
                f"(over {SPREAD_LIMIT:.0%})"
            )
    return found


def warning_lines(doc: dict[str, Any]) -> list[str]:
    """One line per noisy row, naming it: what the table prints under itself."""
    return [
        f"warning: {r['model']} {r['engine']}/{r['device']}/{r['quant']}/t{r['threads']}: {'; '.join(r['warnings'])}"
        for r in doc.get("results", [])
        if r.get("warnings")
    ]

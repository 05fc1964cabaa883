"""Medians of few noisy repeats, and the paired ratio that cancels the noise two models share."""

from __future__ import annotations

import statistics


def summarize(values: list[float], digits: int = 3) -> dict[str, float]:
    """Median with min and max (the median of few noisy repeats is robust to one disturbed run)."""
    if not values:
        raise ValueError("no values to summarize")
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def paired_speedup(pruned: list[float], dense: list[float]) -> dict[str, float]:
    """Per-repeat ratios of pruned / dense throughput (measured back to back), summarized."""
    if len(pruned) != len(dense) or not pruned:
        raise ValueError("paired speed-up needs the same, non-zero number of repeats")
    return summarize([p / d for p, d in zip(pruned, dense, strict=True)], 4)


def relative_spread(values: list[float]) -> float:
    """(max - min) / median: how far apart the repeats are, as a fraction of a typical one (0 for one)."""
    if not values:
        raise ValueError("no values to spread")
    median = statistics.median(values)
    return (max(values) - min(values)) / median if median else 0.0

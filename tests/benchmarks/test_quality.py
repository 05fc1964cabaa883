"""The quality and ablation benchmarks' own logic: which stored cells are reused, and the tables."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import quality  # noqa: E402
import saap_ablation  # noqa: E402


def _args(**overrides) -> argparse.Namespace:
    values = dict(model="smollm2-135m", limit=300, ppl_windows=None, tasks=["boolq"], device="cpu", batch_size=8)
    return argparse.Namespace(**(values | overrides))


def test_cells_stored_before_the_device_setting_existed_still_match_a_cpu_run():
    current = quality.cell_settings(_args())
    old = {k: v for k, v in current.items() if k not in quality.LATER_SETTINGS}
    assert quality.settings_match(old, current)
    assert not quality.settings_match(old, quality.cell_settings(_args(device="cuda")))
    assert not quality.settings_match(current, quality.cell_settings(_args(limit=None)))


def test_measured_cells_pruned_before_the_plan_evolution_match_only_the_variants_that_pin_it_off():
    args = _args(calibration="books.txt", num_samples=32)
    current = saap_ablation.cell_settings(args, "fused-measured-c4-64calib")
    old_flags = [f for f in current["flags"] if f not in saap_ablation.NO_EVOLUTION]
    before = {"settings": current | {"flags": old_flags}, "prune": {"layers": []}}
    assert saap_ablation.cell_matches(before, current)
    evolved = {"settings": before["settings"], "prune": {"layers": [], "evolution": {"kept": "evolved"}}}
    assert not saap_ablation.cell_matches(evolved, current)  # it ran with the evolution: not this variant
    evo = saap_ablation.cell_settings(args, "fused-measured-c4-64calib-evo")
    assert not saap_ablation.cell_matches(before, evo)
    uniform = saap_ablation.cell_settings(args, "fused-uniform")
    assert saap_ablation.cell_matches({"settings": uniform, "prune": {}}, uniform)


def test_limit_takes_a_positive_count_or_all():
    assert quality.parse_limit("all") is None
    assert quality.parse_limit("300") == 300
    for bad in ("0", "-3", "many"):
        with pytest.raises(argparse.ArgumentTypeError):
            quality.parse_limit(bad)


def _cell(variant: str, wikitext: float, layers: list[dict]) -> dict:
    return {
        "variant": variant,
        "ratio": 0.2,
        "prune": {
            "ratio_achieved": 0.2,
            "layers": layers,
            "metric_weights": {"attention": {"vector": 2.0, "element": 1.0}, "mlp": {"vector": 1.0, "element": 4.0}},
        },
        "perplexity": {
            saap_ablation.DEV_SET: {"value": wikitext / 2},
            "wikitext2": {"value": wikitext},
            "ptb": {"value": 2 * wikitext},
        },
    }


def test_ablation_table_reports_weights_and_removed_blocks(tmp_path):
    full = {"num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536}
    no_attention = {"num_attention_heads": 0, "num_key_value_heads": 0, "intermediate_size": 1024}
    data = {
        "regenerate": "python benchmarks/saap_ablation.py",
        "settings": {
            "ppl_windows": None,
            "tasks": [],
            "calibration": "calibration/simplebooks92_valid.txt",
            "num_samples": 32,
        },
        "cells": [_cell("fused-uniform", 170.0, [full, full]), _cell("fused-adaptive", 250.0, [full, no_attention])],
        "missing": ["sum-uniform-0.2"],
    }
    table = saap_ablation.markdown(data)
    assert "| fused-uniform | 0.2 | 20.0% | 85.00 | 170.00 | 340.00 | 0.67 | 0.20 | 0 / 0 |" in table
    assert "| fused-adaptive | 0.2 | 20.0% | 125.00 | 250.00 | 500.00 | 0.67 | 0.20 | 1 / 0 |" in table
    assert "sum-uniform-0.2" in table
    saap_ablation.plot(data, tmp_path / "ablation.png")
    assert (tmp_path / "ablation.png").stat().st_size > 0

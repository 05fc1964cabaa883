"""CI throughput regression check: a short interleaved torch run of SmolLM2-135M dense vs SAAP 20 %,
compared with a committed baseline on machine-independent metrics.

    python benchmarks/check_regression.py                      # run, compare, exit 1 on a regression
    python benchmarks/check_regression.py --self-test          # also prove a 2x slowdown is caught
    python benchmarks/check_regression.py --current run.json   # compare an existing saap bench JSON instead
    python benchmarks/check_regression.py --write-baseline     # regenerate the committed baseline

What is compared: the pruned model's decode speed-up over the dense one (median of per-repeat ratios,
the two models alternating in one run, so a noisy machine slows both alike), and the artifact sizes,
weight bytes per token and parameter counts. Absolute tokens/s are not: the CI box is shared and its
load is not the baseline's. Tolerance 0.30: a noisy 2-core machine moves the ratio by well under
that, while a 2x slowdown of the pruned model halves it (-50 %). ``--self-test`` reruns the bench
with ``SAAP_BENCH_INJECT_SLOWDOWN=2`` (pruned decode steps take twice as long) and fails unless that
run is flagged against the unslowed run just made.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from saap.pipeline.bench import (  # noqa: E402
    SLOWDOWN_ENV,
    BenchSettings,
    compare,
    format_regressions,
    format_table,
    load_document,
    run_bench,
)
from saap.runtime.checkpoint import is_checkpoint  # noqa: E402
from saap.runtime.errors import SaapError  # noqa: E402
from saap.runtime.io import write_json_atomic  # noqa: E402
from saap.runtime.models import cache_dir  # noqa: E402

BASELINE = PROJECT / "benchmarks" / "baselines" / "ci-torch-smollm2-135m.json"
TOLERANCE = 0.30
DENSE = "smollm2-135m"


def pruned_checkpoint() -> Path:
    """SAAP 20 % of SmolLM2-135M, pruned once (~1 min) and kept in the saap cache."""
    path = cache_dir() / "ci-bench" / "saap-p20"
    if not is_checkpoint(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "saap.pipeline.cli", "prune", "--model", DENSE, "--method", "saap"]
        # The committed baselines were measured on the uniform-range shapes: keep those, so that a
        # change of saap's default allocation is not read as a throughput regression.
        cmd += ["--ratio", "0.2", "--allocation", "uniform-range", "--out", str(path), "--overwrite", "--quiet"]
        subprocess.run(cmd, cwd=PROJECT, check=True, env={**os.environ, "PYTHONPATH": str(PROJECT)})
    return path


def short_run(slowdown: float = 1.0) -> dict:
    settings = BenchSettings(
        models=[DENSE, str(pruned_checkpoint())],
        engines=["torch"],
        threads=[2],
        prompt_tokens=[32],
        gen_tokens=32,
        repeats=7,
        warmup=1,
        slowdown=slowdown,
    )
    return run_bench(settings, progress=False)


def check(current: dict, baseline: dict, tolerance: float) -> bool:
    print(format_table(current))
    regressions = compare(current, baseline, tolerance, absolute=False)
    print(format_regressions(regressions, tolerance))
    return not regressions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    parser.add_argument("--current", type=Path, help="a saap bench JSON to compare instead of running")
    parser.add_argument("--self-test", action="store_true", help="also check that a 2x slowdown is flagged")
    parser.add_argument("--write-baseline", action="store_true", help="run and store the result as the baseline")
    args = parser.parse_args()
    started = time.perf_counter()
    try:
        if args.write_baseline:
            doc = short_run()
            write_json_atomic(args.baseline, doc)
            print(format_table(doc))
            print(f"wrote {args.baseline}")
            return 0
        baseline = load_document(args.baseline)
        current = load_document(args.current) if args.current else short_run()
        ok = check(current, baseline, args.tolerance)
        if args.self_test and not args.current:
            print(f"self-test: {SLOWDOWN_ENV}=2 (the pruned model decodes 2x slower) must be flagged")
            # Against this machine's own run just made: the committed baseline comes from another
            # machine (its ratio was 0.92 under load where a quiet Xeon gives 1.32), and a 2x slowdown
            # must be caught whichever side of it this machine falls.
            caught = not check(short_run(slowdown=2.0), current, args.tolerance)
            print("self-test: the injected slowdown was caught" if caught else "self-test FAILED: not caught")
            ok = ok and caught
    except SaapError as e:
        print(f"check_regression: error: {e}", file=sys.stderr)
        return 2
    print(f"throughput regression check {'passed' if ok else 'FAILED'} in {time.perf_counter() - started:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

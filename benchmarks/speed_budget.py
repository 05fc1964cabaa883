"""Speed budgets end to end: fit each engine's profile, prune to a decode speed-up on it, measure.

    python benchmarks/speed_budget.py                       # gguf:q8_0 and onnx:fp32, speed-up 1.5
    python benchmarks/speed_budget.py --engines gguf:q8_0 torch --speedup 1.3

Per engine E: ``saap profile --engine E`` (the cost model, fitted on this machine), then
``saap prune --target-speedup S --engine E --profile ...`` (SAAP's default, the measured search).
Then one ``saap bench`` measures the dense model and every pruned model on every engine,
interleaved, so each plan is also seen on the engine it was *not* made for. Target: on its own
engine the measured decode speed-up is within +-10 % of S. Writes
``benchmarks/results/speed-budget-<model>.{json,md}`` and the profiles in ``speed-budget/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from _common import PROJECT, RESULTS, environment, run_saap, write_results

sys.path.insert(0, str(PROJECT))

from saap.pipeline.prune.speed_model import EngineSpec  # noqa: E402

TOLERANCE = 0.10
PROFILES = RESULTS / "speed-budget"


def slug(engine: str) -> str:
    return engine.replace(":", "-").replace("@", "-")


def plan_summary(record: dict) -> dict:
    """What the search traded: whole layers, blocks and widths removed."""
    after = [layer["after"] for layer in record["layers"]]
    before = record["layers"][0]["before"]
    return {
        "layers_removed": sum(a["num_key_value_heads"] == 0 and a["intermediate_size"] == 0 for a in after),
        "attention_removed": sum(a["num_key_value_heads"] == 0 for a in after),
        "mlp_removed": sum(a["intermediate_size"] == 0 for a in after),
        "attention_narrowed": sum(0 < a["num_key_value_heads"] < before["num_key_value_heads"] for a in after),
        "mlp_narrowed": sum(0 < a["intermediate_size"] < before["intermediate_size"] for a in after),
        "params_removed": round(record["ratio_achieved"], 4),
        "search_kl": record["measured"]["passes"][record["measured"]["kept_pass"] - 1]["kl"],
        "evolution": record.get("evolution"),  # the whole-plan search after the knapsack, if it ran
        "shapes": [f"{a['num_key_value_heads']}/{a['intermediate_size']}" for a in after],
    }


def evolution_cell(plan: dict) -> str:
    """Which plan the held-out KL kept, and the KL the evolution moved on its fitness sequences."""
    if not (e := plan.get("evolution")):
        return "off"
    return f"{e['kept']} (fitness KL {e['kl_start']:.3f} -> {e['kl_end']:.3f})"


def bench_flags(specs: list[EngineSpec]) -> list[str]:
    flag = {"gguf": "--gguf-quant", "onnx": "--onnx-precision", "onnx-genai": "--onnx-precision"}
    flags = [f"{flag[s.engine]}={s.quant}" for s in specs if s.engine in flag]
    devices = sorted({s.device for s in specs})
    return ["--engines", *sorted({s.engine for s in specs}), "--devices", *devices, *flags]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--engines", nargs="+", default=["gguf:q8_0", "onnx:fp32"])
    parser.add_argument("--speedup", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=5, help="bench repeats per model (paired medians)")
    parser.add_argument("--work", default=str(PROJECT / "artifacts" / "speed-budget"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    PROFILES.mkdir(parents=True, exist_ok=True)

    cells = {}
    for engine in args.engines:
        profile = PROFILES / f"profile-{slug(engine)}.json"
        fitted = run_saap("profile", "--model", args.model, "--engine", engine, "--out", str(profile), "--quiet")
        out = work / f"saap-{slug(engine)}-x{args.speedup}"
        shutil.rmtree(out, ignore_errors=True)
        pruned = run_saap("prune", "--model", args.model, "--target-speedup", str(args.speedup), "--engine", engine,
                          "--profile", str(profile), "--out", str(out), "--quiet")  # fmt: skip
        record = json.loads((out / "saap.json").read_text())
        cells[engine] = {
            "profile": json.loads(profile.read_text()),
            "profile_run": {k: fitted[k] for k in ("wall_s", "peak_rss_mb")},
            "prune_run": {k: pruned[k] for k in ("wall_s", "peak_rss_mb")},
            "checkpoint": str(out),
            "budget": record["budget"],
            "plan": plan_summary(record),
        }

    bench_json = work / "bench.json"
    specs = {e: EngineSpec.parse(e) for e in args.engines}
    models = [args.model] + [f"for-{slug(e)}={c['checkpoint']}" for e, c in cells.items()]
    run_saap("bench", "--models", *models, *bench_flags(list(specs.values())), "--gen-tokens", "64", "--repeats",
             str(args.repeats), "--out", str(bench_json), "--quiet")  # fmt: skip
    bench = json.loads(bench_json.read_text())
    measured = {(s["model"], s["engine"], s["quant"], s["device"]): s["decode_speedup"] for s in bench["speedups"]}
    for engine, cell in cells.items():
        cell["measured"] = {
            other: measured.get((f"for-{slug(engine)}", s.engine, s.quant, s.device)) for other, s in specs.items()
        }
        own = cell["measured"][engine]
        cell["within_tolerance"] = own is not None and abs(own["median"] / args.speedup - 1) <= TOLERANCE

    data = {
        "regenerate": f"python benchmarks/speed_budget.py --engines {' '.join(args.engines)} --speedup {args.speedup}"
        f" --repeats {args.repeats}",
        "model": args.model,
        "speedup_required": args.speedup,
        "tolerance": TOLERANCE,
        "cells": cells,
        "bench": {"settings": bench["settings"], "environment": bench["environment"], "results": bench["results"]},
        "environment": environment(),
    }
    write_results(f"speed-budget-{args.model}", data, markdown(data, args.engines))


def markdown(data: dict, engines: list[str]) -> str:
    s = data["speedup_required"]
    env = data["bench"]["environment"]
    lines = [
        f"# Speed budgets: {data['model']} pruned to a {s}x decode speed-up per engine",
        "",
        f"Regenerate: `{data['regenerate']}`",
        "",
        f"Machine: {env['cpu']} ({env['logical_cores']} logical cores), threads {env['threads_used']}, "
        f"git {env['git_revision']}{' (dirty)' if env['git_dirty'] else ''}. Each engine's cost model was fitted "
        "by `saap profile` on this machine in the same run; the bench measured the dense and every pruned model on "
        "every engine, interleaved, 64 decode steps after a 128-token prompt; speed-ups are medians of per-repeat "
        "pruned / dense decode tok/s.",
        "",
        "## Cost models (ms per token = fixed + per attention block + per MLP block + per KV group + per Mparam)",
        "",
        "| engine | fixed ms | attention ms | MLP ms | KV group ms | ms / Mparam | dense measured ms | worst fit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for engine, cell in data["cells"].items():
        c, points = cell["profile"]["cost"], cell["profile"]["points"]
        worst = max(abs(p["fitted_ms"] / p["ms"] - 1) for p in points)
        lines.append(
            f"| {engine} | {c['fixed_ms']:.3f} | {c['attention_ms']:.3f} | {c['mlp_ms']:.3f} | "
            f"{c['kv_group_ms']:.4f} | {c['ms_per_mparam']:.4f} | {points[0]['ms']:.2f} | {worst:.1%} |"
        )
    lines += [
        "",
        "## Plans and measured speed-ups",
        "",
        "| pruned for | predicted | "
        + " | ".join(f"measured on {e}" for e in engines)
        + " | within ±10 % | params removed | layers / attention / MLP removed | narrowed attn / MLP | search KL"
        + " | plan evolution |",
        "|---|---|" + "---|" * len(engines) + "---|---|---|---|---|---|",
    ]
    for engine, cell in data["cells"].items():
        p = cell["plan"]
        measured = [cell["measured"][e] for e in engines]
        lines.append(
            f"| {engine} | {cell['budget']['speedup_predicted']:.3f} | "
            + " | ".join(f"{m['median']:.3f} ({m['min']:.3f}-{m['max']:.3f})" if m else "n/a" for m in measured)
            + f" | {'yes' if cell['within_tolerance'] else '**no**'} | {p['params_removed']:.1%} | "
            f"{p['layers_removed']} / {p['attention_removed']} / {p['mlp_removed']} | "
            f"{p['attention_narrowed']} / {p['mlp_narrowed']} | {p['search_kl']:.3f} | {evolution_cell(p)} |"
        )
    lines += ["", "Kept shapes per layer (KV groups / MLP width):", ""]
    for engine, cell in data["cells"].items():
        lines.append(f"- {engine}: {' '.join(cell['plan']['shapes'])}")
    lines += ["", "Costs: " + "; ".join(
        f"{e}: profile {c['profile_run']['wall_s']:.0f} s, prune {c['prune_run']['wall_s']:.0f} s "
        f"({c['prune_run']['peak_rss_mb']} MB peak)" for e, c in data["cells"].items()
    ), ""]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()

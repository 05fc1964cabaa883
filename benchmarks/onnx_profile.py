"""Where an ONNX decoder's decode time goes: ONNX Runtime's own profiler, summed per operator type.

    python benchmarks/onnx_profile.py artifacts/onnx-speed/saap-int4 artifacts/onnx-speed/genai-builder-int4
    # writes benchmarks/results/onnx-profile-smollm2-135m.{json,md}

Each directory (a saap export, or onnxruntime-genai builder output) is loaded with profiling on, 2 intra-op
threads, and decoded the way saap's engine does it (one bound KV buffer per cache, I/O binding): one
prompt token, then 64 decode steps. Kernel times of the profile are summed per operator type and divided
by the 65 runs. The profiler adds its own cost to every node, so the per-node overhead it shows is an
upper bound; the split between operators is what this is for.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

from _common import environment, write_results

from saap.runtime.onnx_engine import MODEL_FILE, OnnxSession, SharedKvCache, genai_settings

NAME = "onnx-profile-smollm2-135m"
THREADS, STEPS = 2, 64


def profile(directory: Path) -> dict[str, float]:
    """ms per token by operator type."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.log_severity_level = 3
        session = ort.InferenceSession(str(directory / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        head_size = genai_settings(directory).get("model", {}).get("decoder", {}).get("head_size")
        cache = SharedKvCache(OnnxSession(session, head_size))
        cache.run([1], restart=True)
        for step in range(STEPS):
            cache.run([5 + step], restart=False)
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    return {op: round(us / 1e3 / (STEPS + 1), 3) for op, us in totals.most_common()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="+")
    args = parser.parse_args()
    data = {
        "regenerate": "python benchmarks/onnx_profile.py " + " ".join(args.directories),
        "ms_per_token": {Path(d).name: profile(Path(d)) for d in args.directories},
        "settings": {"threads": THREADS, "decode_steps": STEPS},
        "environment": environment(),
    }
    write_results(NAME, data, markdown(data))


def markdown(data: dict) -> str:
    graphs = data["ms_per_token"]
    ops = sorted({op for g in graphs.values() for op in g}, key=lambda op: -max(g.get(op, 0) for g in graphs.values()))
    lines = [
        "# ONNX Runtime profile of one decode step, ms per token by operator type",
        "",
        f"Regenerate: `{data['regenerate']}`. {THREADS} threads, one prompt token then {STEPS} decode steps on a "
        "bound KV buffer; kernel times from ONNX Runtime's profiler (which adds to every node's time).",
        "",
        "| operator | " + " | ".join(graphs) + " |",
        "|---|" + "---|" * len(graphs),
    ]
    for op in ops:
        lines.append(f"| {op} | " + " | ".join(f"{g.get(op, 0):.2f}" for g in graphs.values()) + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(g.values()):.1f}**" for g in graphs.values()) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

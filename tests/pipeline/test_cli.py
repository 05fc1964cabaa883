import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from saap.pipeline.cli import main

PROJECT = Path(__file__).resolve().parents[2]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, fragment):
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("saap: error:") and fragment in err, err


def test_prune_generate_eval_on_a_tiny_checkpoint(capsys, hf_dir, text_file, tmp_path):
    out = tmp_path / "pruned"
    prune_args = ["--model", str(hf_dir), "--ratio", "0.2", "--align", "4", "--calibration", str(text_file)]
    code, stdout, err = run(capsys, "prune", *prune_args, "--num-samples", "4", "--seq-len", "16", "--out", str(out))
    assert code == 0, err
    meta = json.loads((out / "saap.json").read_text())
    assert meta["method"] == "saap" and abs(meta["ratio_achieved"] - 0.2) <= 0.01
    assert meta["calibration"]["path"] == str(text_file) and len(meta["source"]["sha256"]) == 64
    assert meta["params_after"] < meta["params_before"] and len(meta["layers"]) == 4
    assert "model.safetensors" in meta["files"]

    code, stdout, err = run(capsys, "generate", "--model", str(out), "--prompt", "The quick", "--max-new-tokens", "5")
    assert code == 0 and stdout.startswith("The quick"), err

    report = tmp_path / "eval.json"
    code, stdout, err = run(capsys, "eval", "--model", str(out), "--ppl", str(text_file), "--out", str(report))
    assert code == 0, err
    result = json.loads(report.read_text())["perplexity"][str(text_file)]
    assert result["windows"] > 0 and result["perplexity"] > 1

    code, _, err = run(capsys, "prune", *prune_args, "--out", str(out))  # already there
    assert_one_line_error(code, err, "already exists")


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["prune", "--model", "{hf}", "--ratio", "0.95", "--out", "{tmp}/o"], "--ratio must be in (0, 0.9]"),
        (["prune", "--model", "{hf}", "--ratio", "0", "--out", "{tmp}/o"], "--ratio must be in (0, 0.9]"),
        (["prune", "--model", "{tmp}/missing/model", "--out", "{tmp}/o"], "does not exist"),
        (["prune", "--model", "{hf}", "--calibration", "{tmp}/none.txt", "--out", "{tmp}/o"], "not found"),
        (
            [
                "prune",
                "--model",
                "{hf}",
                "--align",
                "1024",
                "--allocation",
                "uniform-range",
                "--out",
                "{tmp}/o",
                "--quiet",
            ],
            "unreachable",
        ),
        (["generate", "--model", "{tmp}/missing.gguf", "--prompt", "x"], "does not exist"),
        (["eval", "--model", "{hf}", "--ppl", "nosuchset"], "not found"),
        (["eval", "--model", "{hf}", "--generate", "--device", "tpu"], "runs on cpu, cuda or mps, not 'tpu'"),
        (["prune", "--model", "{hf}", "--ratio", "abc", "--out", "{tmp}/o"], "invalid float value"),
        (
            ["export", "onnx", "--model", "{hf}", "--precision", "fp32", "--accuracy-level", "4", "--out", "{tmp}/o"],
            "--accuracy-level applies to the fused graph's int8 / int4 MatMulNBits only",
        ),
        (["export", "onnx", "--model", "{hf}", "--accuracy-level", "9", "--out", "{tmp}/o"], "invalid choice: 9"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, hf_dir, tmp_path, text_file, argv, fragment):
    argv = [a.format(hf=hf_dir, tmp=tmp_path) for a in argv]
    if argv[0] == "prune" and "--calibration" not in argv:
        argv += ["--calibration", str(text_file)]
    try:
        code, _, err = run(capsys, *argv)
    except SystemExit as e:  # argparse's own errors
        code, err = e.code, capsys.readouterr().err
    err = re.sub(r"^saap \w+: error:", "saap: error:", err)  # argparse names the verb
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp")]


def test_corrupt_checkpoint_is_refused_from_the_command_line(hf_dir, text_file, tmp_path):
    out = tmp_path / "pruned"
    cmd = [sys.executable, "-m", "saap.pipeline.cli"]
    subprocess.run(
        [*cmd, "prune", "--model", str(hf_dir), "--align", "4", "--calibration", str(text_file), "--out", str(out)],
        check=True,
        cwd=PROJECT,
        capture_output=True,
    )
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = subprocess.run(
        [*cmd, "generate", "--model", str(out), "--prompt", "hi"], cwd=PROJECT, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("saap: error: checkpoint")


def test_export_onnx_then_generate_with_the_onnx_engine(capsys, hf_dir, tmp_path):
    out = tmp_path / "onnx"
    code, stdout, err = run(capsys, "export", "onnx", "--model", str(hf_dir), "--out", str(out), "--quiet")
    assert code == 0 and "exported" in stdout, err
    code, torch_out, err = run(
        capsys, "generate", "--model", str(hf_dir), "--prompt", "The quick", "--max-new-tokens", "6"
    )
    assert code == 0, err
    code, onnx_out, err = run(
        capsys, "generate", "--engine", "onnx", "--model", str(out), "--prompt", "The quick", "--max-new-tokens", "6"
    )
    assert code == 0 and onnx_out == torch_out, err
    code, _, err = run(
        capsys, "export", "onnx", "--model", str(hf_dir), "--out", str(tmp_path / "x"), "--precision", "int3"
    )
    assert_one_line_error(code, err, "unknown ONNX precision")
    code, _, err = run(
        capsys, "export", "onnx", "--model", str(hf_dir), "--out", str(tmp_path / "x"), "--precision", "fp16",
        "--graph", "fused",
    )  # fmt: skip
    assert_one_line_error(code, err, "fused ONNX graph has no fp16 form")
    code, _, err = run(capsys, "export", "onnx", "--model", str(hf_dir), "--out", str(out))
    assert_one_line_error(code, err, "exists")

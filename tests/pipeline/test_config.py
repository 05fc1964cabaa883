from pathlib import Path

import pytest
import yaml

from saap.pipeline.cli import main
from saap.pipeline.config import (
    CONFIGS_DIR,
    DEFAULT_CONFIG,
    RunConfig,
    check_semantics,
    find_config,
    load_config,
    parse_config,
)
from saap.runtime.errors import SaapError

CONFIGS = CONFIGS_DIR  # the configs that ship inside the package


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": "m", "prune": {"rattio": 0.2}}, "prune.rattio: unknown key"),
        ({"model": "m", "prune": {"ratio": "lots"}}, "prune.ratio: Input should be a valid number"),
        ({"prune": {"ratio": 0.2}}, "model: Field required"),
        ({"model": "m", "export": {"gguf": ["q3_x"]}}, "export.gguf.0: Input should be"),
        ({"model": "m", "prune": {"method": "magic"}}, "prune.method: Input should be 'flap'"),
        ({"model": "m", "finetune": {"bits": 3}}, "finetune.bits: Input should be 4 or 8"),
        ({"model": "m", "eval": {"tasks": "piqa"}}, "eval.tasks: Input should be a valid list"),
        ({"model": "m", "benchmark": {}}, "benchmark: unknown key"),
        (["model", "m"], "the config must be a mapping"),
    ],
)
def test_schema_errors_name_the_yaml_path(data, message):
    with pytest.raises(SaapError, match="^run.yaml: " + message.replace(".", r"\.")):
        parse_config(data, "run.yaml")


def test_defaults_and_flags():
    config = parse_config({"model": "m", "prune": {"ratio": 0.3}}, "configs/demo.yaml")
    assert config.name == "demo" and config.run_dir == Path("artifacts/demo")
    flags = config.prune.flags()
    assert flags[:4] == ["--method", "saap", "--ratio", "0.3"] and "--target-params" not in flags
    assert config.eval.flags()[:3] == ["--ppl", "wikitext2", "ptb"] and "--dense" not in config.eval.flags()
    assert "--enabled" not in config.finetune.flags()


@pytest.mark.parametrize(
    "prune, message",
    [
        ({"ratio": 0.95}, r"prune\.ratio: --ratio must be in \(0, 0\.9\]"),
        ({"target_params": 10}, r"prune\.target_params: --target-params 10 is unreachable"),
        ({"ratio": 0.2, "target_params": 10}, r"prune\.ratio: give one budget"),
        ({"num_samples": 0}, r"prune\.num_samples: --num-samples"),
        (
            {"method": "llm-pruner", "ratio": 0.2, "align": 64},
            r"prune\.ratio: --ratio 0\.\d+ is unreachable with --align 64",
        ),
        ({"target_speedup": 1.5, "profile": "/nonexistent/p.json"}, r"prune\.target_speedup: profile .* not found"),
    ],
)
def test_impossible_budgets_are_found_before_any_work(hf_dir, prune, message):
    config = parse_config({"model": str(hf_dir), "prune": {"align": 4, **prune}}, "run.yaml")
    with pytest.raises(SaapError, match="^run.yaml: " + message):
        check_semantics(config, "run.yaml")


def test_missing_model_and_data_are_config_errors(hf_dir, tmp_path):
    with pytest.raises(SaapError, match=r"^run.yaml: model: model path .* does not exist"):
        check_semantics(parse_config({"model": str(tmp_path / "nope")}, "run.yaml"), "run.yaml")
    config = parse_config({"model": str(hf_dir), "prune": {"align": 4}, "eval": {"ppl": ["nope.txt"]}}, "run.yaml")
    with pytest.raises(SaapError, match=r"^run.yaml: eval\.ppl\[0\]: data file 'nope.txt' not found"):
        check_semantics(config, "run.yaml")
    config = parse_config({"model": str(hf_dir), "prune": {"align": 4}, "eval": {"tasks": ["chess"]}}, "run.yaml")
    with pytest.raises(SaapError, match=r"^run.yaml: eval\.tasks\[0\]: unknown task 'chess'"):
        check_semantics(config, "run.yaml")


@pytest.mark.parametrize(
    "finetune, message",
    [
        ({"data": ["teacher", "calibration/c4_sample.jsonl"]}, r"finetune\.data: 'teacher' .* cannot be mixed"),
        ({"data": "teacher", "teacher": None}, r"finetune\.teacher: .* needs a teacher to sample from"),
    ],
)
def test_teacher_text_needs_a_teacher_and_comes_alone(hf_dir, finetune, message):
    section = {"enabled": True, "teacher": "parent"} | finetune
    config = parse_config({"model": str(hf_dir), "prune": {"align": 4}, "finetune": section}, "run.yaml")
    with pytest.raises(SaapError, match="^run.yaml: " + message):
        check_semantics(config, "run.yaml")
    sample = {"prefixes": "nope.txt"}
    section = {"enabled": True, "teacher": "parent", "data": "teacher"}
    config = parse_config({"model": str(hf_dir), "prune": {"align": 4}, "finetune": section, "sample": sample}, "r")
    with pytest.raises(SaapError, match=r"^r: sample\.prefixes: data file 'nope.txt' not found"):
        check_semantics(config, "r")


def test_cli_reports_config_errors_in_one_line_and_writes_nothing(capsys, tmp_path):
    path = write(tmp_path, {"model": "m", "artifacts_dir": str(tmp_path / "a"), "prune": {"ratio": "x"}})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("saap: error: ") and "prune.ratio" in err
    assert not (tmp_path / "a").exists()
    bad_yaml = write(tmp_path, "model: [unclosed\n")
    assert main(["run", str(bad_yaml)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_shipped_configs_follow_the_schema():
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert any(p.name == "smollm2-135m.yaml" for p in paths)
    for path in paths:
        config = load_config(path)
        assert isinstance(config, RunConfig) and config.name == path.stem


@pytest.mark.real_model
def test_default_config_passes_every_check():
    config = load_config(CONFIGS / "smollm2-135m.yaml")
    check_semantics(config, "smollm2-135m.yaml")


def test_a_shipped_config_is_found_by_name_from_any_directory(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert find_config("smollm2-135m") == CONFIGS / "smollm2-135m.yaml"
    assert find_config(DEFAULT_CONFIG) == CONFIGS / f"{DEFAULT_CONFIG}.yaml"
    with pytest.raises(SaapError, match="does not exist .*smollm2-135m"):
        find_config("no-such-config")
    own = write(tmp_path, {"model": "m"})
    assert find_config(str(own)) == own  # a file wins over a name


@pytest.mark.real_model
def test_saap_run_check_without_a_config_checks_the_default(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--check"]) == 0
    assert "smollm2-135m.yaml: valid; run directory artifacts/smollm2-135m" in capsys.readouterr().out

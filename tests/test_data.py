"""saap/data: the data sets ship inside the package, each checked against SHA256SUMS, and looked up
through ``--data-dir`` / ``$SAAP_DATA_DIR`` before saap's own copy."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from saap.pipeline.data import (
    DATA_DIR_ENV,
    NOT_SHIPPED,
    PACKAGED_DATA,
    PERPLEXITY_SETS,
    missing_unshipped,
    resolve_data_file,
)
from saap.runtime.errors import SaapError

PROJECT = Path(__file__).resolve().parents[1]
SUMS = PACKAGED_DATA / "SHA256SUMS"
NOT_DATA = {"README.md", "SHA256SUMS"}


def listed() -> dict[str, str]:
    pairs = (line.split(maxsplit=1) for line in SUMS.read_text().splitlines() if line.strip())
    return {name.removeprefix("./"): digest for digest, name in pairs}


def test_every_shipped_file_matches_its_checksum():
    for name, digest in listed().items():
        assert hashlib.sha256((PACKAGED_DATA / name).read_bytes()).hexdigest() == digest, name


def test_every_data_file_is_listed_and_has_its_licence_documented():
    files = {
        str(p.relative_to(PACKAGED_DATA))
        for p in PACKAGED_DATA.rglob("*")
        if p.is_file() and p.name not in NOT_DATA and p.parts[len(PACKAGED_DATA.parts)] != "licenses"
    }
    assert files == set(listed())
    readme = (PACKAGED_DATA / "README.md").read_text()
    for licence in re.findall(r"`(licenses/[^`]+)`", readme):
        assert (PACKAGED_DATA / licence).is_file(), licence
    for name in files:  # every file's folder is named in the provenance table
        assert f"`{name.split('/')[0]}/" in readme, name


def test_unshipped_sets_are_not_in_the_package():
    for name in NOT_SHIPPED:
        assert not (PACKAGED_DATA / PERPLEXITY_SETS[name]).exists()


def test_named_sets_resolve_to_the_packaged_copy(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_file("wikitext2", PERPLEXITY_SETS) == PACKAGED_DATA / PERPLEXITY_SETS["wikitext2"]
    assert resolve_data_file("calibration/c4_sample.jsonl") == PACKAGED_DATA / "calibration/c4_sample.jsonl"


def test_the_user_data_dir_comes_first_then_the_packaged_copy(monkeypatch, tmp_path):
    own = tmp_path / "calibration" / "c4_sample.jsonl"
    own.parent.mkdir()
    own.write_text('{"text": "mine"}\n')
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_file("calibration/c4_sample.jsonl") == own
    assert resolve_data_file("calibration/simplebooks92_valid.txt").parent == PACKAGED_DATA / "calibration"


def test_a_missing_unshipped_set_is_skipped_with_how_to_add_it(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    (line,) = missing_unshipped(["wikitext2", "ptb"]).values()
    assert "not ship" in line and "ppl/ptb/ptb.valid.txt" in line and "\n" not in line
    with pytest.raises(SaapError, match="not found"):
        resolve_data_file("ptb", PERPLEXITY_SETS)
    added = tmp_path / PERPLEXITY_SETS["ptb"]
    added.parent.mkdir(parents=True)
    added.write_text(" a sentence \n another one \n")
    assert missing_unshipped(["ptb"]) == {} and resolve_data_file("ptb", PERPLEXITY_SETS) == added


def test_saap_eval_skips_ptb_in_one_line_and_scores_the_rest(hf_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != DATA_DIR_ENV}
    cmd = [sys.executable, "-m", "saap", "eval", "--model", str(hf_dir), "--ppl", "wikitext2", "ptb",
           "--ppl-windows", "2", "--seq-len", "16", "--quiet", "--out", str(tmp_path / "e.json")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "ptb" in line]
    assert len(lines) == 1 and lines[0].startswith("saap: skipping ptb perplexity")
    result = json.loads((tmp_path / "e.json").read_text())
    assert list(result["perplexity"]) == ["wikitext2"] and "ptb" in result["skipped"]


def test_no_code_test_or_script_reads_outside_the_project():
    outside = "../" + "shared"  # written in two parts so that this file does not match itself
    tracked = subprocess.run(["git", "ls-files"], cwd=PROJECT, capture_output=True, text=True).stdout.split()
    sources = [f for f in tracked if f.endswith((".py", ".sh", ".yaml", ".toml")) or f in ("Makefile", ".ci/run")]
    assert sources, "not a git checkout"
    offenders = [f for f in sources if outside in (PROJECT / f).read_text(errors="replace")]
    assert offenders == []

"""A non-editable install works on its own: the wheel holds one top-level package, ``saap``, with
everything it reads at run time; installed into a fresh virtualenv (no ``-e``), it runs from a
directory that has nothing of the checkout in it.

The fresh virtualenv borrows the test environment's third-party packages through a path line in a
``.pth`` file (a path line adds the folder but runs none of its own ``.pth`` hooks, so the checkout's
editable install stays invisible); installing torch and compiling llama.cpp again would take ~10 min.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]


def _run(cmd: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SAAP_DATA_DIR")}
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the checkout's files (tracked, or new and not ignored)."""
    root = tmp_path_factory.mktemp("wheel")
    listed = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], PROJECT).stdout.split("\0")
    source = root / "src"
    for name in filter(None, listed):
        if (PROJECT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", root, source],
         root)  # fmt: skip
    (built,) = root.glob("saap-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A new virtualenv with the wheel installed into it, not editable."""
    env_dir = tmp_path_factory.mktemp("venv") / "v"
    _run([sys.executable, "-m", "venv", env_dir], env_dir.parent)
    python = env_dir / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([python, "-c", purelib], env_dir).stdout.strip())
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel], env_dir)
    return env_dir


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("elsewhere")  # an unrelated working directory


def test_the_wheel_holds_one_package_with_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    name, version = wheel.name.split("-")[:2]
    assert {n.split("/")[0] for n in names} == {"saap", f"{name}-{version}.dist-info"}
    for needed in ("saap/configs/smollm2-135m.yaml", "saap/pipeline/bench/targets/laptop-cpu.yaml",
                   "saap/data/SHA256SUMS", "saap/data/ppl/wikitext2/wiki.test.raw", "saap/data/licenses/piqa-README.md",
                   "saap/data/zeroshot/hellaswag/hellaswag_val.jsonl"):  # fmt: skip
        assert needed in names, needed
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_the_installed_package_is_the_one_that_runs(venv, elsewhere):
    code = "import saap, saap.pipeline.bench as b; print(saap.__file__); print(b.load_target('laptop-cpu')['name'])"
    out = _run([venv / "bin" / "python", "-c", code], elsewhere).stdout.splitlines()
    assert Path(out[0]).is_relative_to(venv) and not Path(out[0]).is_relative_to(PROJECT)
    assert out[1] == "laptop-cpu"


def test_saap_run_check_with_the_default_config(venv, elsewhere):
    out = _run([venv / "bin" / "saap", "run", "--check"], elsewhere).stdout
    assert "smollm2-135m.yaml: valid; run directory artifacts/smollm2-135m" in out


def test_a_real_command_reads_the_packaged_data(venv, elsewhere):
    done = _run([venv / "bin" / "saap", "eval", "--model", "smollm2-135m", "--ppl", "wikitext2", "--ppl-windows", "2",
                 "--quiet"], elsewhere)  # fmt: skip
    assert "wikitext2  perplexity" in done.stdout

import signal
import subprocess
import sys

from saap.runtime.native import exit_description, run_module


def test_exit_descriptions_name_the_signal():
    assert exit_description(-signal.SIGILL) == "killed by SIGILL (illegal instruction)"
    assert exit_description(-signal.SIGSEGV) == "killed by SIGSEGV (segmentation fault)"
    assert exit_description(2) == "exit 2" and exit_description(None) == "still running"


def test_a_real_signal_death_is_described():
    child = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"])
    assert exit_description(child.returncode) == "killed by SIGILL (illegal instruction)"


def test_run_module_finds_the_project_and_captures_output():
    child = run_module("saap.runtime.llama_build", ["spec"])
    assert child.returncode == 0 and child.stdout.startswith("llama-cpp-python==")

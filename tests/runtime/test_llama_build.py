import sys
from pathlib import Path

import pytest

from saap.runtime import llama_build


def test_x86_builds_have_no_native_kernels_and_arm_keeps_its_own():
    assert llama_build.cmake_args("x86_64") == ["-DGGML_NATIVE=OFF"]
    assert llama_build.cmake_args("aarch64") == [] and llama_build.cmake_args("arm64") == []


def test_the_wheel_key_follows_spec_and_flags(monkeypatch):
    key = llama_build.build_key("llama-cpp-python==0.3.36")
    assert key == llama_build.build_key("llama-cpp-python==0.3.36") and len(key) == 16
    assert key != llama_build.build_key("llama-cpp-python==0.3.35")
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: ["avx2"])  # another CPU: another wheel
    assert key != llama_build.build_key("llama-cpp-python==0.3.36")


def test_rebuild_command_bypasses_pips_wheel_cache():
    command = llama_build.rebuild_command("llama-cpp-python==0.3.36")
    assert "--no-cache-dir" in command and "--force-reinstall" in command
    assert command.endswith("llama-cpp-python==0.3.36")
    if llama_build.cmake_args():
        assert command.startswith(f'CMAKE_ARGS="{" ".join(llama_build.cmake_args())}" ')


def test_the_cli_prints_each_value_and_refuses_unknown_commands(capsys):
    assert llama_build.main(["cmake-args"]) == 0
    assert capsys.readouterr().out.strip() == " ".join(llama_build.cmake_args())
    assert llama_build.main(["frobnicate"]) == 2 and "usage" in capsys.readouterr().err


def test_the_installed_llama_cpp_is_the_build_setup_ships():
    """A native x86 build (pip's default, or a cached wheel of one) compiles AMX/AVX-512 kernels in."""
    llama_cpp = pytest.importorskip("llama_cpp")
    info = llama_cpp.llama_print_system_info().decode()
    if llama_build.machine() in ("x86_64", "amd64"):
        assert "AMX" not in info and "AVX512 = 1" not in info, info
        assert "AVX2 = 1" in info, info
    marker = Path(sys.prefix) / ".llama-cpp-build"  # written by scripts/install-llama-cpp.sh
    if marker.is_file():
        spec = f"llama-cpp-python=={llama_cpp.__version__}"
        assert marker.read_text().strip() == llama_build.build_key(spec), "built for another CPU or flags"

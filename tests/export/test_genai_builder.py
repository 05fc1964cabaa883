"""onnxruntime-genai's builder as a reference: the checks that run without its virtualenv (the build itself
is exercised by tests/pipeline/test_bench.py where SAAP_GENAI_BUILDER_PYTHON names one)."""

from __future__ import annotations

import sys

import pytest

from saap.export.genai_builder import BUILDER_PRECISIONS, build_reference, check_builder
from saap.runtime.errors import SaapError


def test_a_python_without_a_usable_builder_is_one_clear_error(tmp_path):
    with pytest.raises(SaapError, match="cannot run the builder's Python"):
        check_builder(str(tmp_path / "no-such-python"))
    # this project's Python has onnxruntime-genai, with the transformers < 5 that optimum-onnx pins
    with pytest.raises(SaapError, match="has transformers < 5"):
        check_builder(sys.executable)


def test_the_builder_has_no_int8_and_nothing_is_written_for_it(tmp_path):
    assert "int8" not in BUILDER_PRECISIONS and {"fp32", "int4"} <= set(BUILDER_PRECISIONS)
    with pytest.raises(SaapError, match="builder has no int8"):
        build_reference(sys.executable, tmp_path / "source", tmp_path / "out", "int8")
    assert list(tmp_path.iterdir()) == []

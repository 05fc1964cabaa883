import numpy as np
import pytest

from saap.export.gguf import export_gguf
from saap.runtime.checkpoint import save_checkpoint
from saap.runtime.engine import ENGINES, EngineSettings, load_engine
from saap.runtime.errors import SaapError
from saap.runtime.gguf_engine import GgufEngine
from tests.conftest import make_model
from tests.runtime.test_surgery import slice_groups

SETTINGS = EngineSettings(threads=1, n_ctx=64)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("engine")
    pruned = slice_groups(make_model(heads=6, kv_heads=2), {0: [1]}, {2: list(range(32))})
    save_checkpoint(pruned, tokenizer, root / "ckpt", {})
    export_gguf(root / "ckpt", root / "m.gguf", "f32", progress=False)
    return root / "m.gguf"


def test_gguf_is_a_registered_engine(gguf_file):
    assert "gguf" in ENGINES
    engine = load_engine("gguf", str(gguf_file), SETTINGS)
    assert isinstance(engine, GgufEngine) and engine.name == "gguf"
    assert engine.eos_token_ids == {2}


def test_decode_steps_continue_the_prefilled_sequence(gguf_file):
    engine = load_engine("gguf", str(gguf_file), SETTINGS)
    ids = [5, 9, 17, 33, 2, 40]
    full = engine.prefill(ids)
    assert full.shape == (6, 300) and full.dtype == np.float32
    np.testing.assert_allclose(engine.prefill(ids[:4]), full[:4], atol=1e-4)
    np.testing.assert_allclose(engine.decode_step(ids[4]), full[4], atol=1e-3)
    np.testing.assert_allclose(engine.decode_step(ids[5]), full[5], atol=1e-3)
    # a new prefill starts a new sequence (the cache is reset)
    np.testing.assert_allclose(engine.prefill(ids), full, atol=1e-4)


def test_generate_and_detokenize(gguf_file, tokenizer):
    engine = load_engine("gguf", str(gguf_file), SETTINGS)
    prompt = "The quick brown fox"
    assert engine.tokenize(prompt) == tokenizer(prompt)["input_ids"]
    assert engine.detokenize(engine.tokenize(prompt)) == prompt
    greedy = engine.generate(prompt, 8, stop_at_eos=False)
    assert len(greedy) == 8 and greedy == engine.generate(prompt, 8, stop_at_eos=False)
    sampled = engine.generate(prompt, 8, temperature=1.0, seed=3, stop_at_eos=False)
    assert sampled == engine.generate(prompt, 8, temperature=1.0, seed=3, stop_at_eos=False)


def test_context_overflow_is_a_clear_error(gguf_file):
    engine = load_engine("gguf", str(gguf_file), EngineSettings(threads=1, n_ctx=16))
    with pytest.raises(SaapError, match="exceeds the context size"):
        engine.prefill(list(range(3, 23)))


def test_truncated_or_missing_files_are_refused(gguf_file, tmp_path):
    data = gguf_file.read_bytes()
    for name, content in [("truncated.gguf", data[: len(data) // 2]), ("header.gguf", data[:100]), ("junk.gguf", b"x")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SaapError, match="not a valid GGUF file"):
            load_engine("gguf", str(tmp_path / name), SETTINGS)
    with pytest.raises(SaapError, match="does not exist"):
        load_engine("gguf", str(tmp_path / "missing.gguf"), SETTINGS)


def test_a_file_llama_cpp_rejects_gives_its_reason(gguf_file, tmp_path):
    import gguf

    # Same file without one tensor: gguf-py reads it, llama.cpp refuses to load it.
    reader = gguf.GGUFReader(gguf_file)
    writer = gguf.GGUFWriter(tmp_path / "missing-tensor.gguf", "deci")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    for t in reader.tensors:
        if t.name != "blk.1.ffn_up.weight":
            writer.add_tensor(t.name, t.data, raw_shape=[int(n) for n in reversed(t.shape)], raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SaapError, match="blk.1.ffn_up.weight"):
        load_engine("gguf", str(tmp_path / "missing-tensor.gguf"), SETTINGS)


def test_gpu_layers_without_gpu_support_are_refused(gguf_file):
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python can offload to a GPU")
    with pytest.raises(SaapError, match="built without GPU offload"):
        load_engine("gguf", str(gguf_file), EngineSettings(n_gpu_layers=-1))


def test_chat_template_renders_like_the_hf_tokenizer(tokenizer, tmp_path):
    import copy

    from saap.export.gguf import write_gguf

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = (
        "{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}{{ bos_token }}assistant:{% endif %}"
    )
    model = make_model()
    write_gguf(model.config, model.state_dict(), chat, tmp_path / "chat.gguf", "f16", progress=False)
    engine = load_engine("gguf", str(tmp_path / "chat.gguf"), SETTINGS)
    messages = [{"role": "user", "content": "The quick brown fox"}]
    expected = chat.apply_chat_template(messages, add_generation_prompt=True)
    assert engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True) == expected
    assert engine.tokenizer.apply_chat_template(messages, tokenize=False) == chat.apply_chat_template(
        messages, tokenize=False
    )
    assert load_engine("gguf", str(gguf_file_without_template(tmp_path, tokenizer)), SETTINGS).tokenizer is None


def gguf_file_without_template(tmp_path, tokenizer):
    from saap.export.gguf import write_gguf

    model = make_model()
    write_gguf(model.config, model.state_dict(), tokenizer, tmp_path / "plain.gguf", "f16", progress=False)
    return tmp_path / "plain.gguf"


# --- the native-crash guard ------------------------------------------------------------------------------


def sigill_child(module, args, threads=None):
    """What the probe's child does on a llama.cpp build this CPU cannot run: it dies by SIGILL."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"])


def test_a_crash_in_the_probe_is_one_error_line_with_the_signal_and_the_rebuild_command(gguf_file, monkeypatch):
    from saap.runtime import gguf_engine
    from saap.runtime.llama_build import rebuild_command

    monkeypatch.setattr(gguf_engine, "_probed", set())
    monkeypatch.setattr(gguf_engine, "run_module", sigill_child)
    with pytest.raises(gguf_engine.NativeCrash) as error:
        load_engine("gguf", str(gguf_file), SETTINGS)
    message = str(error.value)
    assert "killed by SIGILL (illegal instruction)" in message and str(gguf_file) in message
    assert rebuild_command() in message and "\n" not in message


def test_generate_reports_the_crash_as_one_line_and_exit_2(gguf_file, monkeypatch, capsys):
    from saap.pipeline.cli import main
    from saap.runtime import gguf_engine

    monkeypatch.setattr(gguf_engine, "_probed", set())
    monkeypatch.setattr(gguf_engine, "run_module", sigill_child)
    argv = ["generate", "--engine", "gguf", "--model", str(gguf_file), "--prompt", "The quick", "--threads", "1"]
    assert main(argv) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("saap: error: llama.cpp running") and "SIGILL" in errors[0]


def test_the_probe_runs_llama_cpp_in_a_child_once_per_file(gguf_file, monkeypatch):
    from saap.runtime import gguf_engine

    calls, real = [], gguf_engine.run_module

    def counted(module, args, threads=None):
        calls.append(real(module, args, threads))
        return calls[-1]

    monkeypatch.setattr(gguf_engine, "_probed", set())
    monkeypatch.setattr(gguf_engine, "run_module", counted)
    load_engine("gguf", str(gguf_file), SETTINGS)
    load_engine("gguf", str(gguf_file), SETTINGS)
    assert len(calls) == 1 and calls[0].returncode == 0, calls[0].stderr[-1000:]
    load_engine("gguf", str(gguf_file), EngineSettings(threads=1, n_ctx=64, probe=False))
    assert len(calls) == 1


@pytest.mark.real_model
@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_installed_llama_cpp_runs_the_real_model_quantized_on_this_cpu(quant, tmp_path):
    """Fails when this llama.cpp build cannot run a quantized model on this CPU (the AMX SIGILL of a
    native build on our Intel VMs): prefill and decode of SmolLM2-135M, first in a child process so
    that a crash fails this test instead of killing pytest."""
    import json

    from saap.runtime.gguf_engine import build_info
    from saap.runtime.native import exit_description, run_module

    path = export_gguf("smollm2-135m", tmp_path / f"dense-{quant}.gguf", quant, progress=False)["out"]
    config = {"path": str(path), "device": "cpu", "threads": 1, "n_gpu_layers": 0}
    child = run_module("saap.runtime.gguf_engine", [json.dumps(config)], threads=1)
    assert child.returncode == 0, f"{exit_description(child.returncode)} with {build_info()}: {child.stderr[-800:]}"
    engine = load_engine("gguf", str(path), EngineSettings(threads=1, n_ctx=64))
    ids = engine.tokenize("The capital of France is")
    engine.prefill(ids[:-1])  # the batched kernels, then the single-row ones for the last token
    logits = engine.decode_step(ids[-1])
    rank = int((logits > logits[engine.tokenize(" Paris")[-1]]).sum())
    # measured: " Paris" is the top token in q8_0, the fifth in q4_0 (a 4-bit 135M model degrades)
    assert np.isfinite(logits).all() and rank < 10, rank

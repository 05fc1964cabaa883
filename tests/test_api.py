"""``import saap``: the Python API, on tiny models built in-process."""

import subprocess
import sys

import torch

import saap
from saap.runtime.checkpoint import load_checkpoint
from saap.runtime.surgery import model_parameter_count


def test_import_saap_is_light_and_lists_its_api():
    code = "import saap, sys; print('torch' in sys.modules, sorted(saap.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False") and "'prune'" in out and "'load'" in out


def test_load_prune_save_and_perplexity(hf_dir, text_file, tmp_path):
    loaded = saap.load(str(hf_dir))
    before = model_parameter_count(loaded.model)
    pruned = saap.prune(loaded, 0.3, out=tmp_path / "p", method="magnitude", calibration=str(text_file),
                        num_samples=2, seq_len=16, align=8, progress=False)  # fmt: skip
    assert pruned.model is loaded.model and pruned.record["params_before"] == before
    assert model_parameter_count(pruned.model) == pruned.record["params_after"] < before
    reloaded, _, _ = load_checkpoint(tmp_path / "p")
    ids = torch.tensor([[1, 5, 9, 13]])
    assert torch.allclose(reloaded(ids).logits, pruned.model(ids).logits, atol=1e-5)
    result = saap.perplexity(pruned.model, pruned.tokenizer, "wikitext2", seq_len=16, limit=2, progress=False)
    assert result["windows"] == 2 and result["perplexity"] > 1


def test_an_unknown_api_name_is_an_attribute_error():
    try:
        saap.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("expected AttributeError")

import numpy as np
import pytest
import torch

from saap.runtime.checkpoint import save_checkpoint
from saap.runtime.engine import EngineSettings, load_engine
from saap.runtime.errors import SaapError
from tests.runtime.test_surgery import slice_groups


@pytest.fixture
def checkpoint(tiny_model, tokenizer, tmp_path):
    pruned = slice_groups(tiny_model, {0: [0]}, {1: list(range(16))})
    save_checkpoint(pruned, tokenizer, tmp_path / "ckpt", {})
    return tmp_path / "ckpt", pruned


def test_torch_engine_decode_steps_match_a_full_forward(checkpoint):
    path, model = checkpoint
    engine = load_engine("torch", str(path), EngineSettings(threads=1))
    ids = [5, 9, 17, 33, 2, 40]
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits[0].numpy()
    # fp32 sums in another order (a cached step vs one full pass): 1.1e-5 seen on an Intel AVX-512 VM
    np.testing.assert_allclose(engine.prefill(ids[:4]), full[:4], atol=5e-5)
    np.testing.assert_allclose(engine.decode_step(ids[4]), full[4], atol=5e-5)
    np.testing.assert_allclose(engine.decode_step(ids[5]), full[5], atol=5e-5)


def test_torch_engine_greedy_generation_matches_transformers(checkpoint):
    path, model = checkpoint
    engine = load_engine("torch", str(path))
    prompt = [5, 9, 17]
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert engine.generate(prompt, 8, stop_at_eos=False) == expected[0, 3:].tolist()
    sampled = engine.generate(prompt, 8, temperature=1.0, seed=1, stop_at_eos=False)
    assert sampled == engine.generate(prompt, 8, temperature=1.0, seed=1, stop_at_eos=False)


def test_unknown_engine_and_missing_device_are_clear_errors(checkpoint):
    with pytest.raises(SaapError, match="unknown engine"):
        load_engine("tensorflow", str(checkpoint[0]))
    if not torch.cuda.is_available():
        with pytest.raises(SaapError, match="no CUDA GPU"):
            load_engine("torch", str(checkpoint[0]), EngineSettings(device="cuda"))

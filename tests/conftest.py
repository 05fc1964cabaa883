"""Tiny random models of every supported family and tokenizers, built in-process (no downloads, milliseconds)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A pruned model keeps its most important heads. "
    "Structured pruning removes whole attention groups and MLP channels, so the matrices get smaller. "
    "Edge devices such as laptops and Jetson boards read every weight once per generated token. "
) * 40


def make_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


# What each family's tiny config sets beyond the shared sizes: the features saap must carry through
# (Qwen2's q/k/v biases are always on; Gemma 3's window is short so the tests' prompts cross it, and
# its layer pattern is llama.cpp's: every 6th layer global).
FAMILY_EXTRAS = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {},
    "gemma3_text": {"sliding_window": 8, "query_pre_attn_scalar": 16},
}
FAMILY_LAYERS = {"gemma3_text": 6}  # one global layer among five sliding ones


def make_model(
    heads: int = 4,
    kv_heads: int = 2,
    layers: int | None = None,
    tied: bool = True,
    hidden: int = 64,
    intermediate: int = 128,
    head_dim: int = 16,
    vocab_size: int = 300,
    seed: int = 0,
    family: str = "llama",
) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        family,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers or FAMILY_LAYERS.get(family, 3),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **FAMILY_EXTRAS[family],
    )
    model = AutoModelForCausalLM.from_config(config)
    # Random init is small; scale up so that removing a group visibly changes the logits. Biases and
    # norms are randomised too, so a bias or norm written to the wrong place shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


# (heads, kv_heads, tied): multi-head attention and grouped-query attention, tied and untied.
ARCHITECTURES = {
    "mha-tied": (4, 4, True),
    "gqa-tied": (6, 2, True),
    "mha-untied": (4, 4, False),
    "gqa-untied": (4, 2, False),
}


@pytest.fixture(params=list(ARCHITECTURES))
def tiny_model(request) -> PreTrainedModel:
    heads, kv_heads, tied = ARCHITECTURES[request.param]
    return make_model(heads=heads, kv_heads=kv_heads, tied=tied)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text(SAMPLE_TEXT)
    return path


@pytest.fixture
def hf_dir(tmp_path, tokenizer):
    """A plain Hugging Face checkpoint directory of a tiny GQA model."""
    path = tmp_path / "tiny-hf"
    model = make_model(heads=4, kv_heads=2, layers=4, tied=True, intermediate=256)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

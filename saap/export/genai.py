"""What onnxruntime-genai needs beside ``model.onnx`` to run a saap export unchanged
(``og.Model(export_dir)``): a ``genai_config.json``, and a tokenizer its tokenizer can read.

The config follows the one onnxruntime-genai's model builder writes for Llama, with the family's
model ``type`` (``Family.genai_type``). Two choices:
- ``search.past_present_share_buffer`` is false: the traced graph grows its KV cache by ``Concat``,
  so past and present cannot share one pre-allocated buffer.
- The head counts are the largest of any layer. onnxruntime-genai reads each layer's cache shape
  from the graph's inputs, so per-layer counts (a pruned model) run as they are.

Tokenizers converted from a GGUF by transformers carry a SentencePiece-style decoder chain around
a byte-level BPE (``LlamaTokenizerFast``). transformers decodes it correctly. onnxruntime-genai's
tokenizer does not: it encodes "The capital of France is" to ids with -1 between them. The export
therefore writes such a tokenizer in its GPT-2 form: the byte-level decoder alone, no normalizer,
``GPT2Tokenizer``. transformers then encodes and decodes it to the same ids and text as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from saap.runtime.families import family_of
from saap.runtime.surgery import head_dim, layer_shapes

CONFIG_FILE = "genai_config.json"


def genai_config(config, generation_config, filename: str) -> dict[str, Any]:
    shapes = layer_shapes(config)
    eos = generation_config.eos_token_id if generation_config is not None else None
    eos = eos if eos is not None else config.eos_token_id
    first_eos = eos[0] if isinstance(eos, list) else eos
    context = config.max_position_embeddings
    return {
        "model": {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else first_eos,
            "context_length": context,
            "type": family_of(config).genai_type,
            "vocab_size": config.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": head_dim(config),
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": max(s.num_attention_heads for s in shapes),
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": max(s.num_key_value_heads for s in shapes),
            },
        },
        "search": {
            "do_sample": False,
            "max_length": min(context, 2048),
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
            "early_stopping": True,
            "length_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0,
        },
    }


def byte_level_tokenizer(directory: Path) -> bool:
    """Rewrite a byte-level BPE tokenizer in ``directory`` in its GPT-2 form; False if it is not one."""
    tokenizer_file, config_file = directory / "tokenizer.json", directory / "tokenizer_config.json"
    if not tokenizer_file.is_file() or not config_file.is_file():
        return False
    tokenizer = json.loads(tokenizer_file.read_text())
    if (tokenizer.get("pre_tokenizer") or {}).get("type") != "ByteLevel" or tokenizer["model"]["type"] != "BPE":
        return False
    tokenizer["normalizer"] = None
    tokenizer["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tokenizer_file.write_text(json.dumps(tokenizer, ensure_ascii=False, indent=2) + "\n")
    settings = json.loads(config_file.read_text())
    settings["tokenizer_class"] = "GPT2Tokenizer"
    config_file.write_text(json.dumps(settings, ensure_ascii=False, indent=2) + "\n")
    return True


def write_genai_files(directory: Path, config: dict[str, Any]) -> None:
    """``genai_config.json`` (``config``, from ``genai_config`` or the fused graph's variant) in
    ``directory``, and the tokenizer there in a form onnxruntime-genai reads."""
    byte_level_tokenizer(directory)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

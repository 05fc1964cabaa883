"""The three methods' adapters: attached before training, merged back into plain weights after."""

from __future__ import annotations

import ctypes
import gc

import torch

from saap.pipeline.finetune.group_lora import apply_group_lora, merge_group_lora
from saap.pipeline.finetune.settings import TARGET_MODULES, FinetuneSettings


def _release_float_weights(model: torch.nn.Module) -> None:
    """Let the float weights that group-lora replaced leave memory.

    A checkpoint's tensors are views of one memory-mapped safetensors file, whose pages count in RSS
    once read (quantizing reads them all) and stay mapped while any tensor of the file lives: the
    embedding alone would keep every dropped linear resident. So the tensors kept (embeddings,
    norms) get their own memory, and freed heap is handed back (glibc keeps it otherwise)."""
    for p in model.parameters():
        if not p.requires_grad:  # the frozen float part; adapters are fresh tensors already
            p.data = p.data.clone()  # in place on the Parameter: tied embeddings stay tied
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.clone()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _attach_adapters(model: torch.nn.Module, settings: FinetuneSettings) -> tuple[torch.nn.Module, int]:
    """The model to train and the number of adapted (or trained) linears."""
    if settings.method == "full":
        trained = 0
        for name, p in model.named_parameters():
            # The tied embedding is the vocabulary's, which pruning never touched: it stays frozen.
            p.requires_grad_("embed_tokens" not in name and "lm_head" not in name)
            trained += name.endswith("proj.weight")
        return model, trained
    if settings.method == "group-lora":
        paths = apply_group_lora(model, settings.bits, settings.group_size, settings.rank, settings.alpha)
        _release_float_weights(model)  # the memory saving: ~1 byte per base weight instead of 4
        return model, len(paths)
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=TARGET_MODULES,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    adapted = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
    return peft_model, adapted


def _merge(trained: torch.nn.Module, settings: FinetuneSettings):
    """(merged float causal LM, quantized form or None)."""
    if settings.method == "group-lora":
        quantized = merge_group_lora(trained)
        return trained, quantized
    if settings.method == "full":
        return trained, None
    return trained.merge_and_unload(), None

"""``saap finetune``: recover a pruned model with a short fine-tune, merged back into plain weights.

Methods
    group-lora  SAAP's group fine-tuning (QA-LoRA): group-quantized frozen base, group-pooled LoRA
                adapters, folded exactly into the groups' offsets (see ``saap.pipeline.finetune.group_lora``).
    lora        plain LoRA through ``peft``, merged with ``merge_and_unload`` (LLM-Pruner's recovery).
    full        every kept weight of the pruned model (the embedding, tied to the head, stays frozen).

Objective
    Without ``teacher``: the language-model loss on the data. With ``teacher`` (``parent``: the dense
    model the checkpoint was pruned from): distillation, KL divergence to the teacher's next-token
    distribution on the same text, optionally mixed with the LM loss (see ``saap.pipeline.finetune.distill``).

The held-out loss is measured every ``eval_steps`` and, by default, the adapter of its lowest
value is the one merged (``KeepBest``), since a long budget on ~1k records over-fits.

Training goes through the Hugging Face ``Trainer`` (so ``accelerate launch`` runs it data-parallel),
with its checkpoints rewritten as safetensors + JSON (no pickle). Intermediate checkpoints live in
``<out>.partial/``; re-running the same command after an interruption continues from the last one,
and ``<out>`` appears only when everything is written.
"""

from __future__ import annotations

from saap.pipeline.finetune.adapters import _attach_adapters
from saap.pipeline.finetune.callbacks import ElapsedTime, KeepBest, LossProgress
from saap.pipeline.finetune.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE,
    Collator,
    alpaca_prompt,
    evaluation_loss,
    read_data,
    read_records,
    split_examples,
    tokenize_examples,
)
from saap.pipeline.finetune.recipe import FinetuneRecipe, finetune, training_arguments
from saap.pipeline.finetune.settings import (
    BITS,
    DEFAULT_MAX_STEPS,
    DEFAULT_METHODS,
    DEFAULT_RANKS,
    GROUP_SIZES,
    KEEP,
    METHODS,
    TARGET_MODULES,
    FinetuneSettings,
)
from saap.pipeline.finetune.state import (
    ADAPTER_FILE,
    BEST_ADAPTER_FILE,
    BEST_JSON,
    ELAPSED_FILE,
    OPTIMIZER_JSON,
    OPTIMIZER_TENSORS,
    RUN_FILE,
    last_checkpoint,
    load_state,
    load_trainable,
    save_state,
    saved_checkpoint,
    trainable_state,
)
from saap.pipeline.finetune.trainer import SafetensorsTrainer

__all__ = [
    "ADAPTER_FILE",
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "BEST_ADAPTER_FILE",
    "BEST_JSON",
    "BITS",
    "DEFAULT_MAX_STEPS",
    "DEFAULT_METHODS",
    "DEFAULT_RANKS",
    "ELAPSED_FILE",
    "GROUP_SIZES",
    "IGNORE",
    "KEEP",
    "METHODS",
    "OPTIMIZER_JSON",
    "OPTIMIZER_TENSORS",
    "RUN_FILE",
    "TARGET_MODULES",
    "Collator",
    "ElapsedTime",
    "FinetuneRecipe",
    "FinetuneSettings",
    "KeepBest",
    "LossProgress",
    "SafetensorsTrainer",
    "_attach_adapters",
    "alpaca_prompt",
    "evaluation_loss",
    "finetune",
    "last_checkpoint",
    "load_state",
    "load_trainable",
    "read_data",
    "read_records",
    "save_state",
    "saved_checkpoint",
    "split_examples",
    "tokenize_examples",
    "trainable_state",
    "training_arguments",
]

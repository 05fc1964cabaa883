"""``saap finetune``: recover a pruned model with a short fine-tune, merged back into plain weights.

Methods
    group-lora  SAAP's group fine-tuning (QA-LoRA): group-quantized frozen base, group-pooled LoRA
                adapters, folded exactly into the groups' offsets (see ``pipeline.group_lora``).
    lora        plain LoRA through ``peft``, merged with ``merge_and_unload`` (LLM-Pruner's recovery).
    full        every kept weight of the pruned model (the embedding, tied to the head, stays frozen).

Objective
    Without ``teacher``: the language-model loss on the data. With ``teacher`` (``parent``: the dense
    model the checkpoint was pruned from): distillation, KL divergence to the teacher's next-token
    distribution on the same text, optionally mixed with the LM loss (see ``pipeline.distill``).

The held-out loss is measured every ``eval_steps`` and, by default, the adapter of its lowest
value is the one merged (``KeepBest``), since a long budget on ~1k records over-fits.

Training goes through the Hugging Face ``Trainer`` (so ``accelerate launch`` runs it data-parallel),
with its checkpoints rewritten as safetensors + JSON (no pickle). Intermediate checkpoints live in
``<out>.partial/``; re-running the same command after an interruption continues from the last one,
and ``<out>`` appears only when everything is written.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from pipeline.data import resolve_data_files
from pipeline.distill import Distiller, load_teacher
from pipeline.group_lora import (
    BITS,
    GROUP_SIZES,
    QUANTIZED_DIR,
    apply_group_lora,
    check_group_size,
    merge_error,
    merge_group_lora,
    save_quantized,
)
from runtime.checkpoint import METADATA_FILE, is_checkpoint, save_checkpoint, sha256_file, write_json_atomic
from runtime.errors import SaapError
from runtime.memory import PhasePeakRss, peak_rss_mb
from runtime.surgery import model_parameter_count

METHODS = ("group-lora", "lora", "full")
KEEP = ("best", "last")
# group-lora's A reads in/g pooled inputs instead of in, so at one rank it trains about half of
# LoRA's parameters; rank 16 gives it LoRA-rank-8's count. Measured (held-out Alpaca loss, SAAP
# 20 %, 20 steps): group-lora r8 2.697, r16 2.591, lora r8 2.632 (benchmarks/results/recovery-20-*).
DEFAULT_RANKS = {"group-lora": 16, "lora": 8}
# The method when none is given, by objective. Distilling SAAP 20 % for 40 steps on plain text, all
# kept weights reached a held-out loss of 4.300 against 4.380 (group-lora) and 4.382 (lora) at the
# same ~4 s a step (benchmarks/results/recovery-probe-*). On instruction data without a teacher,
# group-lora recovered most (benchmarks/results/recovery-smollm2-135m.md).
DEFAULT_METHODS = {"distill": "full", "lm": "group-lora"}
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100  # label of tokens left out of the loss (prompt and padding)

# The Stanford Alpaca prompt template (with and without an input field).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_TENSORS, OPTIMIZER_JSON = "optimizer.safetensors", "optimizer.json"
RUN_FILE = "run.json"
BEST_ADAPTER_FILE, BEST_JSON = "best_adapter.safetensors", "best.json"
ELAPSED_FILE = "elapsed.json"
DEFAULT_MAX_STEPS = 200


@dataclass
class FinetuneSettings:
    """Every hyper-parameter of a fine-tuning run (all recorded in the output's saap.json).

    method: "group-lora" (SAAP), "lora" (peft baseline) or "full" (all kept weights); default
        ``DEFAULT_METHODS``: full when distilling, group-lora otherwise.
    teacher: None (language-model loss), "parent" (the dense model recorded in saap.json) or a
        model spec: distil from it (``pipeline.distill``).
    temperature, kl_weight: distillation's softmax temperature, and the KL term's weight (the LM
        loss gets 1 - kl_weight).
    bits, group_size: group-lora's base quantization (4|8 bits, groups of 32|64|128 input columns).
    rank, alpha, dropout: adapter rank (default per method, ``DEFAULT_RANKS``), scaling numerator
        (scale = alpha / rank; default 2 x rank), dropout (lora only).
    max_steps: optimizer steps; None trains for ``epochs`` passes over the training split instead.
    batch_size, grad_accum: sequences per device per micro-batch, micro-batches per optimizer step.
    lr, warmup_ratio, weight_decay: AdamW with a cosine schedule after a linear warm-up.
    seq_len: tokens per example (longer ones are truncated, and the run says so once).
    val_size: examples held out for the validation loss (at most a tenth of the data).
    save_steps: steps between resumable checkpoints in ``<out>.partial/``.
    logging_steps: steps between logged training losses.
    eval_steps: steps between held-out loss evaluations during training (and at the last step);
        0 evaluates only before and after.
    keep: which adapter is merged: "best" (the lowest held-out loss seen, as the Trainer's
        ``load_best_model_at_end``) or "last". Without a held-out slice, "last".
    seed: seeds the adapter init, the data split and order (two runs give identical weights).
    """

    method: str | None = None  # None: by objective, DEFAULT_METHODS
    bits: int = 4
    group_size: int = 32
    rank: int | None = None
    alpha: float | None = None
    dropout: float = 0.0
    max_steps: int | None = DEFAULT_MAX_STEPS
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 3e-4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    seq_len: int = 256
    val_size: int = 32
    save_steps: int = 25
    logging_steps: int = 10
    eval_steps: int = 50
    keep: str = "best"
    seed: int = 0
    teacher: str | None = None
    temperature: float = 1.0
    kl_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.method is None:
            self.method = DEFAULT_METHODS["distill" if self.teacher else "lm"]
        if self.rank is None:
            self.rank = DEFAULT_RANKS.get(self.method, 8)
        if self.alpha is None:
            self.alpha = 2.0 * self.rank

    def validate(self) -> None:
        if self.method not in METHODS:
            raise SaapError(f"unknown fine-tuning method '{self.method}' (choose from {', '.join(METHODS)})")
        if self.bits not in BITS:
            raise SaapError(f"--bits must be one of {', '.join(map(str, BITS))}")
        if self.group_size not in GROUP_SIZES:
            raise SaapError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}")
        positive = {
            "--rank": self.rank,
            "--batch-size": self.batch_size,
            "--grad-accum": self.grad_accum,
            "--save-steps": self.save_steps,
            "--logging-steps": self.logging_steps,
        }
        for flag, value in positive.items():
            if value < 1:
                raise SaapError(f"{flag} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise SaapError("--max-steps must be at least 1")
        if self.max_steps is None and not self.epochs > 0:
            raise SaapError("--epochs must be positive")
        if not self.lr > 0 or self.alpha <= 0:
            raise SaapError("--lr and --alpha must be positive")
        if not 0 <= self.dropout < 1:
            raise SaapError("--dropout must be in [0, 1)")
        if self.seq_len < 8:
            raise SaapError("--seq-len must be at least 8")
        if self.val_size < 0:
            raise SaapError("--val-size must be >= 0")
        if self.eval_steps < 0:
            raise SaapError("--eval-steps must be >= 0")
        if self.keep not in KEEP:
            raise SaapError(f"--keep must be one of {', '.join(KEEP)}")
        if not self.temperature > 0:
            raise SaapError("--temperature must be positive")
        if not 0 <= self.kl_weight <= 1:
            raise SaapError("--kl-weight must be in [0, 1]")


# ----------------------------------------------------------------------------------------- data


def read_records(path: Path) -> tuple[str, list[Any]]:
    """``("alpaca", records)`` or ``("text", documents)`` from a .json/.jsonl/.txt file; bad input
    raises a one-line SaapError. Runs before the model load, so a broken file fails fast."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SaapError(f"cannot read data file '{path}': {e}") from None
    if not raw.strip():
        raise SaapError(f"data file '{path}' is empty")
    if path.suffix not in (".json", ".jsonl"):
        return "text", [raw]
    try:
        if path.suffix == ".jsonl":
            records = []
            for n, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SaapError(f"data file '{path}' line {n} is not valid JSON: {e}") from None
        else:
            records = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SaapError(f"data file '{path}' is not valid JSON: {e}") from None
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list) or not records:
        raise SaapError(f"data file '{path}' holds no records (expected a list of Alpaca records)")
    if not all(isinstance(r, dict) for r in records):
        raise SaapError(f"data file '{path}': every record must be a JSON object")
    if all("instruction" not in r and "output" not in r and isinstance(r.get("text"), str) for r in records):
        return "text", [r["text"] for r in records]
    for n, record in enumerate(records):
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                what = "has no" if key not in record else "has a non-string"
                raise SaapError(
                    f"data file '{path}': record {n} {what} '{key}' (Alpaca format: instruction, input, output)"
                )
        if not isinstance(record.get("input", ""), str):
            raise SaapError(f"data file '{path}': record {n} has a non-string 'input'")
    return "alpaca", records


def alpaca_prompt(record: dict[str, str]) -> str:
    template = ALPACA_PROMPT if record.get("input", "").strip() else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def tokenize_examples(
    kind: str, records: list[Any], tokenizer: PreTrainedTokenizerBase, seq_len: int
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """Token ids and labels; prompt tokens of Alpaca records get label -100 (not in the loss).

    Alpaca: BOS (if the tokenizer adds one) + prompt + output + EOS, cut at ``seq_len``; an example
    with no output token left is dropped. Plain text: consecutive ``seq_len``-token windows.
    """
    stats = {"truncated": 0, "dropped": 0}
    examples = []
    if kind == "text":
        ids = tokenizer("\n\n".join(records), add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - 1, seq_len):
            window = ids[start : start + seq_len]
            if len(window) >= 2:
                examples.append({"input_ids": window, "labels": list(window)})
        return examples, stats
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and _adds_bos(tokenizer) else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for record in records:
        # Tokenized apart so the prompt/response boundary (and so the mask) is exact.
        prompt = bos + tokenizer(alpaca_prompt(record), add_special_tokens=False)["input_ids"]
        answer = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + eos
        ids, labels = prompt + answer, [IGNORE] * len(prompt) + answer
        if len(ids) > seq_len:
            stats["truncated"] += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
        if all(label == IGNORE for label in labels[1:]):
            stats["dropped"] += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    return examples, stats


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    probe = tokenizer("a")["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


class Collator:
    """Right-pads a batch to its longest example; padding is masked out and not in the loss."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, e in enumerate(batch):
            n = len(e["input_ids"])
            ids[row, :n] = torch.tensor(e["input_ids"])
            labels[row, :n] = torch.tensor(e["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def split_examples(examples: list, val_size: int, seed: int) -> tuple[list, list]:
    """Seeded held-out slice: ``val_size`` examples, at most a tenth of the data."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(val_size, len(examples) // 10)
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    return train, val


@torch.no_grad()
def evaluation_loss(model: torch.nn.Module, examples: list, collate: Collator, batch_size: int) -> float | None:
    """Mean next-token loss over every labelled token of ``examples`` (None when there are none)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        ).item()
        count += int((labels != IGNORE).sum())
    model.train(was_training)
    return total / count if count else None


# ----------------------------------------------------------------- pickle-free Trainer checkpoints


def _encode(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """JSON for nested state dicts; tensors go to ``tensors`` (safetensors), dict keys keep their
    type (the optimizer's state is keyed by int and silently ignores str keys on load)."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(obj, np.ndarray):
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj).contiguous()
        return {"ndarray": key, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {"dict": [[k, _encode(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
        return {"list": items} if isinstance(obj, list) else {"tuple": items}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    if isinstance(obj, np.generic):
        return {"value": obj.item()}
    raise TypeError(f"cannot store a {type(obj).__name__} in a safetensors + JSON checkpoint")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "ndarray" in node:
        return tensors[node["ndarray"]].numpy().astype(node["dtype"])
    if "dict" in node:
        return {k: _decode(v, tensors) for k, v in node["dict"]}
    if "list" in node:
        return [_decode(v, tensors) for v in node["list"]]
    if "tuple" in node:
        return tuple(_decode(v, tensors) for v in node["tuple"])
    return node["value"]


def save_state(directory: Path, stem: str, state: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, "s")
    save_file(tensors, directory / f"{stem}.safetensors")
    (directory / f"{stem}.json").write_text(json.dumps(tree) + "\n")


def load_state(directory: Path, stem: str) -> Any:
    tree = json.loads((directory / f"{stem}.json").read_text())
    return _decode(tree, load_file(directory / f"{stem}.safetensors"))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the parameters being trained (the adapters)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` (from ``trainable_state`` or a checkpoint) into the model's trainable parameters."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        raise SaapError(f"{source} does not match this run's adapters")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def saved_checkpoint(args: TrainingArguments, state) -> Path | None:
    """The checkpoint directory the Trainer just wrote, on the process that writes files."""
    checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
    return checkpoint if state.is_world_process_zero and checkpoint.is_dir() else None


class SafetensorsTrainer(Trainer):
    """A ``Trainer`` whose checkpoints hold only safetensors + JSON: the trainable (adapter)
    parameters, optimizer + scheduler state, RNG states; no ``torch.save`` anywhere, and no
    ``training_args.bin``. ``trainer_state.json`` is the Trainer's own JSON. With a ``distiller``
    the loss is the distillation loss instead of the model's own."""

    def __init__(self, *args, distiller: Distiller | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.distiller = distiller
        if distiller is not None:
            # The distiller returns a per-micro-batch mean, so the Trainer must divide by the
            # accumulation steps itself (it does not for models whose loss takes num_items_in_batch).
            self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.distiller is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return self.distiller(model, inputs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        directory = Path(output_dir or self.args.output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(trainable_state(self.model), directory / ADAPTER_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        state = load_file(Path(resume_from_checkpoint) / ADAPTER_FILE)
        load_trainable(self.model if model is None else model, state, f"checkpoint '{resume_from_checkpoint}'")

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.args.should_save:
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.lr_scheduler.state_dict()}
            save_state(Path(output_dir), "optimizer", state)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        state = load_state(Path(checkpoint), "optimizer")
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            save_state(Path(output_dir), "scaler", scaler.state_dict())

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is not None and scaler is not None and (Path(checkpoint) / "scaler.json").is_file():
            scaler.load_state_dict(load_state(Path(checkpoint), "scaler"))

    def _save_rng_state(self, output_dir: str) -> None:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.random.get_rng_state_all()
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        save_state(Path(output_dir), f"rng_state_{self.args.process_index}", state)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or not (Path(checkpoint) / f"rng_state_{self.args.process_index}.json").is_file():
            return
        state = load_state(Path(checkpoint), f"rng_state_{self.args.process_index}")
        python = state["python"]
        random.setstate((python[0], tuple(python[1]), python[2]))
        np.random.set_state(state["numpy"])
        torch.random.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.random.set_rng_state_all(state["cuda"])


class LossProgress(ProgressCallback):
    """Trainer's progress bar with the latest training loss as its postfix (instead of a printed
    dict per logging step)."""

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)


class ElapsedTime(TrainerCallback):
    """Training seconds summed over interruptions, kept beside every checkpoint, so a resumed run
    still reports its whole training time."""

    def __init__(self, previous: float):
        self.previous, self.started = previous, time.perf_counter()

    def seconds(self) -> float:
        return self.previous + time.perf_counter() - self.started

    def on_save(self, args, state, control, **kwargs) -> None:
        if checkpoint := saved_checkpoint(args, state):
            write_json_atomic(checkpoint / ELAPSED_FILE, {"train_seconds": self.seconds()})


class KeepBest(TrainerCallback):
    """Held-out loss every ``every`` steps (and at the last step), with a copy of the adapter
    weights at the lowest one: the Trainer's ``load_best_model_at_end``, but with this module's
    per-token loss and pickle-free checkpoints. Over a long budget on ~1k Alpaca records the
    adapters start to memorise (training loss keeps falling while the held-out loss rises), so
    the merged model is the best one seen, not the last. The curve and the best copy go into every
    checkpoint, so a resumed run keeps them."""

    def __init__(self, held_out_loss: Callable[[torch.nn.Module], float | None], every: int, resume_from: Path | None):
        self.held_out_loss, self.every = held_out_loss, every
        self.log: list[tuple[int, float]] = []
        self.best: tuple[int, float] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        if resume_from is not None and (resume_from / BEST_JSON).is_file():
            saved = json.loads((resume_from / BEST_JSON).read_text())
            self.log = [tuple(entry) for entry in saved["log"]]
            self.best = tuple(saved["best"]) if saved["best"] else None
            if (resume_from / BEST_ADAPTER_FILE).is_file():
                self.best_state = load_file(resume_from / BEST_ADAPTER_FILE)

    def on_step_end(self, args, state, control, model=None, **kwargs) -> None:
        last = state.global_step >= state.max_steps
        if not (last or (self.every and state.global_step % self.every == 0)):
            return
        loss = self.held_out_loss(model)
        self.log.append((state.global_step, loss))
        if loss is not None and math.isfinite(loss) and (self.best is None or loss < self.best[1]):
            self.best, self.best_state = (state.global_step, loss), trainable_state(model)

    def on_save(self, args, state, control, **kwargs) -> None:
        if checkpoint := saved_checkpoint(args, state):
            if self.best_state is not None:
                save_file(self.best_state, checkpoint / BEST_ADAPTER_FILE)
            write_json_atomic(checkpoint / BEST_JSON, {"log": self.log, "best": self.best})

    def restore_best(self, model: torch.nn.Module) -> None:
        if self.best_state is not None:
            load_trainable(model, self.best_state, "the best adapter")


def last_checkpoint(partial: Path) -> Path | None:
    steps = [
        (int(p.name.rsplit("-", 1)[1]), p)
        for p in partial.glob("checkpoint-*")
        if p.name.rsplit("-", 1)[1].isdigit() and (p / "trainer_state.json").is_file() and (p / ADAPTER_FILE).is_file()
    ]
    return max(steps)[1] if steps else None


# ------------------------------------------------------------------------------------ the stage


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
    """(merged float LlamaForCausalLM, quantized form or None)."""
    if settings.method == "group-lora":
        quantized = merge_group_lora(trained)
        return trained, quantized
    if settings.method == "full":
        return trained, None
    return trained.merge_and_unload(), None


def _run_identity(spec: str, parent_sha: str | None, files: list[dict[str, str]], settings: FinetuneSettings):
    return {"model": spec, "parent_sha256": parent_sha, "data": files} | {"settings": asdict(settings)}


def read_data(data: str | list[str]) -> tuple[list[Path], str, list[Any]]:
    """(paths, kind, records) of one or more data files of one kind (all Alpaca, or all text)."""
    paths = resolve_data_files(data)
    if not paths:
        raise SaapError("no data file given")
    kinds, records = set(), []
    for path in paths:
        kind, these = read_records(path)
        kinds.add(kind)
        records += these
    if len(kinds) > 1:
        raise SaapError("the data files mix Alpaca records and plain text: give files of one kind")
    return paths, kinds.pop(), records


def finetune(
    model: str,
    data: str | list[str],
    out: str,
    settings: FinetuneSettings,
    progress: bool = True,
    overwrite: bool = False,
    callbacks: list[TrainerCallback] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` on ``data``, merge the adapters and write a saap checkpoint at ``out``.

    model: anything ``runtime.models.load_model`` accepts (a saap checkpoint dir, alias, .gguf, HF dir).
    data: Alpaca-format .json/.jsonl (instruction, input, output) or plain text (.txt, or .jsonl
        of {"text": ...}), one file or a list of files of one kind; relative paths are also tried
        under the shared data dir.
    out: the merged float checkpoint (project format). For group-lora, ``out/quantized/`` also holds
        the quantized form (``<linear>.qweight/.scales/.zeros`` + ``quantization.json``).
    settings: the hyper-parameters (``FinetuneSettings``); progress: Trainer's progress bar and loss
        lines; overwrite: replace an existing ``out`` and discard an interrupted run with other
        settings; callbacks: extra ``TrainerCallback``s (e.g. a caller's own progress reporting).

    Resumable: checkpoints go to ``<out>.partial/`` every ``settings.save_steps`` steps; calling
    again with the same arguments continues from the last one. Returns the provenance record
    written as ``out/saap.json`` (parent, data sha256, settings, losses, time).
    Raises ``SaapError`` (nothing written) on bad input.
    """
    from runtime.models import load_model

    settings.validate()
    out_dir = Path(out)
    partial = out_dir.with_name(out_dir.name + ".partial")
    if out_dir.exists() and not overwrite:
        raise SaapError(f"output '{out}' already exists (pass --overwrite to replace it)")
    data_paths, kind, records = read_data(data)  # fails on a broken file before the slow model load
    data_name = ", ".join(map(str, data_paths))
    model_path = Path(model).expanduser()
    if model_path.is_dir() and not is_checkpoint(model_path) and not (model_path / "config.json").is_file():
        raise SaapError(f"'{model}' is not a checkpoint directory (no {METADATA_FILE} or config.json)")

    loaded = load_model(model)
    tokenizer = loaded.tokenizer
    teacher, teacher_record = (None, None)
    if settings.teacher:
        teacher, teacher_record = load_teacher(settings.teacher, loaded.metadata, model, loaded.model)
    if settings.method == "group-lora":
        check_group_size(loaded.model, settings.group_size)
    examples, stats = tokenize_examples(kind, records, tokenizer, settings.seq_len)
    if not examples:
        raise SaapError(f"data file '{data_name}' gives no training example at --seq-len {settings.seq_len}")
    if stats["truncated"] or stats["dropped"]:
        dropped = f", {stats['dropped']} left with no response token were dropped" if stats["dropped"] else ""
        print(
            f"saap: note: {stats['truncated']} of {len(records)} examples are longer than --seq-len "
            f"{settings.seq_len} tokens and were truncated{dropped}",
            file=sys.stderr,
        )
    train_set, val_set = split_examples(examples, settings.val_size, settings.seed)
    if not train_set:
        raise SaapError(f"data file '{data_name}' has too few examples to train on")

    parent_sha = sha256_file(model_path / METADATA_FILE) if loaded.metadata is not None else None
    files = [{"path": str(p), "sha256": sha256_file(p)} for p in data_paths]
    identity = _run_identity(model, parent_sha, files, settings)
    resume_from = None
    if partial.exists():
        try:
            previous = json.loads((partial / RUN_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous == json.loads(json.dumps(identity)):
            resume_from = last_checkpoint(partial)
        elif overwrite:
            shutil.rmtree(partial)
        else:
            raise SaapError(
                f"'{partial}' holds an interrupted run of other settings or data; "
                "pass --overwrite to discard it, or delete it"
            )

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = Collator(pad_id if pad_id is not None else 0)
    base = loaded.model
    base.config.use_cache = False
    params = model_parameter_count(base)
    eval_parent = evaluation_loss(base, val_set, collate, settings.batch_size)

    torch.manual_seed(settings.seed)  # the adapter init
    trained, adapted = _attach_adapters(base, settings)
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    eval_start = (
        evaluation_loss(trained, val_set, collate, settings.batch_size)
        if settings.method == "group-lora"
        else eval_parent  # LoRA's B starts at zero, and full starts from the weights: the parent's model
    )

    # The process peak is set by loading and saving the float model, which hides what the methods
    # differ in: the memory held while training (group-lora's uint8 base). So the training phase's
    # own peak is recorded too.
    peaks = {"before_training": peak_rss_mb()}

    partial.mkdir(parents=True, exist_ok=True)
    write_json_atomic(partial / RUN_FILE, identity)
    args = TrainingArguments(
        output_dir=str(partial),
        max_steps=settings.max_steps if settings.max_steps is not None else -1,
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr,
        lr_scheduler_type="cosine",
        warmup_ratio=settings.warmup_ratio,
        weight_decay=settings.weight_decay,
        optim="adamw_torch",
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=1,
        eval_strategy="no",
        seed=settings.seed,
        data_seed=settings.seed,
        report_to=[],
        disable_tqdm=not progress,
        # Without a GPU, say so: only then does a torchrun / `accelerate launch` start on CPU go
        # data-parallel (gloo) instead of every process training alone and writing the same output.
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        label_names=["labels"],
    )
    previous = 0.0
    if resume_from is not None and (resume_from / ELAPSED_FILE).is_file():
        previous = json.loads((resume_from / ELAPSED_FILE).read_text())["train_seconds"]
    clock = ElapsedTime(previous)
    keep = settings.keep if val_set else "last"
    tracker = KeepBest(
        lambda m: evaluation_loss(m, val_set, collate, settings.batch_size),
        settings.eval_steps,
        resume_from,
    )
    own_callbacks = [clock, tracker] if val_set else [clock]
    distiller = None
    if teacher is not None:
        distiller = Distiller(teacher.to(args.device), settings.temperature, settings.kl_weight, IGNORE)
    trainer = SafetensorsTrainer(
        model=trained,
        args=args,
        train_dataset=train_set,
        data_collator=collate,
        callbacks=[*own_callbacks, *(callbacks or [])],
        distiller=distiller,
    )
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossProgress)
    else:
        trainer.remove_callback(PrinterCallback)  # with the bar off, Trainer prints every log dict instead
    started = time.perf_counter()
    with PhasePeakRss() as training_rss:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    peaks["training"] = training_rss.peak_mb
    this_run, train_seconds = time.perf_counter() - started, clock.seconds()
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]

    if not trainer.is_world_process_zero():  # under accelerate launch, one process writes the result
        return {}
    kept_step = trainer.state.global_step
    if keep == "best" and tracker.best is not None:
        tracker.restore_best(trained)
        kept_step = tracker.best[0]
    merged, quantized = _merge(trained, settings)
    merged.config.use_cache = True
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    eval_after = evaluation_loss(merged, val_set, collate, settings.batch_size)
    peaks["through_merge"] = peak_rss_mb()

    record: dict[str, Any] = {
        "kind": "finetuned",
        "method": settings.method,
        "parent": {
            "model": model,
            "source": loaded.source,
            "saap_json_sha256": parent_sha,
            "kind": (loaded.metadata or {}).get("kind"),
        },
        "source": loaded.source,
        "teacher": teacher_record,  # None: the language-model loss
        "data": {
            "files": files,
            "format": kind,
            "records": len(records),
            "train_examples": len(train_set),
            "val_examples": len(val_set),
            "truncated_examples": stats["truncated"],
            "dropped_examples": stats["dropped"],
        },
        "settings": asdict(settings),
        "adapted_linears": adapted,
        "trainable_params": trainable,
        "params": params,
        "processes": trainer.args.world_size,  # > 1 under `accelerate launch` (data-parallel)
        "steps": trainer.state.global_step,
        "resumed_from_step": int(resume_from.name.rsplit("-", 1)[1]) if resume_from else None,
        # The Trainer's own average covers only the last segment of a resumed run: use the log.
        "train_loss": sum(loss for _, loss in losses) / len(losses) if losses else output.training_loss,
        "train_loss_last": losses[-1][1] if losses else None,
        "train_loss_log": losses,
        "eval_loss": {"parent": eval_parent, "start": eval_start, "after": eval_after},
        "eval_loss_log": tracker.log,  # (step, held-out loss) during training
        "kept": {"policy": keep, "step": kept_step},
        "train_seconds": round(train_seconds, 2),  # over all segments of an interrupted run
        "train_seconds_this_run": round(this_run, 2),
        # MB: the process peak before training and through the merge (cumulative), and the training
        # loop's own peak (sampled). Saving comes after this file is written.
        "peak_rss_mb": peaks,
        "quantized": None,
    }
    # Carry the pruning facts on, so later stages (export, reports) still see them.
    for key in ("pruned_layers", "params_before", "params_after", "ratio_achieved", "layers"):
        if loaded.metadata and key in loaded.metadata:
            record.setdefault("pruning", {})[key] = loaded.metadata[key]

    final = partial / "final"
    if final.exists():
        shutil.rmtree(final)
    if quantized is not None:
        record["quantized"] = {
            "dir": QUANTIZED_DIR,
            "bits": settings.bits,
            "group_size": settings.group_size,
            "merge_max_abs_error": merge_error(merged, quantized),
        }
    metadata = save_checkpoint(merged, tokenizer, final, record, overwrite=True)
    if quantized is not None:
        save_quantized(
            final / QUANTIZED_DIR,
            merged,
            quantized,
            settings.bits,
            settings.group_size,
            {"float_checkpoint_weights_sha256": metadata["files"]["model.safetensors"]},
        )
    _replace(final, out_dir)
    shutil.rmtree(partial, ignore_errors=True)
    return metadata


def _replace(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` (replacing it); ``target`` is never half-written."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        source.rename(target)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)

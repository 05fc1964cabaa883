"""Trainer callbacks: the progress bar's loss, training time over interruptions, the best adapter."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from saap.pipeline.finetune.state import (
    BEST_ADAPTER_FILE,
    BEST_JSON,
    ELAPSED_FILE,
    load_trainable,
    saved_checkpoint,
    trainable_state,
)
from saap.runtime.io import write_json_atomic


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

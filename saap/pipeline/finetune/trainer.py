"""``SafetensorsTrainer``: the Hugging Face ``Trainer`` with pickle-free checkpoints and an optional distiller."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer

from saap.pipeline.finetune.distill import Distiller
from saap.pipeline.finetune.state import ADAPTER_FILE, load_state, load_trainable, save_state, trainable_state


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

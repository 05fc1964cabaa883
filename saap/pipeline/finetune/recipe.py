"""The stage: ``FinetuneRecipe`` (setup / train / save / cleanup, as a torchtune recipe) and ``finetune``."""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from saap.pipeline.finetune.adapters import _attach_adapters, _merge
from saap.pipeline.finetune.callbacks import ElapsedTime, KeepBest, LossProgress
from saap.pipeline.finetune.data import IGNORE, Collator, evaluation_loss, read_data, split_examples, tokenize_examples
from saap.pipeline.finetune.distill import Distiller, load_teacher
from saap.pipeline.finetune.group_lora import QUANTIZED_DIR, check_group_size, merge_error, save_quantized
from saap.pipeline.finetune.settings import FinetuneSettings
from saap.pipeline.finetune.state import ELAPSED_FILE, RUN_FILE, last_checkpoint
from saap.pipeline.finetune.trainer import SafetensorsTrainer
from saap.runtime.checkpoint import METADATA_FILE, is_checkpoint, save_checkpoint, sha256_file
from saap.runtime.errors import SaapError
from saap.runtime.io import swap_in, write_json_atomic
from saap.runtime.memory import PhasePeakRss, peak_rss_mb
from saap.runtime.surgery import model_parameter_count


def _run_identity(spec: str, parent_sha: str | None, files: list[dict[str, str]], settings: FinetuneSettings):
    return {"model": spec, "parent_sha256": parent_sha, "data": files} | {"settings": asdict(settings)}


def training_arguments(settings: FinetuneSettings, output_dir: Path, progress: bool) -> TrainingArguments:
    """The Trainer's arguments for ``settings``; its checkpoints go to ``output_dir``."""
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=settings.max_steps if settings.max_steps is not None else -1,
        num_train_epochs=settings.epochs or 1.0,  # unused when max_steps is set
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


class FinetuneRecipe:
    """One fine-tuning run: ``setup`` (inputs, model, teacher, data, adapters), ``train`` (the
    Trainer, resumed from ``<out>.partial/``), ``save`` (merge, write ``<out>``), ``cleanup``.
    The arguments are ``finetune``'s."""

    def __init__(
        self,
        model: str,
        data: str | list[str],
        out: str,
        settings: FinetuneSettings,
        progress: bool = True,
        overwrite: bool = False,
        callbacks: list[TrainerCallback] | None = None,
    ):
        self.model_spec, self.data, self.out, self.settings = model, data, out, settings
        self.progress, self.overwrite, self.callbacks = progress, overwrite, callbacks
        self.out_dir = Path(out)
        self.partial = self.out_dir.with_name(self.out_dir.name + ".partial")

    # ------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Check the inputs, load the model (and teacher), tokenize and split the data, find the
        checkpoint to resume from, and attach the adapters. Raises ``SaapError`` (nothing written)."""
        self._check_inputs()
        self._load_models()
        self._load_examples()
        self.identity = self._identity()
        self.resume_from = self._resume_point()
        self._attach()

    def _check_inputs(self) -> None:
        """The settings, ``out``, the data files and the model path, before anything is loaded."""
        self.settings.validate()
        if self.out_dir.exists() and not self.overwrite:
            raise SaapError(f"output '{self.out}' already exists (pass --overwrite to replace it)")
        # fails on a broken file before the slow model load
        self.data_paths, self.kind, self.records = read_data(self.data)
        self.data_name = ", ".join(map(str, self.data_paths))
        self.model_path = model_path = Path(self.model_spec).expanduser()
        if model_path.is_dir() and not is_checkpoint(model_path) and not (model_path / "config.json").is_file():
            raise SaapError(f"'{self.model_spec}' is not a checkpoint directory (no {METADATA_FILE} or config.json)")

    def _load_models(self) -> None:
        """The model to train and, when distilling, its teacher."""
        from saap.runtime.models import load_model

        self.loaded = load_model(self.model_spec)
        self.tokenizer = self.loaded.tokenizer
        self.teacher, self.teacher_record = (None, None)
        if self.settings.teacher:
            self.teacher, self.teacher_record = load_teacher(
                self.settings.teacher, self.loaded.metadata, self.model_spec, self.loaded.model
            )
        if self.settings.method == "group-lora":
            check_group_size(self.loaded.model, self.settings.group_size)

    def _load_examples(self) -> None:
        """Tokenized examples, split into training and held-out sets."""
        settings, records = self.settings, self.records
        examples, stats = tokenize_examples(self.kind, records, self.tokenizer, settings.seq_len)
        self.stats = stats
        if not examples:
            raise SaapError(f"data file '{self.data_name}' gives no training example at --seq-len {settings.seq_len}")
        if stats["truncated"] or stats["dropped"]:
            dropped = f", {stats['dropped']} left with no response token were dropped" if stats["dropped"] else ""
            print(
                f"saap: note: {stats['truncated']} of {len(records)} examples are longer than --seq-len "
                f"{settings.seq_len} tokens and were truncated{dropped}",
                file=sys.stderr,
            )
        self.train_set, self.val_set = split_examples(examples, settings.val_size, settings.seed)
        if not self.train_set:
            raise SaapError(f"data file '{self.data_name}' has too few examples to train on")

    def _identity(self) -> dict[str, Any]:
        """What an interrupted run must match to be resumed: the model, the digests of its saap.json
        and of the data, the settings."""
        self.parent_sha = sha256_file(self.model_path / METADATA_FILE) if self.loaded.metadata is not None else None
        self.files = [{"path": str(p), "sha256": sha256_file(p)} for p in self.data_paths]
        return _run_identity(self.model_spec, self.parent_sha, self.files, self.settings)

    def _resume_point(self) -> Path | None:
        """The last checkpoint of an interrupted run of these arguments in ``<out>.partial/``, if any."""
        if not self.partial.exists():
            return None
        try:
            previous = json.loads((self.partial / RUN_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous == json.loads(json.dumps(self.identity)):
            return last_checkpoint(self.partial)
        if self.overwrite:
            shutil.rmtree(self.partial)
            return None
        raise SaapError(
            f"'{self.partial}' holds an interrupted run of other settings or data; "
            "pass --overwrite to discard it, or delete it"
        )

    def _attach(self) -> None:
        """The collator, the parent's held-out loss, the adapters and the loss they start from."""
        tokenizer, settings = self.tokenizer, self.settings
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.collate = Collator(pad_id if pad_id is not None else 0)
        base = self.loaded.model
        base.config.use_cache = False
        self.params = model_parameter_count(base)
        self.eval_parent = self.held_out_loss(base)

        torch.manual_seed(settings.seed)  # the adapter init
        self.trained, self.adapted = _attach_adapters(base, settings)
        self.trainable = sum(p.numel() for p in self.trained.parameters() if p.requires_grad)
        self.eval_start = (
            self.held_out_loss(self.trained)
            if settings.method == "group-lora"
            else self.eval_parent  # LoRA's B starts at zero, and full starts from the weights: the parent's model
        )

        # The process peak is set by loading and saving the float model, which hides what the methods
        # differ in: the memory held while training (group-lora's uint8 base). So the training phase's
        # own peak is recorded too.
        self.peaks = {"before_training": peak_rss_mb()}

    def held_out_loss(self, model: torch.nn.Module) -> float | None:
        """``model``'s mean loss on the held-out set (None without one)."""
        return evaluation_loss(model, self.val_set, self.collate, self.settings.batch_size)

    # ------------------------------------------------------------------------------------ train

    def train(self) -> None:
        """The Trainer run, continued from the checkpoint ``setup`` found; its checkpoints go to
        ``<out>.partial/``."""
        self.partial.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.partial / RUN_FILE, self.identity)
        args = training_arguments(self.settings, self.partial, self.progress)
        self.trainer = trainer = self._trainer(args)
        resume_from = self.resume_from
        started = time.perf_counter()
        with PhasePeakRss() as training_rss:
            self.output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        self.peaks["training"] = training_rss.peak_mb
        self.this_run, self.train_seconds = time.perf_counter() - started, self.clock.seconds()
        self.losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]

    def _trainer(self, args: TrainingArguments) -> SafetensorsTrainer:
        """The Trainer with this run's callbacks (elapsed time, best adapter) and distiller."""
        settings, resume_from = self.settings, self.resume_from
        previous = 0.0
        if resume_from is not None and (resume_from / ELAPSED_FILE).is_file():
            previous = json.loads((resume_from / ELAPSED_FILE).read_text())["train_seconds"]
        self.clock = ElapsedTime(previous)
        self.keep = settings.keep if self.val_set else "last"
        self.tracker = KeepBest(self.held_out_loss, settings.eval_steps, resume_from)
        own_callbacks = [self.clock, self.tracker] if self.val_set else [self.clock]
        distiller = None
        if self.teacher is not None:
            distiller = Distiller(self.teacher.to(args.device), settings.temperature, settings.kl_weight, IGNORE)
        trainer = SafetensorsTrainer(
            model=self.trained,
            args=args,
            train_dataset=self.train_set,
            data_collator=self.collate,
            callbacks=[*own_callbacks, *(self.callbacks or [])],
            distiller=distiller,
        )
        if self.progress:
            trainer.remove_callback(ProgressCallback)
            trainer.add_callback(LossProgress)
        else:
            trainer.remove_callback(PrinterCallback)  # with the bar off, Trainer prints every log dict instead
        return trainer

    def writes_output(self) -> bool:
        """Under ``accelerate launch``, one process writes the result."""
        return self.trainer.is_world_process_zero()

    # ------------------------------------------------------------------------------------- save

    def save(self) -> dict[str, Any]:
        """Merge the kept adapter and write ``<out>`` (the float checkpoint, its saap.json and, for
        group-lora, the quantized form); returns the checkpoint's metadata."""
        settings = self.settings
        kept_step = self.trainer.state.global_step
        if self.keep == "best" and self.tracker.best is not None:
            self.tracker.restore_best(self.trained)
            kept_step = self.tracker.best[0]
        merged, quantized = _merge(self.trained, settings)
        merged.config.use_cache = True
        merged.eval()
        for p in merged.parameters():
            p.requires_grad_(False)
        eval_after = self.held_out_loss(merged)
        self.peaks["through_merge"] = peak_rss_mb()
        record = self._record(kept_step, eval_after)

        final = self.partial / "final"
        if final.exists():
            shutil.rmtree(final)
        if quantized is not None:
            record["quantized"] = {
                "dir": QUANTIZED_DIR,
                "bits": settings.bits,
                "group_size": settings.group_size,
                "merge_max_abs_error": merge_error(merged, quantized),
            }
        metadata = save_checkpoint(merged, self.tokenizer, final, record, overwrite=True)
        if quantized is not None:
            save_quantized(
                final / QUANTIZED_DIR,
                merged,
                quantized,
                settings.bits,
                settings.group_size,
                {"float_checkpoint_weights_sha256": metadata["files"]["model.safetensors"]},
            )
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        swap_in(final, self.out_dir)
        return metadata

    def _record(self, kept_step: int, eval_after: float | None) -> dict[str, Any]:
        """The provenance record written as ``<out>/saap.json``."""
        loaded, losses, trainer, resume_from = self.loaded, self.losses, self.trainer, self.resume_from
        record: dict[str, Any] = {
            "kind": "finetuned",
            "method": self.settings.method,
            "parent": {
                "model": self.model_spec,
                "source": loaded.source,
                "saap_json_sha256": self.parent_sha,
                "kind": (loaded.metadata or {}).get("kind"),
            },
            "source": loaded.source,
            "teacher": self.teacher_record,  # None: the language-model loss
            "data": {
                "files": self.files,
                "format": self.kind,
                "records": len(self.records),
                "train_examples": len(self.train_set),
                "val_examples": len(self.val_set),
                "truncated_examples": self.stats["truncated"],
                "dropped_examples": self.stats["dropped"],
            },
            "settings": asdict(self.settings),
            "adapted_linears": self.adapted,
            "trainable_params": self.trainable,
            "params": self.params,
            "processes": trainer.args.world_size,  # > 1 under `accelerate launch` (data-parallel)
            "steps": trainer.state.global_step,
            "resumed_from_step": int(resume_from.name.rsplit("-", 1)[1]) if resume_from else None,
            # The Trainer's own average covers only the last segment of a resumed run: use the log.
            "train_loss": sum(loss for _, loss in losses) / len(losses) if losses else self.output.training_loss,
            "train_loss_last": losses[-1][1] if losses else None,
            "train_loss_log": losses,
            "eval_loss": {"parent": self.eval_parent, "start": self.eval_start, "after": eval_after},
            "eval_loss_log": self.tracker.log,  # (step, held-out loss) during training
            "kept": {"policy": self.keep, "step": kept_step},
            "train_seconds": round(self.train_seconds, 2),  # over all segments of an interrupted run
            "train_seconds_this_run": round(self.this_run, 2),
            # MB: the process peak before training and through the merge (cumulative), and the training
            # loop's own peak (sampled). Saving comes after this file is written.
            "peak_rss_mb": self.peaks,
            "quantized": None,
        }
        # Carry the pruning facts on, so later stages (export, reports) still see them.
        for key in ("pruned_layers", "params_before", "params_after", "ratio_achieved", "layers"):
            if loaded.metadata and key in loaded.metadata:
                record.setdefault("pruning", {})[key] = loaded.metadata[key]
        return record

    # ---------------------------------------------------------------------------------- cleanup

    def cleanup(self) -> None:
        """Drop ``<out>.partial/`` once ``<out>`` is written (not on a failure: a re-run resumes from it)."""
        shutil.rmtree(self.partial, ignore_errors=True)


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

    model: anything ``saap.runtime.models.load_model`` accepts (a saap checkpoint dir, alias, .gguf, HF dir).
    data: Alpaca-format .json/.jsonl (instruction, input, output) or plain text (.txt, or .jsonl
        of {"text": ...}), one file or a list of files of one kind; relative paths are also tried
        under the data dirs (``--data-dir`` / ``$SAAP_DATA_DIR``, then saap's own copy).
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
    recipe = FinetuneRecipe(model, data, out, settings, progress, overwrite, callbacks)
    recipe.setup()
    recipe.train()
    if not recipe.writes_output():
        return {}
    metadata = recipe.save()
    recipe.cleanup()
    return metadata

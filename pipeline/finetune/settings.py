"""``FinetuneSettings``, every hyper-parameter of a run, and the constants its defaults come from."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.group_lora import BITS, GROUP_SIZES
from runtime.errors import SaapError

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

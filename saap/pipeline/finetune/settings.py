"""``FinetuneSettings``, every hyper-parameter of a run, and the constants its defaults come from."""

from __future__ import annotations

from dataclasses import dataclass

from saap.pipeline.finetune.group_lora import BITS, GROUP_SIZES
from saap.pipeline.options import option
from saap.runtime.errors import SaapError

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
    """Every hyper-parameter of a fine-tuning run (all recorded in the output's saap.json; the
    ``saap finetune`` flags and the run config's ``finetune:`` section are derived from these)."""

    method: str | None = option(
        None, "group-lora (SAAP) | lora (peft) | full (all kept weights); default: full with --teacher, else "
        "group-lora", choices=METHODS,
    )  # fmt: skip
    teacher: str | None = option(
        None, "distil from this model instead of training on the LM loss; 'parent': the dense model the checkpoint "
        "was pruned from (its saap.json source)",
    )  # fmt: skip
    temperature: float = option(1.0, "distillation: softmax temperature")
    kl_weight: float = option(1.0, "distillation: weight of the KL term (the LM loss gets 1 - it)")
    bits: int = option(4, "group-lora: bits of the frozen base", choices=BITS)
    group_size: int = option(32, "group-lora: input columns per group", choices=GROUP_SIZES)
    rank: int | None = option(None, "adapter rank (default 16 for group-lora, 8 for lora: equal trainable params)")
    alpha: float | None = option(None, "adapter scale numerator (scale = alpha / rank; default 2 x rank)")
    dropout: float = option(0.0, "lora: adapter dropout")
    # --max-steps wins over --epochs (as in the HF Trainer); neither given: DEFAULT_MAX_STEPS.
    max_steps: int | None = option(None, f"optimizer steps (default {DEFAULT_MAX_STEPS} unless --epochs is given)")
    epochs: float | None = option(None, "passes over the training split (when --max-steps is not given)")
    lr: float = option(3e-4, "peak learning rate (AdamW, cosine schedule after a linear warm-up)")
    warmup_ratio: float = option(0.03, "fraction of the steps spent warming the learning rate up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    batch_size: int = option(4, "sequences per device per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    seq_len: int = option(256, "tokens per example (longer ones are truncated, and the run says so once)")
    val_size: int = option(32, "held-out examples for the validation loss (at most a tenth of the data)")
    save_steps: int = option(25, "steps between resumable checkpoints in <out>.partial/")
    logging_steps: int = option(10, "steps between logged training losses")
    eval_steps: int = option(50, "steps between held-out loss evaluations, and at the last step (0: none)")
    keep: str = option(
        "best", "merge the adapter of the lowest held-out loss (as the Trainer's load_best_model_at_end) or the "
        "last (always, without a held-out slice)", choices=KEEP,
    )  # fmt: skip
    seed: int = option(0, "seeds the adapter init, the data split and order (two runs give identical weights)")

    def __post_init__(self) -> None:
        if self.max_steps is None and self.epochs is None:
            self.max_steps = DEFAULT_MAX_STEPS
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
        if self.max_steps is None and not (self.epochs or 0) > 0:
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

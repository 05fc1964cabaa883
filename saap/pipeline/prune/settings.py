"""``PruneSettings``: how ``saap prune`` prunes (its flags and the run config's ``prune:`` section are
derived from these fields)."""

from __future__ import annotations

from dataclasses import dataclass

from saap.pipeline.options import option
from saap.pipeline.prune.allocation import ALLOCATIONS
from saap.pipeline.prune.compensation import COMPENSATIONS
from saap.pipeline.prune.importance import IMPORTANCES
from saap.pipeline.prune.measured import MOVES
from saap.pipeline.prune.methods import METHODS
from saap.pipeline.prune.saap_criterion import ABLATIONS
from saap.pipeline.prune.speed_model import EngineSpec
from saap.runtime.errors import SaapError

DEVICE_MAPS = ("auto",)
NO_COMPENSATION = "none"
# the budget fields: exactly one is given (--ratio 0.2 when none is)
BUDGETS = ("ratio", "target_params", "target_decode_bytes", "target_speedup", "target_tok_s")
# What --ratio is a fraction of. "all" counts the embedding too (the papers' convention, and the default);
# "decoder" only the decoder layers', for models whose embedding dominates: Gemma 3 270M's 262k-token
# table holds 168 M of its 268 M parameters, so 20 % of all would take 54 % of its decoder.
RATIO_BASES = ("all", "decoder")
# What the kept layers may look like. "per-layer": each its own widths (a checkpoint that needs saap's
# loader or transformers' remote code); "uniform": one shape for every kept layer, others removed whole
# (a standard checkpoint of the source family: plain transformers, llama.cpp's converter, genai's builder).
SHAPES = ("per-layer", "uniform")


@dataclass
class PruneSettings:
    method: str = option("saap", "pruning method: a preset of an importance and an allocation", choices=sorted(METHODS))
    ratio: float | None = option(None, "fraction of parameters to remove, in (0, 0.9] (default 0.2)")
    ratio_of: str = option("all", "what --ratio is a fraction of: all parameters or the decoder layers'",
                           choices=RATIO_BASES)  # fmt: skip
    target_params: int | None = option(None, "budget as parameters to keep (instead of --ratio)")
    target_decode_bytes: int | None = option(None, "budget as float32 weight bytes read per generated token")
    target_speedup: float | None = option(None, "budget as a decode speed-up on --engine (its saap profile)")
    target_tok_s: float | None = option(None, "budget as decode tokens/s on --engine (its saap profile)")
    engine: str | None = option(None, "speed budgets: ENGINE[:QUANT][@DEVICE], e.g. gguf:q8_0, onnx:fp32, torch")
    profile: str | None = option(None, "speed budgets: a saap profile JSON (default: the one saap profile stored)")
    align: int = option(32, "kept MLP widths and q-head widths are multiples of this")
    importance: str | None = option(
        None, "which groups go inside a module (default: the method's)", choices=sorted(IMPORTANCES)
    )
    allocation: str | None = option(
        None, "how many go from each layer (default: the method's)", choices=sorted(ALLOCATIONS)
    )
    calibration: str | None = option(None, "text/jsonl/json calibration file (default: the method's)")
    num_samples: int | None = option(None, "calibration sequences (default: the method's)")
    seq_len: int = option(128, "tokens per calibration sequence")
    # Gradients accumulate across batches; 1 keeps peak memory lowest (and SAAP's statistics per sample).
    batch_size: int = option(1, "calibration sequences per backward pass (memory)")
    seed: int = option(0, "random seed (random importance, calibration sample order)")
    ablation: str = option("fused", "saap-fused importance: which Taylor metrics", choices=ABLATIONS)
    fluctuation_weight: float = option(1.0, "adaptive allocation: lambda in priority x (1 + lambda x CV)")
    # Search size: cost grows linearly in each (benchmarks/prune_cost.py); a second pass, re-measured
    # at the first plan, gave a plan of higher calibration KL and dev perplexity (benchmarks/saap_ablation.py).
    search_samples: int = option(8, "measured allocation: calibration sequences the KL is measured on")
    search_passes: int = option(1, "measured allocation: measure-and-solve passes (2+: re-measured at the plan)")
    width_levels: int = option(4, "measured allocation: MLP widths measured per layer (others interpolated)")
    search_moves: str = option(
        "depth+width",
        "measured allocation: what a layer may take (depth: whole blocks only; width: narrowing only)",
        choices=list(MOVES),
    )
    shape: str = option(
        "per-layer",
        "measured allocation: per-layer widths, or one shape for every kept layer (a standard checkpoint)",
        choices=list(SHAPES),
    )
    narrow_queries: bool = option(
        False, "measured allocation: also narrow query heads inside each KV group (models with few KV heads)"
    )
    # On the dev text the evolved 50 % plan has 22 % lower perplexity (409 -> 317); at 20 % the held-out
    # guard kept the knapsack's plan (benchmarks/results/saap-calibration-*.md).
    search_generations: int = option(24, "measured allocation: generations evolving the whole plan on its KL (0: off)")
    compensation: str | None = option(
        None,
        "adjust the kept weights for what was removed (default: the method's; none: slicing alone)",
        choices=[*sorted(COMPENSATIONS), NO_COMPENSATION],
    )
    compensation_samples: int = option(256, "least-squares compensation: calibration sequences its fit reads")
    device_map: str | None = option(
        None, "spread the model over all devices for estimation (accelerate)", choices=DEVICE_MAPS
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise SaapError(f"unknown method '{self.method}' (choose from {', '.join(METHODS)})")
        self._check_budget()
        preset = METHODS[self.method]
        self.importance = self.importance or preset.importance
        self.allocation = self.allocation or preset.allocation
        self.calibration = self.calibration or preset.calibration
        self.num_samples = preset.num_samples if self.num_samples is None else self.num_samples  # 0 is refused below
        self.compensation = self.compensation or preset.compensation or NO_COMPENSATION
        for flag, value, registry in (
            ("importance", self.importance, IMPORTANCES),
            ("allocation", self.allocation, ALLOCATIONS),
            ("compensation", self.compensation, [*COMPENSATIONS, NO_COMPENSATION]),
        ):
            if value not in registry:
                raise SaapError(f"unknown {flag} '{value}' (choose from {', '.join(sorted(registry))})")
        self._check_pairing()
        if self.speed_budget and self.compensator and self.compensator.adds_parameters:
            raise SaapError(f"--compensation {self.compensation} adds parameters: it meets parameter budgets only")
        if self.speed_budget and not ALLOCATIONS[self.allocation].any_budget:
            fits = ", ".join(sorted(n for n, a in ALLOCATIONS.items() if a.any_budget))
            raise SaapError(f"--allocation {self.allocation} meets parameter budgets only; a speed budget needs {fits}")
        if self.align < 1:
            raise SaapError(f"--align must be a positive integer, got {self.align}")
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise SaapError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, got '{self.device_map}'")
        if self.ablation not in ABLATIONS:
            raise SaapError(f"--ablation is one of {', '.join(ABLATIONS)}, got '{self.ablation}'")
        if self.num_samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise SaapError("--num-samples, --seq-len and --batch-size must be positive")
        if self.search_moves not in MOVES:
            raise SaapError(f"--search-moves is one of {', '.join(MOVES)}, got '{self.search_moves}'")
        if self.narrow_queries and self.allocation != "measured":
            raise SaapError(f"--narrow-queries needs --allocation measured (the saap method), got '{self.allocation}'")
        if self.shape not in SHAPES:
            raise SaapError(f"--shape is one of {', '.join(SHAPES)}, got '{self.shape}'")
        if self.shape == "uniform" and self.allocation != "measured":
            raise SaapError(f"--shape uniform needs --allocation measured (the saap method), got '{self.allocation}'")
        if self.search_generations < 0:
            raise SaapError(f"--search-generations must be 0 or more, got {self.search_generations}")
        if min(self.search_samples, self.search_passes, self.width_levels, self.compensation_samples) < 1:
            raise SaapError(
                "--search-samples, --search-passes, --width-levels and --compensation-samples must be positive"
            )

    def _check_pairing(self) -> None:
        """An importance and an allocation (and compensation) that can work together."""
        allocation, importance = ALLOCATIONS[self.allocation], IMPORTANCES[self.importance]
        if allocation.needs_importance and self.importance not in allocation.needs_importance:
            needs = " or ".join(allocation.needs_importance)
            raise SaapError(f"--allocation {self.allocation} needs --importance {needs}, got '{self.importance}'")
        if not importance.ranks_groups and not allocation.needs_importance:
            raise SaapError(f"--importance {self.importance} scores whole layers: use --allocation whole-layers")
        needs = self.compensator and self.compensator.needs_importance
        if needs and self.importance not in needs:
            raise SaapError(
                f"--compensation {self.compensation} reads --importance {' or '.join(needs)}"
                f" statistics, got '{self.importance}' (add --compensation {NO_COMPENSATION})"
            )

    def _check_budget(self) -> None:
        budgets = [getattr(self, name) for name in BUDGETS]
        if sum(b is not None for b in budgets) > 1:
            flags = ["--" + name.replace("_", "-") for name in BUDGETS]
            raise SaapError(f"give one budget: {', '.join(flags[:-1])} or {flags[-1]}")
        if all(b is None for b in budgets):
            self.ratio = 0.2
        if self.ratio is not None and not 0 < self.ratio <= 0.9:
            raise SaapError(f"--ratio must be in (0, 0.9], got {self.ratio}")
        if any(t is not None and t <= 0 for t in (self.target_params, self.target_decode_bytes, self.target_tok_s)):
            raise SaapError("--target-params, --target-decode-bytes and --target-tok-s must be positive")
        if self.target_speedup is not None and self.target_speedup <= 1:
            raise SaapError(f"--target-speedup must be above 1, got {self.target_speedup}")
        if self.speed_budget and self.engine is None and self.profile is None:
            raise SaapError("a speed budget needs --engine (its stored saap profile) or --profile FILE")
        if not self.speed_budget and (self.engine or self.profile):
            raise SaapError("--engine and --profile go with --target-speedup or --target-tok-s")
        if self.engine is not None:
            EngineSpec.parse(self.engine)  # a bad spec fails before any work

    @property
    def speed_budget(self) -> bool:
        return self.target_speedup is not None or self.target_tok_s is not None

    @property
    def compensator(self):
        """The compensation step of ``saap.pipeline.prune.compensation``, or None for ``none``."""
        return COMPENSATIONS.get(self.compensation)

    @property
    def needs_calibration(self) -> bool:
        return (
            IMPORTANCES[self.importance].needs_calibration
            or ALLOCATIONS[self.allocation].needs_calibration
            or bool(self.compensator and self.compensator.needs_calibration)
        )

"""Group fine-tuning (SAAP's recovery; QA-LoRA, Xu et al. 2023): a group-quantized frozen base plus
low-rank adapters on group-pooled (summed) inputs, merged exactly into the groups' zero-points.

Quantizer. Each weight ``W [out, in]`` is cut along its input dimension into groups of ``g``
consecutive columns; each (row, group) gets an asymmetric ``bits``-bit code with its own float
scale ``s`` and offset ``z`` (the group minimum; llama.cpp's Q4_1 uses this very ``d * q + m`` form)::

    W[o, i] ~= s[o, k] * q[o, i] + z[o, k],   k = i // g,   q in [0, 2**bits - 1]

so ``|W - dequant(W)| <= s / 2`` element-wise.

Adapter. ``A [rank, in/g]`` reads the input sum-pooled over each group, ``B [out, rank]``::

    y = x @ dequant(W).T + (alpha / rank) * B @ A @ pool(x),   pool(x)[k] = sum(x[k*g : (k+1)*g])

The adapter term equals ``x @ D.T`` with ``D[o, i] = (alpha / rank) * (B @ A)[o, k]``: constant
over every group, i.e. a per-(row, group) shift. It therefore folds exactly into the offsets,
``z'[o, k] = z[o, k] + (alpha / rank) * (B @ A)[o, k]``, and the merged model keeps the same
codes and scales: still a ``bits``-bit group-quantized model, with no re-quantization error.

Why sum, not QA-LoRA's average: with the sum (and ``A`` initialised like LoRA's ``A`` for the full
input width) the adapter *is* a LoRA whose ``A`` is tied across each group's columns, so it trains
at LoRA's scale. The average divides the adapter's effect on the output by ``g`` while Adam's step
on ``A`` stays the same size: measured on SmolLM2-135M pruned 20 % (an earlier prune), 20 steps
at lr 1e-3, average pooling lowered the held-out loss 3.596 -> 3.440 where plain LoRA reached 2.969;
with the sum, on the current prune, 3.286 -> 2.697 (rank 8) and 2.591 (rank 16) vs LoRA's 2.632
(``benchmarks/results/recovery-20-smollm2-135m.md``). The two differ
only by a constant factor, so the merge is exact either way. (peft's QALoRA variant also rescales
its pooled input.)

The frozen base is stored as uint8 codes (not float weights) and dequantized on the fly, in the
backward pass too, so training holds ~1 byte per base weight instead of 4.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from saap.runtime.checkpoint import sha256_file
from saap.runtime.errors import SaapError
from saap.runtime.io import write_json_atomic
from saap.runtime.surgery import decoder_layers, prunable_linears

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
QUANTIZED_DIR = "quantized"
QUANTIZED_WEIGHTS = "model.safetensors"
QUANTIZED_META = "quantization.json"


def quantize_groups(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, ...]:
    """Asymmetric ``bits``-bit codes per group of ``group_size`` input columns.

    Returns ``(q [out, in] uint8, scales [out, in/g], zeros [out, in/g])`` with
    ``W ~= scales * q + zeros`` per group (``zeros`` is the float offset, the group minimum).
    """
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise SaapError(f"group size {group_size} does not divide the input width {in_features}")
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    low, high = w.amin(-1), w.amax(-1)
    levels = 2**bits - 1
    # A constant group has high == low: any positive scale reproduces it exactly through the offset.
    scales = ((high - low) / levels).clamp_min(1e-10)
    q = torch.round((w - low[..., None]) / scales[..., None]).clamp_(0, levels).to(torch.uint8)
    return q.reshape(out_features, in_features), scales, low


def dequantize_groups(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    out_features, in_features = q.shape
    groups = scales.shape[1]
    w = q.reshape(out_features, groups, in_features // groups).to(scales.dtype)
    return (w * scales[..., None] + zeros[..., None]).reshape(out_features, in_features)


class _DequantLinear(torch.autograd.Function):
    """``x @ dequant(q).T`` that re-dequantizes in backward instead of keeping the float weight
    alive for it: otherwise autograd would hold every layer's float weight until backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, scales, zeros)
        return x @ dequantize_groups(q, scales, zeros).to(x.dtype).T

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, scales, zeros = ctx.saved_tensors
        return grad @ dequantize_groups(q, scales, zeros).to(grad.dtype), None, None, None


class GroupLoraLinear(nn.Module):
    """A frozen group-quantized linear with a group-pooled LoRA adapter (see the module docstring)."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int, rank: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size, self.rank = bits, group_size, rank
        self.scaling = alpha / rank
        q, scales, zeros = quantize_groups(linear.weight, bits, group_size)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        groups = self.in_features // group_size
        self.lora_A = nn.Parameter(torch.empty(rank, groups))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))  # zero: training starts at the base
        # peft's LoRA init for A over the *full* input width (bound 1/sqrt(in)): with sum pooling
        # the adapter then starts as the group-tied version of a freshly initialised LoRA.
        nn.init.uniform_(self.lora_A, -1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], self.in_features // self.group_size, self.group_size).sum(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantLinear.apply(x, self.qweight, self.scales, self.zeros)
        if self.bias is not None:
            y = y + self.bias
        return y + (self.pool(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    @torch.no_grad()
    def merged_zeros(self) -> torch.Tensor:
        """The offsets with the adapter folded in: ``z + (alpha/rank) * B @ A``."""
        shift = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return self.zeros + shift

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """The merged float linear: the same codes and scales with the merged offsets."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(dequantize_groups(self.qweight, self.scales, self.merged_zeros()))
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone())
        return linear

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, rank={self.rank}"
        )


def _blocks(model: nn.Module):
    """(module path, parent module, attribute, linear) of every q/k/v/o/gate/up/down still present."""
    for i, layer in enumerate(decoder_layers(model)):
        for name, module in prunable_linears(layer).items():
            block = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            parent = getattr(layer, block)
            yield f"model.layers.{i}.{block}.{name}", parent, name, module


def check_group_size(model: nn.Module, group_size: int) -> None:
    """Refuse (one clear line) when ``group_size`` does not divide some linear's input width."""
    bad = sorted(
        {(linear.in_features, path) for path, _, _, linear in _blocks(model) if linear.in_features % group_size}
    )
    if bad:
        widths = sorted({w for w, _ in bad})
        divisors = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
        hint = f" (choose --group-size {' or '.join(map(str, divisors))})" if divisors else ""
        raise SaapError(
            f"--group-size {group_size} does not divide the input width {bad[0][0]} of {bad[0][1]} "
            f"({len(bad)} linears affected, widths {widths}){hint}"
        )


def apply_group_lora(model: nn.Module, bits: int, group_size: int, rank: int, alpha: float) -> list[str]:
    """Replace every attention/MLP linear by a ``GroupLoraLinear`` (removed blocks have none) and
    freeze everything but the adapters. Returns the module paths that got adapters."""
    if bits not in BITS:
        raise SaapError(f"--bits must be one of {BITS}, got {bits}")
    if rank < 1:
        raise SaapError("--rank must be at least 1")
    check_group_size(model, group_size)
    for p in model.parameters():
        p.requires_grad_(False)
    paths = []
    for path, parent, attr, linear in list(_blocks(model)):
        setattr(parent, attr, GroupLoraLinear(linear, bits, group_size, rank, alpha))
        paths.append(path)
    return paths


def group_lora_modules(model: nn.Module) -> dict[str, GroupLoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, GroupLoraLinear)}


@torch.no_grad()
def merge_group_lora(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Fold every adapter into its offsets and put plain float linears back in place.

    Returns the quantized form of every merged linear: ``{path: {qweight, scales, zeros[, bias]}}``.
    """
    quantized = {}
    for path, module in group_lora_modules(model).items():
        parent_path, attr = path.rsplit(".", 1)
        entry = {"qweight": module.qweight, "scales": module.scales, "zeros": module.merged_zeros()}
        if module.bias is not None:
            entry["bias"] = module.bias.detach()
        quantized[path] = entry
        setattr(model.get_submodule(parent_path), attr, module.to_linear())
    return quantized


@torch.no_grad()
def merge_error(model: nn.Module, quantized: dict[str, dict[str, torch.Tensor]]) -> float:
    """Largest |dequant(codes, scales, merged zeros) - merged float weight| over every linear."""
    error = 0.0
    for path, entry in quantized.items():
        dequant = dequantize_groups(entry["qweight"], entry["scales"], entry["zeros"])
        error = max(error, (dequant - model.get_submodule(path).weight).abs().max().item())
    return error


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """4-bit codes two per byte (column 2j in the low nibble, 2j+1 in the high one); 8-bit as is."""
    if bits == 8:
        return q
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    q = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8)
    q[:, 0::2], q[:, 1::2] = packed & 0x0F, packed >> 4
    return q


def save_quantized(
    out_dir: Path,
    model: nn.Module,
    quantized: dict[str, dict[str, torch.Tensor]],
    bits: int,
    group_size: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the quantized form beside a merged checkpoint: ``<path>.qweight/.scales/.zeros`` for
    the adapted linears, every other tensor of the merged model as float, plus a JSON description.

    ``model`` is the merged float model (its other tensors are copied; its merged linears are
    compared against the dequantized codes to record the merge error, which should be ~1e-7).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    max_error = merge_error(model, quantized)
    for path, entry in quantized.items():
        tensors[f"{path}.qweight"] = pack_codes(entry["qweight"], bits).contiguous()
        tensors[f"{path}.scales"] = entry["scales"].contiguous()
        tensors[f"{path}.zeros"] = entry["zeros"].contiguous()
        if "bias" in entry:
            tensors[f"{path}.bias"] = entry["bias"].contiguous()
        state.pop(f"{path}.weight")
        state.pop(f"{path}.bias", None)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tensors |= {name: t.detach().contiguous() for name, t in state.items()}
    save_file(tensors, out_dir / QUANTIZED_WEIGHTS, metadata={"format": "saap-group-quant"})
    meta = {
        "format": "saap group quantization",
        "bits": bits,
        "group_size": group_size,
        "formula": "W[o, i] = scales[o, i // group_size] * q[o, i] + zeros[o, i // group_size]",
        "packing": (
            "4-bit: two codes per uint8, column 2j in the low nibble and 2j+1 in the high nibble"
            if bits == 4
            else "8-bit: one code per uint8"
        ),
        "zeros": "float offsets (the group minimum plus the folded adapter), as in llama.cpp Q4_1's d*q+m",
        "modules": sorted(quantized),
        "merge_max_abs_error": max_error,
        **(extra or {}),
        "files": {QUANTIZED_WEIGHTS: sha256_file(out_dir / QUANTIZED_WEIGHTS)},
    }
    write_json_atomic(out_dir / QUANTIZED_META, meta)
    return meta


def load_quantized_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Float state dict of a quantized form written by ``save_quantized`` (for checks and export)."""
    path = Path(path)
    try:
        meta = json.loads((path / QUANTIZED_META).read_text())
        tensors = load_file(path / QUANTIZED_WEIGHTS)
    except (OSError, json.JSONDecodeError) as e:
        raise SaapError(f"'{path}' is not a readable quantized form: {e}") from None
    state = {}
    for name, t in tensors.items():
        base, _, kind = name.rpartition(".")
        if kind == "qweight":
            q = unpack_codes(t, meta["bits"])
            state[f"{base}.weight"] = dequantize_groups(q, tensors[f"{base}.scales"], tensors[f"{base}.zeros"])
        elif kind not in ("scales", "zeros"):
            state[name] = t
    return state

"""The outside reference: the ``torch-pruning`` package (Fang et al., DepGraph) on the same model.

    python benchmarks/torch_pruning_ref.py --model smollm2-135m --ratio 0.2 --out DIR

torch-pruning's own API does the work (``tp.pruner.BasePruner`` with ``GroupTaylorImportance`` on
gradients of the same calibration batches every saap method sees, or ``GroupMagnitudeImportance``);
the resulting shapes are read back into saap's per-layer config so that the model is saved with
``save_checkpoint`` and evaluated by the same harness.

Only MLP channels are pruned. Attention heads were tried first, the way torch-pruning's LLM example
does it (``num_heads`` for q/k/v, ``prune_num_heads=True``, ``prune_head_dims=False``, o_proj and
down_proj ignored so the hidden size stays): with torch-pruning 1.6.0 and transformers 4.57 the
dependency-graph construction never finishes for the Llama attention block, MHA as well as GQA,
sdpa as well as eager attention (still inside ``DependencyGraph.get_pruning_group`` ->
``_fix_dependency_graph_non_recursive`` -> ``Group.has_pruning_op`` after 200 s on a 3-layer,
64-wide model; upstream: VainF/Torch-Pruning#527). So q/k/v/o_proj, down_proj (whose output is the
residual stream) and lm_head are ignored layers and the roots are gate_proj/up_proj, pruned at one
ratio in every layer (torch-pruning's local pruning), with ``round_to=align``. The ratio is solved
so that the whole model loses ``ratio`` of its parameters (to one aligned step per layer).
"""

from __future__ import annotations

import argparse
import sys
import time

from saap.pipeline.data import calibration_batches, resolve_data_file
from saap.pipeline.options import add_options, options
from saap.pipeline.prune import PruneSettings, shape_record
from saap.pipeline.prune.methods import DEFAULT_NUM_SAMPLES
from saap.runtime.errors import SaapError
from saap.runtime.models import LoadedModel
from saap.runtime.surgery import (
    LayerShape,
    layer_parameter_count,
    layer_shapes,
    model_parameter_count,
    set_layer_shapes,
)


def prune_with_torch_pruning(
    loaded: LoadedModel,
    ratio: float,
    importance: str = "taylor",
    align: int = PruneSettings.align,  # the calibration pass as saap prune's, from its defaults
    calibration: str = PruneSettings.calibration,
    num_samples: int = DEFAULT_NUM_SAMPLES,  # a baseline: the baselines' count, not saap's
    seq_len: int = PruneSettings.seq_len,
    seed: int = PruneSettings.seed,
) -> dict:
    """Prune MLP channels of ``loaded.model`` in place with torch-pruning; returns the saap.json record."""
    import torch_pruning as tp

    model, config = loaded.model, loaded.model.config
    started = time.perf_counter()
    before_shapes, total = layer_shapes(config), model_parameter_count(model)
    width = before_shapes[0].intermediate_size
    if any(s.intermediate_size != width for s in before_shapes):
        raise SaapError("the torch-pruning reference needs equal MLP widths in every layer")
    per_channel = 3 * config.hidden_size + (2 if getattr(config, "mlp_bias", False) else 0)
    channels = round(ratio * total / (len(before_shapes) * per_channel) / align) * align
    if not 0 < channels < width:
        raise SaapError(f"--ratio {ratio} is unreachable by pruning MLP channels alone (width {width})")

    ignored = [model.lm_head]
    for layer in model.model.layers:
        a = layer.self_attn
        ignored += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.mlp.down_proj]
    path = resolve_data_file(calibration)
    batches = calibration_batches(loaded.tokenizer, path, num_samples, seq_len, 1, seed)
    if importance == "taylor":
        scorer = tp.importance.GroupTaylorImportance()
        model.requires_grad_(False)
        for layer in model.model.layers:
            for linear in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                linear.weight.requires_grad_(True)
        for batch in batches:  # mean loss over all samples, as saap's accumulate_gradients
            (model(input_ids=batch, labels=batch, use_cache=False).loss / len(batches)).backward()
    elif importance == "magnitude":
        scorer = tp.importance.GroupMagnitudeImportance(p=2)
    else:
        raise SaapError(f"unknown torch-pruning importance '{importance}' (taylor | magnitude)")
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs=batches[0],
        importance=scorer,
        pruning_ratio=channels / width,
        ignored_layers=ignored,
        round_to=align,
        # RMSNorm weights are bare parameters to torch-pruning; they are 1-D (the hidden size, kept).
        unwrapped_parameters=[(m.weight, 0) for m in model.modules() if type(m).__name__.endswith("RMSNorm")],
        output_transform=lambda out: out.logits,
    )
    pruner.step()
    model.requires_grad_(False)
    for p in model.parameters():
        p.grad = None

    shapes = []
    for layer, before in zip(model.model.layers, before_shapes, strict=True):
        layer.mlp.intermediate_size = layer.mlp.gate_proj.out_features
        shapes.append(LayerShape(before.num_attention_heads, before.num_key_value_heads, layer.mlp.intermediate_size))
    if model.model.embed_tokens.weight.shape[1] != config.hidden_size:
        raise SaapError("torch-pruning changed the hidden size; saap checkpoints keep it")
    set_layer_shapes(config, shapes)
    after = model_parameter_count(model)
    if after != total - sum(
        layer_parameter_count(config, b) - layer_parameter_count(config, s)
        for b, s in zip(before_shapes, shapes, strict=True)
    ):
        raise SaapError("torch-pruning pruned something other than MLP channels")
    return {
        "kind": "pruned",
        "source": loaded.source,
        "method": "torch-pruning",
        "settings": {
            "ratio": ratio,
            "importance": importance,
            "align": align,
            "calibration": calibration,
            "num_samples": num_samples,
            "seq_len": seq_len,
            "seed": seed,
            "torch_pruning": _version(),
            "scope": "MLP channels only (attention dependency graph does not terminate)",
        },
        "calibration": {"path": str(path)},
        "pruned_layers": [0, len(shapes)],
        **shape_record(config, before_shapes, total, after, round(ratio * total)),
        "prune_seconds": round(time.perf_counter() - started, 2),
    }


def _version() -> str:
    import importlib.metadata

    return importlib.metadata.version("torch-pruning")


def main(argv: list[str] | None = None) -> int:
    from saap.runtime.checkpoint import save_checkpoint
    from saap.runtime.models import load_model

    parser = argparse.ArgumentParser(prog="python benchmarks/torch_pruning_ref.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--importance", default="taylor", choices=["taylor", "magnitude"])
    shared = {"align", "calibration", "num_samples", "seq_len", "seed"}  # saap prune's, with its defaults
    add_options(parser, PruneSettings, exclude={o.name for o in options(PruneSettings)} - shared)
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    num_samples = DEFAULT_NUM_SAMPLES if args.num_samples is None else args.num_samples
    try:
        loaded = load_model(args.model)
        record = prune_with_torch_pruning(
            loaded, args.ratio, args.importance, args.align, args.calibration, num_samples, args.seq_len, args.seed
        )
        save_checkpoint(loaded.model, loaded.tokenizer, args.out, record, overwrite=args.overwrite)
    except SaapError as e:
        print(f"saap: error: {e}", file=sys.stderr)
        return 2
    print(
        f"pruned {args.model} with torch-pruning: {record['params_before']:,} -> {record['params_after']:,} "
        f"parameters ({record['ratio_achieved']:.1%} removed) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

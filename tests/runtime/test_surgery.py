import copy

import pytest
import torch

from saap.runtime.surgery import (
    LayerShape,
    attention_columns,
    attention_group_index,
    config_parameter_count,
    group_sums,
    head_dim,
    layer_parameter_count,
    layer_shapes,
    model_parameter_count,
    prunable_linears,
    set_layer_shapes,
    shrink_layer,
)
from tests.conftest import make_model


def zero_groups(model, removed_kv: dict[int, list[int]], removed_channels: dict[int, list[int]]):
    """The masked reference: the dense model with the removed groups' weights set to zero."""
    hd = head_dim(model.config)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(masked.model.layers):
            shape = layer_shapes(masked.config)[i]
            q_rows, kv_rows = attention_group_index(shape, hd)
            for j in removed_kv.get(i, []):
                attention = layer.self_attn
                attention.q_proj.weight[q_rows[j]] = 0
                attention.k_proj.weight[kv_rows[j]] = 0
                attention.v_proj.weight[kv_rows[j]] = 0
                attention.o_proj.weight[:, q_rows[j]] = 0
            for c in removed_channels.get(i, []):
                layer.mlp.gate_proj.weight[c] = 0
                layer.mlp.up_proj.weight[c] = 0
                layer.mlp.down_proj.weight[:, c] = 0
    return masked


def slice_groups(model, removed_kv, removed_channels):
    hd = head_dim(model.config)
    sliced = copy.deepcopy(model)
    shapes = []
    for i, (layer, shape) in enumerate(zip(sliced.model.layers, layer_shapes(sliced.config), strict=True)):
        keep_kv = torch.tensor([j for j in range(shape.num_key_value_heads) if j not in removed_kv.get(i, [])])
        keep_ch = torch.tensor([c for c in range(shape.intermediate_size) if c not in removed_channels.get(i, [])])
        shapes.append(shrink_layer(layer, shape, hd, keep_kv, keep_ch))
    set_layer_shapes(sliced.config, shapes)
    return sliced


def test_attention_groups_couple_query_heads_to_their_kv_head():
    shape = LayerShape(num_attention_heads=6, num_key_value_heads=2, intermediate_size=32)
    q_rows, kv_rows = attention_group_index(shape, hd=4)
    # KV head 1 serves query heads 3,4,5 (HF repeat_kv: query head i reads KV head i // 3).
    assert q_rows[1].tolist() == list(range(12, 24))
    assert kv_rows[1].tolist() == list(range(4, 8))


def test_group_sums_add_up_each_groups_weights(tiny_model):
    layer, shape = tiny_model.model.layers[0], layer_shapes(tiny_model.config)[0]
    hd = head_dim(tiny_model.config)
    ones = {name: torch.ones_like(linear.weight) for name, linear in prunable_linears(layer).items()}
    attention, mlp = group_sums(shape, hd, ones)
    hidden = tiny_model.config.hidden_size
    per_group = hidden * hd * (2 * shape.queries_per_kv_head + 2)  # q + o for each query head, k + v
    assert attention.tolist() == [per_group] * shape.num_key_value_heads
    assert mlp.tolist() == [3 * hidden] * shape.intermediate_size


@pytest.mark.parametrize("use_cache", [False, True])
def test_slicing_equals_zeroing_the_same_groups(tiny_model, use_cache):
    n_kv = tiny_model.config.num_key_value_heads
    removed_kv = {0: [0], 2: [n_kv - 1]} if n_kv > 1 else {}
    removed_channels = {0: [1, 5, 7], 1: list(range(0, 128, 3)), 2: [127]}
    masked = zero_groups(tiny_model, removed_kv, removed_channels)
    sliced = slice_groups(tiny_model, removed_kv, removed_channels)
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if use_cache:  # prefill then one decode step through the KV cache, at per-layer head counts
            out_m = masked(ids[:, :-1], use_cache=True)
            out_s = sliced(ids[:, :-1], use_cache=True)
            expected = masked(ids[:, -1:], past_key_values=out_m.past_key_values).logits
            actual = sliced(ids[:, -1:], past_key_values=out_s.past_key_values).logits
        else:
            expected, actual = masked(ids).logits, sliced(ids).logits
    assert (expected - actual).abs().max().item() <= 1e-5
    assert (masked(ids).logits - tiny_model(ids).logits).abs().max() > 1e-3  # the removal mattered


def test_slicing_makes_smaller_linears_and_counts_match():
    model = make_model(heads=6, kv_heads=2, tied=False)
    before = model_parameter_count(model)
    sliced = slice_groups(model, {1: [0]}, {1: list(range(64))})
    shapes = layer_shapes(sliced.config)
    assert shapes[1] == LayerShape(num_attention_heads=3, num_key_value_heads=1, intermediate_size=64)
    attention = sliced.model.layers[1].self_attn
    assert attention.q_proj.weight.shape == (48, 64) and attention.o_proj.weight.shape == (64, 48)
    assert attention.num_key_value_groups == 3
    assert sliced.model.layers[1].mlp.down_proj.weight.shape == (64, 64)
    removed = layer_parameter_count(model.config, layer_shapes(model.config)[1]) - layer_parameter_count(
        model.config, shapes[1]
    )
    assert model_parameter_count(sliced) == before - removed
    assert config_parameter_count(sliced.config) == model_parameter_count(sliced)


def test_tied_embedding_counts_once():
    tied, untied = make_model(tied=True), make_model(tied=False)
    assert model_parameter_count(untied) - model_parameter_count(tied) == 300 * 64
    assert [config_parameter_count(m.config) for m in (tied, untied)] == [
        model_parameter_count(m) for m in (tied, untied)
    ]


@pytest.mark.parametrize("block", ["attention", "mlp", "both"])
def test_a_whole_block_can_be_removed(tiny_model, tokenizer, tmp_path, block):
    from saap.runtime.checkpoint import load_checkpoint, save_checkpoint

    n_kv = tiny_model.config.num_key_value_heads
    removed_kv = {1: list(range(n_kv))} if block in ("attention", "both") else {}
    removed_channels = {1: list(range(128))} if block in ("mlp", "both") else {}
    masked = zero_groups(tiny_model, removed_kv, removed_channels)
    sliced = slice_groups(tiny_model, removed_kv, removed_channels)
    shape = layer_shapes(sliced.config)[1]
    assert (shape.num_key_value_heads == 0) == (block != "mlp") and (shape.intermediate_size == 0) == (
        block != "attention"
    )
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert (masked(ids).logits - sliced(ids).logits).abs().max() <= 1e-5
    save_checkpoint(sliced, tokenizer, tmp_path / "ckpt", {})
    reloaded, _, _ = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, sliced(ids).logits)
        # generation through the KV cache still works with a layer that never writes to it
        out = reloaded.generate(ids, max_new_tokens=4, do_sample=False)
        expected = masked.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_narrowing_query_heads_inside_kv_groups_equals_masking_them(family):
    """Minitron-style head pruning: every kept KV group keeps the same number of its own query heads."""
    model = make_model(heads=6, kv_heads=2, tied=False, family=family)
    hd = head_dim(model.config)
    keep_kv = {0: torch.tensor([0, 1]), 1: torch.tensor([1])}  # layer 1 also loses KV group 0
    keep_queries = {0: torch.tensor([[0, 2], [1, 2]]), 1: torch.tensor([[0]])}  # slots inside each group
    masked, sliced = copy.deepcopy(model), copy.deepcopy(model)
    shapes = layer_shapes(model.config)
    with torch.no_grad():
        for i, groups in keep_kv.items():
            columns = set(attention_columns(shapes[i], hd, groups, keep_queries[i]).tolist())
            dropped = [c for c in range(shapes[i].num_attention_heads * hd) if c not in columns]
            masked.model.layers[i].self_attn.o_proj.weight[:, dropped] = 0
    new = [
        shrink_layer(layer, shapes[i], hd, keep_kv[i], torch.arange(128), keep_queries[i])
        if i in keep_kv
        else shapes[i]
        for i, layer in enumerate(sliced.model.layers)
    ]
    set_layer_shapes(sliced.config, new)
    assert new[0] == LayerShape(4, 2, 128) and new[1] == LayerShape(1, 1, 128)
    assert sliced.model.layers[0].self_attn.num_key_value_groups == 2
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (masked(ids).logits - sliced(ids).logits).abs().max().item() <= 1e-5
    assert config_parameter_count(sliced.config) == model_parameter_count(sliced)

"""The fused ONNX decoder graph (export/onnx_fused.py): parity with torch, onnxruntime-genai, quantized ops."""

import json

import numpy as np
import onnx
import pytest
import torch

from saap.export.onnx import max_abs_diff_vs_torch
from saap.export.onnx_fused import build_fused_graph, kv_layers, write_fused
from saap.runtime.families import family_of
from saap.runtime.onnx_engine import OnnxSession
from saap.runtime.surgery import has_attention, has_mlp, head_dim, layer_shapes
from tests.conftest import ARCHITECTURES, make_model
from tests.runtime.test_surgery import slice_groups


def session_of(proto, threads: int = 1) -> OnnxSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return OnnxSession(ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]))


def pruned(heads, kv_heads, tied, hd=16):
    """Per-layer pruned: layer 0 loses a KV group (where it has more than one), layer 1 a quarter of its MLP."""
    model = make_model(heads=heads, kv_heads=kv_heads, tied=tied, head_dim=hd)
    return slice_groups(model, {0: [0]} if kv_heads > 1 else {}, {1: list(range(32))})


def blocks_removed(tied=True):
    """Layer 1 without attention, layer 2 without MLP (layer 0 keeps both: HF's cache reads layer 0)."""
    model = make_model(heads=6, kv_heads=2, layers=4, tied=tied)
    model = slice_groups(model, {1: [0, 1], 3: [1]}, {2: list(range(128)), 0: list(range(16))})
    assert not has_attention(model.model.layers[1]) and not has_mlp(model.model.layers[2])
    return model


# The other families (Llama is the cases above): what each adds to the graph is its adapter's hooks.
OTHER_FAMILIES = ("mistral", "qwen2", "qwen3", "gemma3_text")


def family_dense(family: str):
    """Dense, GQA, tied. Mistral gets a sliding window of 8 (its tiny config has none), which the tests'
    prompts cross, as they cross Gemma 3's."""
    model = make_model(heads=6, kv_heads=2, tied=True, family=family)
    if family == "mistral":
        model.config.sliding_window = 8
    return model


def family_pruned(family: str):
    """MHA, untied, per-layer pruned: layer 0 loses a head and a quarter of its MLP, layer 1 its whole
    attention, layer 2 its whole MLP (layer 0 keeps both: HF's cache reads layer 0)."""
    model = make_model(heads=4, kv_heads=4, tied=False, family=family)
    model = slice_groups(model, {0: [1], 1: [0, 1, 2, 3]}, {0: list(range(32)), 2: list(range(128))})
    assert not has_attention(model.model.layers[1]) and not has_mlp(model.model.layers[2])
    return model


FAMILY_MODELS = {
    **{f"{family}-dense-gqa-tied": (lambda f=family: family_dense(f)) for family in OTHER_FAMILIES},
    **{f"{family}-pruned-mha-untied": (lambda f=family: family_pruned(f)) for family in OTHER_FAMILIES},
}

MODELS = {
    **{
        f"dense-{name}": (lambda a=arch: make_model(heads=a[0], kv_heads=a[1], tied=a[2]))
        for name, arch in ARCHITECTURES.items()
    },
    **{f"pruned-{name}": (lambda a=arch: pruned(*a)) for name, arch in ARCHITECTURES.items()},
    "blocks-removed-tied": lambda: blocks_removed(True),
    "blocks-removed-untied": lambda: blocks_removed(False),
    **FAMILY_MODELS,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_fp32_fused_graph_prefills_and_decodes_like_torch(name):
    model = MODELS[name]()
    graph = session_of(build_fused_graph(model, "fp32"))
    assert max_abs_diff_vs_torch(model, graph, prompt_len=12, steps=4) <= 1e-3
    # and a second prompt chunk on top of the cache (GroupQueryAttention's "subsequent prompt")
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=20)
    with torch.no_grad():
        expected = model(torch.tensor(ids[None])).logits[0].numpy()
    _, cache = graph.run(ids[None, :8], graph.empty_cache())
    logits, _ = graph.run(ids[None, 8:], cache)
    assert float(np.abs(logits[0] - expected[8:]).max()) <= 1e-3


def test_graph_interface_and_fused_ops():
    model = blocks_removed()
    proto = build_fused_graph(model, "fp32")
    shapes, hd = layer_shapes(model.config), head_dim(model.config)
    kv = kv_layers(model)
    assert kv == [0, 2, 3]

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {v.name: dims(v) for v in proto.graph.input}
    outputs = {v.name: dims(v) for v in proto.graph.output}
    cache = [f"past_key_values.{j}.{kind}" for j in range(len(kv)) for kind in ("key", "value")]
    assert list(inputs) == ["input_ids", "attention_mask", *cache]
    assert list(outputs) == ["logits", *(c.replace("past_key_values", "present") for c in cache)]
    for j, i in enumerate(kv):
        assert inputs[f"past_key_values.{j}.key"][1:4:2] == [shapes[i].num_key_value_heads, hd]
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("GroupQueryAttention") == 3
    assert ops.count("SimplifiedLayerNormalization") == 1
    # one Skip norm before every remaining block after the first, plus the final norm
    assert ops.count("SkipSimplifiedLayerNormalization") == 3 + 3 - 1 + 1
    assert ops.count("Sigmoid") == 3
    assert not {"Concat", "Softmax", "Expand"} & set(ops)  # no Concat-grown cache, no unfused attention
    gqa = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    for node, i in zip(gqa, kv, strict=True):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["num_heads"] == shapes[i].num_attention_heads
        assert attrs["kv_num_heads"] == shapes[i].num_key_value_heads
        assert attrs["do_rotary"] == 1 and attrs["rotary_interleaved"] == 0
    assert json.loads({p.key: p.value for p in proto.metadata_props}["saap.kv_layers"]) == kv
    # the tied table is stored once
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    tables = [i for i in proto.graph.initializer if sorted(i.dims) == sorted([vocab, hidden])]
    assert len(tables) == 1


def _attributes(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_family_hooks_shape_the_graph():
    """Gemma 3: FastGelu, a window on sliding layers only, a second RoPE cache pair for them, every norm
    weight stored as 1 + w, the embedding scaled; Qwen3: q/k norms, GroupQueryAttention unpacked."""
    gemma = family_dense("gemma3_text")
    proto = build_fused_graph(gemma, "fp32")
    ops = [n.op_type for n in proto.graph.node]
    assert "FastGelu" in ops and "Sigmoid" not in ops
    gqa = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    windows = [_attributes(n)["local_window_size"] for n in gqa]
    assert windows == [8 if t == "sliding_attention" else -1 for t in gemma.config.layer_types]
    caches = {n.input[7] for n in gqa}
    assert len(caches) == 2 and {n.input[7] for n, w in zip(gqa, windows, strict=True) if w == -1} == {"cos_cache_1"}
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    layer = gemma.model.layers[0]
    for name, norm in [("model.norm", gemma.model.norm), ("model.layers.0.self_attn.q_norm", layer.self_attn.q_norm),
                       ("model.layers.0.post_feedforward_layernorm", layer.post_feedforward_layernorm)]:  # fmt: skip
        np.testing.assert_allclose(weights[f"{name}.weight"], norm.weight.detach().numpy() + 1, rtol=1e-6)
    assert "/model/embed_tokens/Mul" in {n.name for n in proto.graph.node}
    # a sandwich layer: pre- and post-norm per block, q and k norms
    assert ops.count("SimplifiedLayerNormalization") == 1 + 6 * (2 + 2)
    qwen3 = build_fused_graph(family_dense("qwen3"), "fp32")
    gqa = [n for n in qwen3.graph.node if n.op_type == "GroupQueryAttention"]
    assert all(n.input[1] and n.input[2] for n in gqa)  # separate q, k, v
    assert [n.op_type for n in qwen3.graph.node].count("SimplifiedLayerNormalization") == 1 + 3 * 2


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_int8_fused_graph_of_each_family_runs_and_keeps_the_top_token(name):
    model = FAMILY_MODELS[name]()
    graph, reference = session_of(build_fused_graph(model, "int8")), session_of(build_fused_graph(model, "fp32"))
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(1, 24))
    (quantized, cache), (full, full_cache) = (
        graph.run(ids[:, :20], graph.empty_cache()),
        reference.run(ids[:, :20], reference.empty_cache()),
    )
    step, full_step = graph.run(ids[:, 20:], cache)[0], reference.run(ids[:, 20:], full_cache)[0]
    same = np.concatenate([quantized.argmax(-1) == full.argmax(-1), step.argmax(-1) == full_step.argmax(-1)], -1)
    assert np.isfinite(quantized).all() and np.isfinite(step).all()
    assert same.mean() >= 0.75


def test_rope_scaling_is_taken_from_the_model():
    """A Llama-3-style rope_scaling changes the caches; the graph still matches torch."""
    model = make_model(heads=4, kv_heads=2)
    config = model.config
    config.rope_scaling = {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }  # fmt: skip
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.model.rotary_emb = LlamaRotaryEmbedding(config)
    graph = session_of(build_fused_graph(model, "fp32"))
    assert max_abs_diff_vs_torch(model, graph, prompt_len=40, steps=3) <= 1e-3


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("layout", ["offsets", "folded", "zero_points"])
def test_quantized_graphs_use_matmulnbits_and_gqa_and_run(precision, layout):
    model = pruned(6, 2, False, hd=32)  # pruned widths stay multiples of 32
    proto = build_fused_graph(model, precision, layout=layout)
    ops = [n.op_type for n in proto.graph.node]
    assert "MatMulNBits" in ops and ops.count("GroupQueryAttention") == 3
    assert "GatherBlockQuantized" in ops
    assert not any(n.op_type == "MatMul" and n.input[1].endswith(".weight") for n in proto.graph.node)
    if layout == "zero_points":
        nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits" and len(n.input) == 4]
        assert nbits and all(n.input[3].endswith(".qzeros") for n in nbits)
    graph = session_of(proto)
    reference = session_of(build_fused_graph(model, "fp32"))
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(1, 24))
    quantized, _ = graph.run(ids, graph.empty_cache())
    full, _ = reference.run(ids, reference.empty_cache())
    assert np.isfinite(quantized).all()
    counts = json.loads({p.key: p.value for p in proto.metadata_props}["saap.fused"])["matmuls"]
    if precision == "int4":  # down_proj in 8 bits: random weights are off the 4-bit grid
        assert counts[f"int8 {layout}"] == 3 and counts[f"int4 {layout}"] == 3 * 4
    if precision == "int8":  # (random weights at 4 bits are too coarse for a logit comparison: see below)
        assert np.corrcoef(quantized.ravel(), full.ravel())[0, 1] > 0.99


def snap_to_grids(model):
    """Every projection on its asymmetric 4-bit block grid (GGUF Q4_1-like), the embedding / lm_head on
    the symmetric 8-bit block grid: the `offsets` layout then stores every weight exactly."""
    from saap.export.onnx_quant import quantize_blocks
    from saap.runtime.surgery import prunable_linears

    def snap(weight: torch.Tensor, bits: int, symmetric: bool) -> None:
        w = weight.detach().numpy().T  # [K, N]
        q, scale, low = quantize_blocks(w, bits, symmetric)
        q = q.astype(np.float64)  # (uint8 arithmetic would wrap)
        values = (q - 2 ** (bits - 1)) * scale[..., None] if symmetric else q * scale[..., None] + low[..., None]
        weight.data = torch.tensor(values.reshape(w.shape[1], w.shape[0]), dtype=torch.float32)

    with torch.no_grad():
        for layer in model.model.layers:
            for linear in prunable_linears(layer).values():
                snap(linear.weight, 4, symmetric=False)
        snap(model.model.embed_tokens.weight, 8, symmetric=True)
        if not model.config.tie_word_embeddings:
            snap(model.lm_head.weight, 8, symmetric=True)
    return model


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("layout", ["offsets", "folded"])
def test_offsets_layouts_are_exact_for_weights_on_their_grid(precision, tied, layout):
    """The default int4 / int8 layout loses nothing on weights that sit on its grid (the embedded
    SmolLM2 is a Q4_1 GGUF): greedy tokens and each position's top logit equal the float graph's; the
    folded one only rounds its offsets (3 base-16 digits per output column)."""
    model = snap_to_grids(pruned(6, 2, tied, hd=32))
    proto = build_fused_graph(model, precision, layout=layout)
    if precision == "int4":  # every down_proj sits on the 4-bit grid: stored at 4 bits, losslessly
        counts = json.loads({p.key: p.value for p in proto.metadata_props}["saap.fused"])["matmuls"]
        assert counts == {f"int4 {layout}": 12, f"int4 {layout}, down_proj kept on its grid": 3}
    graph, reference = session_of(proto), session_of(build_fused_graph(model, "fp32"))
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(1, 24))
    (quantized, cache), (full, full_cache) = (
        graph.run(ids[:, :20], graph.empty_cache()),
        reference.run(ids[:, :20], reference.empty_cache()),
    )
    step, full_step = graph.run(ids[:, 20:], cache)[0], reference.run(ids[:, 20:], full_cache)[0]
    tolerance = 1e-3 if layout == "offsets" else 1e-2  # folded: ~3e-3 on logits of ~5 here
    for q, f in [(quantized, full), (step, full_step)]:
        assert (q.argmax(-1) == f.argmax(-1)).all()
        assert np.abs(q.max(-1) - f.max(-1)).max() <= tolerance


def _greedy_torch(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("name", ["pruned-gqa-untied", "blocks-removed-tied", *FAMILY_MODELS])
def test_onnxruntime_genai_runs_the_fused_graph_with_a_shared_buffer(name, tmp_path, tokenizer):
    """onnxruntime-genai runs the export of every family as it is, past the sliding windows: torch's
    greedy tokens, and the logits each was chosen from (tied Gemma's greedy tokens alone repeat one)."""
    og = pytest.importorskip("onnxruntime_genai")
    model = MODELS[name]()
    out = write_fused(model, tmp_path / "fused", "fp32", tokenizer=tokenizer)
    config = json.loads((out / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    assert config["model"]["decoder"]["num_hidden_layers"] == len(kv_layers(model))
    assert config["model"]["type"] == family_of(model).genai_type
    prompt = [5, 9, 17, 33, 2, 40, 7, 11, 12, 13]
    genai = og.Model(str(out))
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=len(prompt) + 12, do_sample=False)
    generator = og.Generator(genai, params)
    generator.append_tokens(prompt)
    ids, worst = list(prompt), 0.0
    while not generator.is_done():
        generator.generate_next_token()
        logits = np.asarray(generator.get_output("logits"))[0, -1]  # those the token was chosen from
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0, -1].numpy()
        worst = max(worst, float(np.abs(logits - expected).max()))
        ids.append(int(generator.get_next_tokens()[0]))
    assert ids[len(prompt) :] == _greedy_torch(model, prompt, len(ids) - len(prompt))
    assert worst <= 1e-3

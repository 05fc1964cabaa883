import pytest
import torch

from saap.pipeline.prune.estimators import ESTIMATORS, accumulate_gradients, make_estimator, score_groups
from saap.runtime.surgery import attention_group_index, head_dim, layer_shapes, prunable_linears
from tests.conftest import make_model


def batches(n=3, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (2, seq), generator=g) for _ in range(n)]


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_scores_every_group(tiny_model, name):
    scores = score_groups(tiny_model, make_estimator(name), batches(), progress=False)
    for shape, attention, mlp in zip(layer_shapes(tiny_model.config), scores.attention, scores.mlp, strict=True):
        assert attention.shape == (shape.num_key_value_heads,) and mlp.shape == (shape.intermediate_size,)
        assert torch.isfinite(attention).all() and (attention >= 0).all() and (mlp >= 0).all()
    assert all(p.grad is None for p in tiny_model.parameters())  # no gradient memory left behind


def _reference_gradients(model, data):
    """Per-weight gradient of the mean loss over all samples (all batches at once), the plain way."""
    reference = make_model(**_same_arch(model))
    reference.load_state_dict(model.state_dict())
    everything = torch.cat(data)
    reference(input_ids=everything, labels=everything).loss.backward()
    layer = reference.model.layers[1]
    return {name: (lin.weight.detach(), lin.weight.grad.detach()) for name, lin in prunable_linears(layer).items()}


def _same_arch(model):
    c = model.config
    return {
        "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "layers": c.num_hidden_layers,
        "tied": c.tie_word_embeddings,
    }


def test_taylor_scores_match_a_hand_computation(tiny_model):
    data = batches()
    wg = {name: w * g for name, (w, g) in _reference_gradients(tiny_model, data).items()}
    shape, hd = layer_shapes(tiny_model.config)[1], head_dim(tiny_model.config)
    q_rows, kv_rows = attention_group_index(shape, hd)
    j = shape.num_key_value_heads - 1
    group_terms = torch.cat(
        [
            wg["q_proj"][q_rows[j]].flatten(),
            wg["k_proj"][kv_rows[j]].flatten(),
            wg["v_proj"][kv_rows[j]].flatten(),
            wg["o_proj"][:, q_rows[j]].flatten(),
        ]
    )
    channel_terms = torch.cat([wg["gate_proj"][5], wg["up_proj"][5], wg["down_proj"][:, 5]])

    element = score_groups(tiny_model, make_estimator("taylor-element"), data, progress=False)
    vector = score_groups(tiny_model, make_estimator("taylor-vector"), data, progress=False)
    torch.testing.assert_close(element.attention[1][j], group_terms.abs().sum(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(vector.attention[1][j], group_terms.sum().abs(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(element.mlp[1][5], channel_terms.abs().sum(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(vector.mlp[1][5], channel_terms.sum().abs(), rtol=1e-4, atol=1e-6)
    # |sum| <= sum|.|, with cancellation making it strictly smaller somewhere
    assert (vector.mlp[1] <= element.mlp[1] + 1e-6).all() and (vector.mlp[1] < element.mlp[1]).any()


def test_magnitude_is_the_groups_l2_norm(tiny_model):
    scores = score_groups(tiny_model, make_estimator("magnitude"), progress=False)
    mlp = tiny_model.model.layers[0].mlp
    expected = torch.cat([mlp.gate_proj.weight[2], mlp.up_proj.weight[2], mlp.down_proj.weight[:, 2]]).norm()
    torch.testing.assert_close(scores.mlp[0][2], expected)


def test_random_is_reproducible_with_its_seed(tiny_model):
    a = score_groups(tiny_model, make_estimator("random", seed=3), progress=False)
    b = score_groups(tiny_model, make_estimator("random", seed=3), progress=False)
    c = score_groups(tiny_model, make_estimator("random", seed=4), progress=False)
    assert torch.equal(a.mlp[0], b.mlp[0]) and not torch.equal(a.mlp[0], c.mlp[0])


def test_gradients_accumulate_over_batches_and_only_on_prunable_weights():
    """The accumulated gradient is the mean over samples, so batches of any size give the same."""
    model = make_model()
    data = batches(n=2)
    accumulate_gradients(model, data, progress=False)
    assert model.model.embed_tokens.weight.grad is None
    together = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    separately = torch.zeros_like(together)
    for batch in data:
        accumulate_gradients(model, [batch], progress=False)
        separately += model.model.layers[0].mlp.up_proj.weight.grad / len(data)
    torch.testing.assert_close(together, separately)
    accumulate_gradients(model, [torch.cat(data)], progress=False)
    torch.testing.assert_close(together, model.model.layers[0].mlp.up_proj.weight.grad, rtol=1e-4, atol=1e-7)


def test_gradient_estimators_need_calibration(tiny_model):
    with pytest.raises(ValueError, match="calibration"):
        score_groups(tiny_model, make_estimator("taylor-element"), None)

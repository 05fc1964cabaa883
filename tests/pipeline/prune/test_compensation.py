import pytest
import torch
from torch import nn

from saap.pipeline.prune import PruneSettings, prune
from saap.pipeline.prune.compensation import input_grams, refit
from saap.runtime.errors import SaapError
from saap.runtime.models import LoadedModel
from tests.conftest import make_model


def gram(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x


def test_refit_with_every_column_kept_changes_nothing():
    torch.manual_seed(0)
    linear, x = nn.Linear(12, 5, bias=False), torch.randn(64, 12)
    before = linear.weight.detach().clone()
    errors = refit(linear, torch.arange(12), gram(x))
    assert torch.allclose(linear.weight, before, atol=1e-5)
    assert errors[0] == pytest.approx(0.0, abs=1e-9) and errors[1] == pytest.approx(0.0, abs=1e-6)


def test_refit_carries_a_removed_channel_that_the_kept_ones_predict():
    torch.manual_seed(0)
    linear, x = nn.Linear(8, 4, bias=False), torch.randn(256, 8)
    x[:, 7] = 2 * x[:, 0] - x[:, 3]  # channel 7 is redundant: the fit can move its weight onto 0 and 3
    dense = linear(x).detach()
    kept = torch.arange(7)
    sliced = x[:, kept] @ linear.weight[:, kept].T.detach()
    errors = refit(linear, kept, gram(x))
    refitted = x[:, kept] @ linear.weight[:, kept].T
    # slicing alone loses ~40 % of the output; the fit leaves only what the ridge costs
    assert errors[0] > 0.3 and errors[1] < errors[0] / 4
    assert (refitted - dense).norm() < 0.5 * (sliced - dense).norm()


def test_input_grams_sum_every_token_of_every_batch():
    model = make_model(heads=4, kv_heads=2, layers=2)
    batches = [torch.randint(3, 300, (2, 9)), torch.randint(3, 300, (1, 9))]
    inputs = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    grams = input_grams(model, batches, {(1, "mlp"): None, (0, "attention"): None})
    handle.remove()
    x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs])
    assert set(grams) == {(1, "mlp"), (0, "attention")}
    assert torch.allclose(grams[(1, "mlp")], x.T @ x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("heads,kv_heads,tied", [(8, 8, True), (8, 4, False)])
def test_least_squares_lowers_every_sliced_projections_error(tokenizer, text_file, heads, kv_heads, tied):
    model = make_model(heads=heads, kv_heads=kv_heads, layers=4, intermediate=512, head_dim=8, tied=tied)
    loaded = LoadedModel(model, tokenizer, {"name": "tiny", "sha256": "0" * 64})
    settings = PruneSettings(
        method="llm-pruner",
        compensation="least-squares",
        calibration=str(text_file),
        num_samples=4,
        seq_len=16,
        align=8,
    )
    record = prune(loaded, settings, progress=False)
    fit = record["least_squares"]
    assert fit["projections"] > 0
    assert fit["relative_error_refit"] < fit["relative_error_sliced"]
    assert record["calibration"] is not None
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_compensation_is_the_presets_unless_given():
    assert PruneSettings(method="flap").compensation == "flap-bias"
    assert PruneSettings(method="flap", compensation="none").compensation == "none"
    assert PruneSettings(method="llm-pruner").compensation == "none"
    # least squares reads the calibration text even where the importance does not
    assert PruneSettings(method="magnitude", compensation="least-squares").needs_calibration


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"compensation": "obs"}, "unknown compensation"),
        ({"method": "saap", "compensation": "flap-bias"}, "reads --importance flap or wanda-sp"),
        (
            {"method": "flap", "allocation": "measured", "target_speedup": 1.5, "engine": "torch"},
            "adds parameters",
        ),
    ],
)
def test_bad_compensations_are_refused(kwargs, message):
    with pytest.raises(SaapError, match=message):
        PruneSettings(**kwargs)

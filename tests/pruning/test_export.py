"""`shrink` cuts zeroed channels out of the reference models without changing what they compute, or says why not.

The channel groups come from the model's graph, traced on example inputs (`dependency.analyze`).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import pytest
import torch
from torch import nn

from lightning_eff.pruning.export import shrink
from lightning_eff.pruning.structured_shrink import ShrinkError
from lightning_eff.tasks.digits import DigitsCNN, DigitsMLP
from lightning_eff.tasks.gpt import TinyGPT


def count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def linear_params(widths: list[int]) -> int:
    """Parameters of a Linear stack with these widths (input first)."""
    return sum((fan_in + 1) * fan_out for fan_in, fan_out in pairwise(widths))


@torch.no_grad()
def zero_channels(producer: nn.Module, channels: list[int], norm: nn.Module | None = None) -> None:
    """What channel pruning leaves behind: the output rows, their bias and the BatchNorm's gamma and beta at 0."""
    producer.weight[channels] = 0
    producer.bias[channels] = 0
    if norm is not None:
        norm.weight[channels] = 0
        norm.bias[channels] = 0


def assert_same_outputs(original: nn.Module, shrunk: nn.Module, inputs: torch.Tensor) -> None:
    original.eval()
    shrunk.eval()
    with torch.no_grad():
        torch.testing.assert_close(shrunk(inputs), original(inputs), atol=1e-5, rtol=0)


def parameters_of(summary: dict, layer: str) -> tuple[int, int]:
    return summary[layer].parameters


def images() -> torch.Tensor:
    return torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def mlp() -> nn.Module:
    return DigitsMLP(hidden_sizes=[64, 64])


def cnn() -> nn.Module:
    model = DigitsCNN(channels=[8, 16])
    # Train-mode passes move the running statistics away from (0, 1), so eval-mode BatchNorm is not trivial.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8) + 0.5)
    return model.eval()


def gpt() -> nn.Module:
    return TinyGPT(n_layer=2, n_head=2, d_model=32, seq_len=16)


MODELS: list[tuple[Callable[[], nn.Module], Callable[[], dict[str, torch.Tensor]]]] = [
    (mlp, lambda: {"images": images()}),
    (cnn, lambda: {"images": images()}),
    (gpt, lambda: {"tokens": tokens()}),
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(("build", "inputs"), MODELS, ids=["mlp", "cnn", "gpt"])
def test_an_unpruned_model_is_refused_not_returned_unchanged(build, inputs) -> None:
    with pytest.raises(ShrinkError, match="no zeroed channel in any prunable group"):
        shrink(build(), inputs())
    with pytest.raises(ShrinkError, match="needs example_kwargs"):
        shrink(build())


def test_mlp_loses_pruned_rows_and_the_next_layers_columns() -> None:
    model = mlp()
    zero_channels(model.net[1], [3, 10, 11])
    zero_channels(model.net[4], [0, 20, 21, 63])
    before = count(model)

    shrunk, summary = shrink(model, {"images": images()})

    assert_same_outputs(model, shrunk, images())
    assert count(shrunk) == linear_params([64, 61, 60, 10])
    assert count(model) == before, "shrink must leave its input alone"
    assert shrunk.state_dict().keys() == model.state_dict().keys()
    assert (shrunk.net[1].out_features, shrunk.net[4].in_features, shrunk.net[4].out_features) == (61, 61, 60)
    assert shrunk.net[4].weight.shape == (60, 61)
    assert {layer: change.parameters for layer, change in summary.items()} == {
        "net.1": (65 * 64, 65 * 61),
        "net.4": (65 * 64, 62 * 60),
        "net.7": (65 * 10, 61 * 10),
    }


def test_cnn_loses_filters_batchnorm_entries_and_input_channels() -> None:
    model = cnn()
    zero_channels(model.net[0], [1, 5], norm=model.net[1])
    zero_channels(model.net[3], [0, 7, 8, 15], norm=model.net[4])

    shrunk, summary = shrink(model, {"images": images()})

    assert_same_outputs(model, shrunk, images())

    def conv_bn(fan_in: int, fan_out: int) -> int:
        return (fan_in * 9 + 1) * fan_out + 2 * fan_out

    assert count(shrunk) == conv_bn(1, 6) + conv_bn(6, 12) + (12 + 1) * 10
    assert shrunk.state_dict().keys() == model.state_dict().keys()
    assert shrunk.net[1].running_mean.shape == (6,)
    assert shrunk.net[4].num_features == 12
    assert (shrunk.net[3].in_channels, shrunk.net[3].out_channels, shrunk.net[8].in_features) == (6, 12, 12)
    assert summary["net.1"].shapes["running_mean"] == ((8,), (6,))


def test_gpt_mlps_lose_hidden_units_and_the_rest_stays() -> None:
    model = gpt()
    zero_channels(model.blocks[0].mlp.fc, [0, 1, 2, 64])
    zero_channels(model.blocks[1].mlp.fc, list(range(100)))

    shrunk, summary = shrink(model, {"tokens": tokens()})

    assert_same_outputs(model, shrunk, tokens())
    # Each hidden unit is a row of fc (32 weights + bias) and a column of proj (32 weights).
    assert count(model) - count(shrunk) == (4 + 100) * (32 + 1 + 32)
    assert shrunk.state_dict().keys() == model.state_dict().keys()
    assert shrunk.blocks[1].mlp.proj.weight.shape == (32, 28)
    assert shrunk.blocks[0].attn.qkv.weight.shape == model.blocks[0].attn.qkv.weight.shape
    assert set(summary) == {f"blocks.{i}.mlp.{layer}" for i in (0, 1) for layer in ("fc", "proj")}


def test_zero_weights_alone_do_not_make_a_channel_prunable() -> None:
    model = cnn()
    # A zero filter still outputs its bias, and a zero conv output still leaves BatchNorm as beta - gamma*mean/std.
    zero_channels(model.net[0], [2])
    with torch.no_grad():
        model.net[3].weight[4] = 0
    with pytest.raises(ShrinkError, match="no zeroed channel"):
        shrink(model, {"images": images()})


def test_fully_pruned_layer_keeps_one_zero_channel() -> None:
    model = mlp()
    zero_channels(model.net[1], list(range(64)))

    shrunk, _ = shrink(model, {"images": images()})

    assert (shrunk.net[1].out_features, shrunk.net[4].in_features) == (1, 1)
    assert_same_outputs(model, shrunk, images())


def test_flatten_without_pooling_removes_each_channels_block_of_features() -> None:
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU()), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    ).double()
    zero_channels(model[0][0], [1, 2])
    example = torch.randn(2, 2, 5, 5, dtype=torch.float64)

    shrunk, summary = shrink(model, {"input": example})

    assert set(summary) == {"0.0", "2"}
    assert shrunk[2].weight.shape == (3, 2 * 5 * 5)
    assert shrunk[2].weight.dtype == torch.float64
    assert_same_outputs(model, shrunk, example)


class Residual(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


def test_a_hidden_layer_inside_a_residual_branch_is_shrunk_exactly() -> None:
    model = nn.Sequential(Residual(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), nn.ReLU(), nn.Linear(4, 4))
    zero_channels(model[0][0], [0, 1])
    example = torch.randn(3, 4)
    shrunk, summary = shrink(model, {"input": example})
    assert shrunk[0][0].weight.shape == (6, 4) and shrunk[0][2].weight.shape == (4, 6)
    assert set(summary) == {"0.0", "0.2"}
    assert_same_outputs(model, shrunk, example)


@pytest.mark.parametrize(
    ("model", "error"),
    [
        (nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 4)), "changes the outputs"),
        (nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False), nn.Conv2d(4, 4, 1)), "changes the outputs"),
        (nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1, groups=2)), "no channel group that can be removed"),
    ],
    ids=["sigmoid", "norm-without-affine", "grouped-consumer"],
)
def test_zeros_that_do_not_stay_zero_are_refused_with_the_reason(model: nn.Module, error: str) -> None:
    zero_channels(model[0], [0, 1])
    if isinstance(model[1], nn.BatchNorm2d):  # a zero channel leaves -mean/std, not zero
        model[1].running_mean.fill_(0.5)
    example = torch.randn(2, 4) if isinstance(model[0], nn.Linear) else torch.randn(2, 4, 3, 3)
    with pytest.raises(ShrinkError, match=error):
        shrink(model.eval(), {"input": example})

"""The fake quantizers: torchao's forward numerics bit for bit, straight-through gradients, no graph breaks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_eff.quantization.fake_quant import (
    fake_quantize_activation,
    fake_quantize_weight,
    integer_range,
    quantize_weight,
)
from lightning_eff.quantization.prepare import FakeQuantizedLinear
from lightning_eff.quantization.schemes import SCHEMES


@pytest.mark.parametrize("scheme_name", list(SCHEMES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_equals_torchao_qat_bit_for_bit(scheme_name: str, dtype: torch.dtype) -> None:
    torchao_quantization = pytest.importorskip("torchao.quantization")
    from torchao.quantization.qat import QATConfig

    scheme = SCHEMES[scheme_name]
    torch.manual_seed(0)
    linear = nn.Linear(128, 64).to(dtype)
    inputs = torch.randn(3, 17, 128, dtype=dtype) * torch.logspace(-2, 1, 128, dtype=dtype)  # uneven ranges
    inputs[0, 0] = 0  # an all-zero token
    ours = FakeQuantizedLinear.from_linear(copy.deepcopy(linear), scheme, group_size=32)
    theirs = nn.Sequential(copy.deepcopy(linear))
    torchao_quantization.quantize_(theirs, QATConfig(scheme.torchao_config(32), step="prepare"))
    with torch.no_grad():
        assert torch.equal(ours(inputs), theirs(inputs))


def test_weight_gradient_is_straight_through_and_zero_weights_stay_zero() -> None:
    weight = torch.randn(16, 64)
    weight[:, :8] = 0
    weight.requires_grad_(True)
    fake_quantize_weight(weight, bits=4, group_size=32).sum().backward()
    assert weight.grad is not None and torch.equal(weight.grad, torch.ones_like(weight))
    assert (fake_quantize_weight(weight, 4, 32)[:, :8] == 0).all()


def test_activation_gradient_is_straight_through_and_values_sit_on_a_per_token_grid() -> None:
    x = torch.randn(4, 32, requires_grad=True)
    rounded = fake_quantize_activation(x)
    rounded.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones_like(x))
    for row in rounded.detach():  # at most 256 distinct levels per token, spaced by one scale
        levels = row.unique()
        assert len(levels) <= 256
        steps = levels.diff()
        assert torch.allclose(steps / steps.min(), (steps / steps.min()).round(), atol=1e-3)


@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (4, None), (8, None)])
def test_quantize_weight_gives_integers_in_range_that_reproduce_the_fake_quantized_weight(
    bits: int, group_size: int | None
) -> None:
    weight = torch.randn(8, 64)
    integers, scales = quantize_weight(weight, bits, group_size)
    low, high = integer_range(bits)
    assert integers.dtype == torch.int8 and int(integers.min()) >= low and int(integers.max()) <= high
    groups = 1 if group_size is None else 64 // group_size
    assert scales.shape == (8, groups)
    rebuilt = (integers.float().reshape(8, groups, -1) * scales.unsqueeze(-1)).reshape(8, 64)
    assert torch.equal(rebuilt, fake_quantize_weight(weight, bits, group_size).detach())


def test_fake_quantized_linear_compiles_without_graph_breaks() -> None:
    layer = FakeQuantizedLinear.from_linear(nn.Linear(64, 32), SCHEMES["int8_dynamic_act_int4_weight"], 32)
    explanation = torch._dynamo.explain(layer)(torch.randn(5, 64))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1

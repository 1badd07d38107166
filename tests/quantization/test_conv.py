"""Fake-quantized convolutions with their BatchNorm folded in (conv.py) and their conversion (QuantizedConv)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_eff.quantization.conv import (
    FakeQuantizedConv1d,
    FakeQuantizedConv2d,
    conv_batch_norm_pairs,
    fake_quantize_conv_weight,
    folded_weight_and_bias,
)
from lightning_eff.quantization.convert import QuantizedConv, convert, weight_bytes
from lightning_eff.quantization.prepare import (
    plan_layers,
    restore_float_modules,
    set_fake_quantize,
    swap_in_fake_quantized,
)
from lightning_eff.quantization.schemes import SCHEMES

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def conv_bn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():  # BatchNorm statistics and affine terms far from their defaults: folding must matter
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.3, 0.3)
    return model


def test_a_conv_and_its_batch_norm_train_folded_and_convert_to_the_same_conv() -> None:
    model, x = conv_bn(), torch.randn(4, 3, 10, 10)
    keys = list(model.state_dict())
    weight = model[0].weight
    swap_in_fake_quantized(model, ["0", "3"], SCHEMES["int8_weight_only"], 32)
    twin = model[0]
    assert isinstance(twin, FakeQuantizedConv2d) and twin.weight is weight and twin.folded_norm is model[1]
    assert list(model.state_dict()) == keys  # same names: checkpoints and optimizers see the float model

    model.eval()
    folded_weight, folded_bias = folded_weight_and_bias(twin, model[1])
    expected = F.conv2d(x, fake_quantize_conv_weight(folded_weight), folded_bias, padding=1)
    with torch.no_grad():
        assert torch.allclose(model[1](twin(x)), expected, atol=1e-5)  # in eval: exactly the folded, rounded conv
        fake = model(x)
        converted = convert(model)
        assert isinstance(converted[0], QuantizedConv) and isinstance(converted[1], nn.Identity)
        assert torch.allclose(converted(x), fake, atol=1e-5)

    set_fake_quantize(model, False)
    float_model = conv_bn()
    with torch.no_grad():
        assert torch.allclose(model(x), float_model.eval()(x), atol=1e-6)  # float until start_step


def test_training_uses_batch_statistics_updates_the_running_ones_and_reaches_every_parameter() -> None:
    model, x = conv_bn(), torch.randn(8, 3, 10, 10)
    swap_in_fake_quantized(model, ["0"], SCHEMES["int8_dynamic"], 32)
    model.train()
    before = model[1].running_mean.clone()
    normalized = model[1](model[0](x))
    assert not torch.equal(model[1].running_mean, before)  # the running statistics still update
    # normalized with the batch's statistics: each channel's mean over the batch is the BatchNorm's shift
    assert torch.allclose(normalized.mean(dim=(0, 2, 3)), model[1].bias.detach(), atol=1e-4)
    model(x).sum().backward()
    for parameter in (model[0].weight, model[0].bias, model[1].weight, model[1].bias, model[3].weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_a_zero_gamma_channel_stays_finite_and_outputs_beta() -> None:
    model, x = conv_bn(), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        model[1].weight[2] = 0.0  # zero-initialized residual BatchNorms start like this
    swap_in_fake_quantized(model, ["0"], SCHEMES["int8_weight_only"], 32)
    with torch.no_grad():
        out = model.eval()[1](model[0](x))
        assert torch.isfinite(out).all()
        assert torch.allclose(out[:, 2], model[1].bias[2].expand_as(out[:, 2]), atol=1e-6)
        assert torch.allclose(convert(model)[:2](x), out, atol=1e-5)


class Unnamed(nn.Module):
    """A conv and its BatchNorm that neither a Sequential nor torchvision's names pair: only a forward can."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv1d(4, 6, 3)
        self.scale = nn.BatchNorm1d(6)
        self.other = nn.BatchNorm1d(6)  # same width, never fed by the conv

    def forward(self, x: Tensor) -> Tensor:
        return self.scale(self.features(x)) + self.other(torch.ones(x.shape[0], 6, x.shape[2] - 2))


def test_pairs_come_from_a_forward_when_there_is_an_example_and_from_structure_otherwise() -> None:
    model, x = Unnamed(), torch.randn(2, 4, 9)
    assert conv_batch_norm_pairs(model, ["features"], ((x,), {})) == {"features": "scale"}
    assert conv_batch_norm_pairs(model, ["features"]) == {}  # no example: no structural clue either
    sequential = conv_bn()
    assert conv_batch_norm_pairs(sequential, ["0", "3"]) == {"0": "1"}

    plan = plan_layers(model, SCHEMES["int8_dynamic"], 32, example=((x,), {}))
    assert plan.folded == {"features": "scale"}
    swap_in_fake_quantized(model, ["features"], SCHEMES["int8_dynamic"], 32, plan.folded)
    assert isinstance(model.features, FakeQuantizedConv1d) and model.features.folded_norm is model.scale
    with torch.no_grad():
        assert torch.allclose(convert(model)(x), model.eval()(x), atol=1e-5)


def test_the_way_back_is_the_plain_conv_with_the_same_parameters_and_bytes_are_int8() -> None:
    model = conv_bn()
    weight = model[0].weight
    swap_in_fake_quantized(model, ["0", "3"], SCHEMES["int4_weight_only"], 32)
    stored, fp32 = weight_bytes(convert(model))
    assert (stored, fp32) == (8 * 27 + 4 * 8 + 4 * 8 + 4 * 4, 4 * (8 * 27 + 4 * 8))  # int8 weights, fp32 scales
    restore_float_modules(model)
    assert type(model[0]) is nn.Conv2d and model[0].weight is weight and model[0].padding == (1, 1)


def test_a_converted_conv_model_exports_with_a_dynamic_batch() -> None:
    model, x = conv_bn(), torch.randn(3, 3, 8, 8)
    swap_in_fake_quantized(model, ["0", "3"], SCHEMES["int8_dynamic"], 32)
    converted = convert(model)
    program = torch.export.export(converted, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    other = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(program.module()(other), converted(other), atol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN (mkldnn) is not in this torch build")
def test_dynamic_schemes_convolve_in_onednn_int8_and_equal_the_dequantized_computation() -> None:
    model, x = conv_bn(), torch.randn(4, 3, 12, 12)
    swap_in_fake_quantized(model, ["0", "3"], SCHEMES["int8_dynamic"], 32)
    converted = convert(model)
    conv = converted[0]
    assert isinstance(conv, QuantizedConv) and conv._packed is None
    with torch.no_grad():
        fake = model.eval()(x)
        got = converted(x)
    assert conv._packed is not None  # the int8 kernel ran (its packed weight was made on first use)
    assert torch.allclose(got, fake, rtol=1e-4, atol=1e-4)  # uint8 x int8 in oneDNN = the rounded fp32 maths
    program = torch.export.export(converted, (x,))  # inside export: the dequantized fp32 path
    with torch.no_grad():
        assert torch.allclose(program.module()(x), got, rtol=1e-4, atol=1e-4)


def test_a_converted_conv_that_has_run_deep_copies_and_pickles() -> None:
    """oneDNN's packed weight is opaque: copies drop the cache and rebuild it (the report deep-copies to time)."""
    model, x = conv_bn(), torch.randn(2, 3, 12, 12)
    swap_in_fake_quantized(model, ["0", "3"], SCHEMES["int8_dynamic"], 32)
    converted = convert(model)
    with torch.no_grad():
        expected = converted(x)
    assert converted[0]._packed is not None
    copied = copy.deepcopy(converted)
    unpickled = pickle.loads(pickle.dumps(converted))
    assert copied[0]._packed is None and unpickled[0]._packed is None
    with torch.no_grad():
        assert torch.equal(copied(x), expected) and torch.equal(unpickled(x), expected)

"""Quantization of kinds registered for pruning (registered.py): one `register_prunable` call serves both."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_eff.pruning.layers import PrunableKind, prunable_kind, register_prunable, unregister_prunable
from lightning_eff.quantization import QuantizationAwareTraining, restore_float_modules
from lightning_eff.quantization.convert import weight_bytes
from lightning_eff.quantization.fake_quant import fake_quantize_activation, fake_quantize_weight
from lightning_eff.quantization.registered import (
    FakeQuantizedRegistered,
    QuantizedRegistered,
    fake_quantized_registered,
    is_fake_quantized_registered,
    is_quantized_registered,
    quantized_registered,
    restore_registered,
    weight_from_rows,
    weight_rows,
)
from lightning_eff.quantization.schemes import SCHEMES, QuantScheme

GROUP = 32
IN, OUT = 64, 48


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


class Transposed(nn.Module):
    """y = x @ kernel + offset, kernel [in, out]: a layer the quantizer knows only through its registration."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel = nn.Parameter(torch.randn(in_features, out_features) / in_features**0.5)
        self.offset = nn.Parameter(torch.randn(out_features) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.kernel + self.offset


class Taps(nn.Module):
    """A conv1d-like layer with weight [out, in, k] (no bias), computed by einsum over k taps."""

    def __init__(self, in_channels: int, out_channels: int, taps: int) -> None:
        super().__init__()
        self.in_channels, self.taps = in_channels, taps  # in_channels: not in_features, its forward reads it
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, taps) / (in_channels * taps) ** 0.5)

    def forward(self, x: Tensor) -> Tensor:  # x [batch, in, time] -> [batch, out, time - taps + 1]
        windows = x.unfold(-1, self.taps, 1)  # [batch, in, time', taps]
        assert windows.shape[1] == self.in_channels
        return torch.einsum("bitk,oik->bot", windows, self.weight)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Transposed(IN, OUT)
        self.head = nn.Linear(OUT, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.block(x)))


@pytest.fixture(autouse=True)
def registered() -> Iterator[None]:
    register_prunable(Transposed, weight="kernel", output_dim=1, input_dim=0, bias="offset")
    register_prunable(Taps, weight="weight", output_dim=0, input_dim=1, bias=None, nm=False)
    yield
    unregister_prunable(Transposed)
    unregister_prunable(Taps)


def model_and_input(seed: int = 0) -> tuple[Model, Tensor]:
    torch.manual_seed(seed)
    return Model(), torch.randn(3, 5, IN)


def fake_model(scheme: QuantScheme) -> tuple[Model, Model, Tensor]:
    """(the float model, a copy whose block is fake-quantized, the input)."""
    model, x = model_and_input()
    fake = copy.deepcopy(model)
    kind = prunable_kind(fake.block)
    assert kind is not None
    fake_quantized_registered(fake.block, kind, scheme, GROUP)
    return model, fake, x


def by_hand(block: Transposed, x: Tensor, scheme: QuantScheme) -> Tensor:
    """The reference: transpose the kernel to [out, in], round it as a Linear's, transpose back."""
    group = scheme.weight_group_size(GROUP)
    weight = fake_quantize_weight(block.kernel.t(), scheme.weight_bits, group).t()
    if scheme.activation_bits is not None:
        x = fake_quantize_activation(x, scheme.activation_bits)
    return x @ weight + block.offset


def test_rows_put_the_output_dim_first_and_the_input_dim_last() -> None:
    kind = PrunableKind(weight="w", output_dim=2, input_dim=0)
    weight = torch.randn(4, 3, 5)  # [in, k, out]
    rows = weight_rows(weight, kind)
    assert rows.shape == (5, 3 * 4)
    assert torch.equal(rows, weight.permute(2, 1, 0).reshape(5, 12))
    assert torch.equal(weight_from_rows(rows, weight.shape, kind), weight)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_a_registered_kind_fake_quantizes_like_a_linear(name: str) -> None:
    scheme = SCHEMES[name]
    model, fake, x = fake_model(scheme)
    keys = list(fake.state_dict())
    block = fake.block
    kernel = block.kernel
    assert type(block).__name__ == "FakeQuantizedTransposed" and isinstance(block, Transposed)
    assert is_fake_quantized_registered(block) and prunable_kind(block) is not None  # still prunable as before
    assert block.group_size == (GROUP if scheme.grouped else None)
    assert list(model.state_dict()) == keys and block.kernel is kernel

    block.fake_quantize = False
    assert torch.equal(fake(x), model(x))
    block.fake_quantize = True
    expected = model.head(torch.relu(by_hand(model.block, x, scheme)))
    torch.testing.assert_close(fake(x), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(fake(x), model(x), atol=1e-4)
    assert block.kernel is kernel  # the Parameter is back in place after the call

    fake(x).square().sum().backward()
    assert kernel.grad is not None and kernel.grad.abs().sum() > 0
    assert block.offset.grad is not None

    copied = copy.deepcopy(fake)
    pickled = pickle.loads(pickle.dumps(fake))
    for other in (copied, pickled):
        assert type(other.block) is type(block) and other.block.scheme == scheme
        torch.testing.assert_close(other(x), fake(x), rtol=0, atol=0)

    restored = restore_registered(fake.block)
    assert type(restored) is Transposed and restored.kernel is kernel and not hasattr(restored, "scheme")
    assert torch.equal(fake(x), model(x))


@pytest.mark.parametrize("name", list(SCHEMES))
def test_a_registered_kind_converts_to_integers_exactly(name: str) -> None:
    scheme = SCHEMES[name]
    _, fake, x = fake_model(scheme)
    fake.eval()
    converted = copy.deepcopy(fake)
    converted.block = quantized_registered(fake.block)
    block = converted.block
    assert is_fake_quantized_registered(fake.block) and isinstance(fake.block.kernel, nn.Parameter)  # untouched
    assert type(block).__name__ == "QuantizedTransposed" and is_quantized_registered(block)
    assert "kernel" not in dict(block.named_parameters()) and prunable_kind(block) is None
    assert set(block.state_dict()) == {"offset", "qweight", "scales"}
    assert block.qweight.dtype == (torch.uint8 if scheme.weight_bits == 4 else torch.int8)
    assert block.in_features == IN and block.out_features == OUT

    with torch.no_grad():
        expected = fake(x)
        torch.testing.assert_close(converted(x), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(converted(x), expected, rtol=0, atol=1e-5)  # from the cached weight

    stored = sum(t.numel() * t.element_size() for t in (block.qweight, block.scales))
    fp32 = 4 * block.in_features * block.out_features
    assert fp32 == 4 * fake.block.kernel.numel()
    assert stored <= fp32 / (6 if scheme.weight_bits == 4 else 3.5)

    again = copy.deepcopy(converted)  # a fresh copy loads the state and computes the same
    again.block.qweight.zero_()
    again.load_state_dict(converted.state_dict())
    pickled = pickle.loads(pickle.dumps(converted))
    with torch.no_grad():
        torch.testing.assert_close(again(x), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(pickled(x), expected, rtol=0, atol=1e-5)

    exported = torch.export.export(converted, (x,))
    assert not exported.constants  # dequantized inside the graph, from the qweight and scales buffers
    with torch.inference_mode():
        torch.testing.assert_close(copy.deepcopy(converted)(x), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(exported.module()(x), expected, rtol=0, atol=1e-5)


def test_the_fake_quantized_kind_exports() -> None:
    _, fake, x = fake_model(SCHEMES["int8_dynamic_act_int4_weight"])
    fake.eval()
    exported = torch.export.export(fake, (x,))
    assert list(exported.state_dict) == list(fake.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), fake(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["int4_weight_only", "int8_dynamic"])
def test_a_three_dimensional_weight_rounds_per_output_row(name: str) -> None:
    scheme = SCHEMES[name]
    torch.manual_seed(1)
    layer, x = Taps(IN, OUT, 3), torch.randn(2, IN, 10)
    reference = copy.deepcopy(layer)
    kind = prunable_kind(layer)
    assert kind is not None
    fake = fake_quantized_registered(layer, kind, scheme, GROUP)
    assert fake.group_size is None  # a 3-D weight: one scale per output row [in x k]

    rows = reference.weight.permute(0, 2, 1).reshape(OUT, -1)  # [out, k x in]: the input dim last
    weight = fake_quantize_weight(rows, scheme.weight_bits, None).reshape(OUT, 3, IN).permute(0, 2, 1)
    windows = x.unfold(-1, 3, 1)
    if scheme.activation_bits is not None:
        windows = fake_quantize_activation(x, scheme.activation_bits).unfold(-1, 3, 1)
    expected = torch.einsum("bitk,oik->bot", windows, weight)
    torch.testing.assert_close(fake(x), expected, rtol=0, atol=1e-6)

    converted = quantized_registered(fake)
    assert converted.qweight.shape[0] == OUT and converted.scales.shape == (OUT, 1)
    assert converted.in_features == IN * 3 and converted.out_features == OUT  # weight_bytes: the whole weight
    assert converted.in_channels == IN  # the layer's own attributes are untouched
    with torch.no_grad():
        torch.testing.assert_close(converted(x), fake(x), rtol=0, atol=1e-5)


def test_refuses_what_it_cannot_take() -> None:
    layer = Transposed(IN, OUT)
    kind = prunable_kind(layer)
    assert kind is not None
    setattr(layer, "scheme", "mine")  # noqa: B010  # an attribute the twin would overwrite
    with pytest.raises(ValueError, match="scheme"):
        fake_quantized_registered(layer, kind, SCHEMES["int8_dynamic"], GROUP)
    with pytest.raises(TypeError):
        quantized_registered(Transposed(IN, OUT))

    fake = fake_quantized_registered(Transposed(IN, OUT), kind, SCHEMES["int8_dynamic"], GROUP)
    assert fake_quantized_registered(fake, kind, SCHEMES["int8_dynamic"], GROUP) is fake  # idempotent
    with pytest.raises(TypeError, match="positional"):
        fake(x=torch.randn(2, IN))


def test_the_converted_layer_follows_a_cast() -> None:
    _, fake, x = fake_model(SCHEMES["int8_weight_only"])
    converted = quantized_registered(fake.block)
    with torch.no_grad():
        full = converted(x)
        converted.to(torch.float64)
        assert converted.qweight.dtype == torch.int8 and converted.offset.dtype == torch.float64
        torch.testing.assert_close(converted(x.double()), full.double(), rtol=0, atol=1e-5)


class Task(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.example_input_array = torch.randn(4, 5, IN)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self(batch).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_one_registration_serves_pruning_and_the_qat_callback() -> None:
    """`register_prunable` alone makes the callback plan, train, convert and count the layer."""
    torch.manual_seed(0)
    task = Task()
    kernel = task.model.block.kernel
    callback = QuantizationAwareTraining("int8_dynamic_act_int4_weight", group_size=GROUP)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, callbacks=[callback], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(task, DataLoader(torch.randn(6, 5, IN), batch_size=2))
    assert callback.layers == ["model.block"]  # the head stays float by default
    assert isinstance(task.model.block, FakeQuantizedRegistered) and task.model.block.kernel is kernel
    converted = callback.quantized_model
    assert converted is not None and isinstance(converted.model.block, QuantizedRegistered)
    stored, fp32 = weight_bytes(converted)
    assert fp32 == 4 * IN * OUT and stored <= fp32 / 6
    with torch.no_grad():
        x = torch.randn(2, 5, IN)
        assert torch.allclose(converted(x), task.eval()(x), atol=1e-5)
    restore_float_modules(task)
    assert type(task.model.block) is Transposed and task.model.block.kernel is kernel

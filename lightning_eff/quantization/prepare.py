"""Which Linear layers a QAT run quantizes, and the fake-quantized Linear that replaces them for training."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_eff.quantization.fake_quant import fake_quantize_activation, fake_quantize_weight
from lightning_eff.quantization.schemes import QuantScheme
from lightning_eff.validation import ConfigError, match_globs


class FakeQuantizedLinear(nn.Linear):
    """An `nn.Linear` whose forward sees its weight (and, for dynamic schemes, its input) rounded to the scheme.

    It holds the original `weight` and `bias` Parameters (same objects, same names), so optimizers, pruning
    masks and checkpoints see an ordinary Linear. With `fake_quantize` False it is exactly the float layer:
    the callback trains in float until `start_step`. Scales come from each batch and each weight as it is,
    so there are no observers to freeze in eval.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, scheme: QuantScheme, group_size: int, **kwargs: object
    ) -> None:
        super().__init__(in_features, out_features, bias, **kwargs)
        self.scheme = scheme
        self.group_size = scheme.weight_group_size(group_size)
        self.fake_quantize = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme, group_size: int) -> FakeQuantizedLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, group_size, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if not self.fake_quantize:
            return F.linear(x, self.weight, self.bias)
        if self.scheme.activation_bits is not None:
            x = fake_quantize_activation(x, self.scheme.activation_bits)
        weight = fake_quantize_weight(self.weight, self.scheme.weight_bits, self.group_size)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme.name}, group_size={self.group_size}"


def _quantizable(module: nn.Module) -> bool:
    # Exactly nn.Linear: subclasses such as MultiheadAttention's out_proj are read by their owner, not called.
    return type(module) is nn.Linear or isinstance(module, FakeQuantizedLinear)


def select_layers(
    model: nn.Module,
    scheme: QuantScheme,
    group_size: int,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> list[str]:
    """The qualified names of the Linear layers to quantize.

    By default every Linear but the last one registered, which is the output head in the usual model
    layout: the logits are where rounding costs the most accuracy for the fewest bytes. `include` selects
    layers explicitly (then nothing is excluded by default); `exclude` removes layers. For grouped schemes
    every selected layer's input width must be a multiple of `group_size`.
    """
    linears = [name for name, module in model.named_modules() if name and _quantizable(module)]
    if not linears:
        raise ConfigError("include", include, "the model has no nn.Linear layer to quantize")
    chosen = match_globs(linears, include, "include", "Linear layer") if include else set(linears[:-1] or linears)
    if exclude:
        chosen -= match_globs(linears, exclude, "exclude", "Linear layer")
    if not chosen:
        raise ConfigError("exclude", exclude, f"leaves no layer to quantize; layers: {', '.join(linears)}")
    selected = [name for name in linears if name in chosen]
    if scheme.grouped:
        for name in selected:
            width = int(model.get_submodule(name).get_parameter("weight").shape[1])
            if width % group_size:
                raise ConfigError("group_size", group_size,
                                  f"must divide the input width of every quantized layer; {name} has {width} "
                                  f"(exclude it, or pick a divisor of {width})")  # fmt: skip
    return selected


def swap_in_fake_quantized(model: nn.Module, names: list[str], scheme: QuantScheme, group_size: int) -> None:
    """Replace each named Linear by a `FakeQuantizedLinear` holding the same Parameters (idempotent)."""
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, FakeQuantizedLinear):
            continue
        parent_name, _, child = name.rpartition(".")
        assert isinstance(layer, nn.Linear)
        setattr(model.get_submodule(parent_name), child, FakeQuantizedLinear.from_linear(layer, scheme, group_size))


def set_fake_quantize(model: nn.Module, enabled: bool) -> None:
    """Switch every `FakeQuantizedLinear` in `model` between float and fake-quantized forward."""
    for module in model.modules():
        if isinstance(module, FakeQuantizedLinear):
            module.fake_quantize = enabled

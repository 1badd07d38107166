"""Fake-quantized convolutions, with the BatchNorm that follows a conv folded into its quantized weight.

A conv followed by BatchNorm is served as one conv whose weight is ``w * gamma / sqrt(running_var + eps)``
and whose bias absorbs the BN shift, so that folded weight is what must be rounded. Training against the
unfolded weight and folding afterwards would round a weight the model never saw. Here, as in
`torch.ao.nn.intrinsic.qat.ConvBn2d` (its "approximate" forward), the conv computes with the fake-quantized
folded weight and divides the BN scale back out, so the model's own BatchNorm, called next as usual, still
normalizes with batch statistics in training and updates its running ones. In eval the pair computes exactly
the folded, rounded conv that `convert` stores. The BatchNorm module stays where it is (names, checkpoints
and the model's forward are untouched); `convert` replaces it by `nn.Identity`.

Weights: int8, one scale per output channel, for every scheme (int4 convolutions lose too much and no CPU
kernel gains from them). Activations: the dynamic schemes round a conv's whole input (the batch) to asymmetric
int8 with one scale, as PyTorch's dynamic quantization does and as oneDNN's int8 convolution takes it (that
kernel is what makes the converted conv faster: `convert.QuantizedConv`); the weight-only schemes keep float
inputs. Users of Lightning's removed QAT callback asked for this fusion
(Lightning #12890, #12899).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from lightning_eff.quantization.fake_quant import fake_quantize_activation, fake_quantize_weight
from lightning_eff.quantization.probe import FAILED, probe_forward
from lightning_eff.quantization.schemes import QuantScheme

CONV_KINDS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)
BATCH_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)
CONV_WEIGHT_BITS = 8


def foldable(conv: nn.Module, norm: nn.Module) -> bool:
    """Whether `norm` can fold into `conv`: a BatchNorm with running statistics over the conv's channels."""
    return bool(
        isinstance(norm, BATCH_NORMS)
        and norm.track_running_stats
        and norm.running_var is not None
        and norm.num_features == getattr(conv, "out_channels", None)
    )


def conv_batch_norm_pairs(
    model: nn.Module, convs: list[str], example: tuple[tuple[Any, ...], dict[str, Any]] | None = None
) -> dict[str, str]:
    """conv name -> the BatchNorm that normalizes its output, for each of `convs` that has one.

    With `example` (forward args and kwargs): one forward in eval mode without gradients, with hooks; a
    BatchNorm whose input *is* a conv's output tensor pairs with it. Without it (or when the forward fails),
    from the structure: a BatchNorm right after the conv in an `nn.Sequential`, or a sibling named like it
    (``conv1`` -> ``bn1``, as torchvision's blocks name them).
    """
    pairs = _pairs_by_forward(model, convs, example) if example is not None else None
    if pairs is None:
        pairs = _pairs_by_structure(model, convs)
    return {c: n for c, n in pairs.items() if foldable(model.get_submodule(c), model.get_submodule(n))}


def _pairs_by_forward(
    model: nn.Module, convs: list[str], example: tuple[tuple[Any, ...], dict[str, Any]]
) -> dict[str, str] | None:
    produced: dict[int, str] = {}
    pairs: dict[str, str] = {}
    names = {id(module): name for name, module in model.named_modules()}

    def after_conv(module: nn.Module, _args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            produced[id(output)] = names[id(module)]

    def before_norm(module: nn.Module, args: Any) -> None:
        source = produced.get(id(args[0])) if args and isinstance(args[0], Tensor) else None
        if source is not None and source not in pairs:
            pairs[source] = names[id(module)]

    handles = [model.get_submodule(name).register_forward_hook(after_conv) for name in convs]
    handles += [m.register_forward_pre_hook(before_norm) for m in model.modules() if isinstance(m, BATCH_NORMS)]
    if probe_forward(model, example, handles) is FAILED:
        return None  # an example the model cannot run: the caller falls back to the structure
    return pairs


def _pairs_by_structure(model: nn.Module, convs: list[str]) -> dict[str, str]:
    pairs = {}
    for name in convs:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        children = dict(parent.named_children())
        order = list(children)
        following = order[order.index(child) + 1] if order.index(child) + 1 < len(order) else None
        candidates = [following] if isinstance(parent, nn.Sequential) and following else []
        if child.startswith("conv"):
            candidates.append("bn" + child.removeprefix("conv"))
        for candidate in candidates:
            if candidate in children and isinstance(children[candidate], BATCH_NORMS):
                pairs[name] = f"{parent_name}.{candidate}" if parent_name else candidate
                break
    return pairs


def folded_scale(norm: _BatchNorm) -> Tensor:
    """gamma / sqrt(running_var + eps) per channel: what folding multiplies the conv's output channels by."""
    assert norm.running_var is not None
    gamma = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
    return gamma / torch.sqrt(norm.running_var + norm.eps)


def folded_weight_and_bias(conv: _ConvNd, norm: _BatchNorm | None) -> tuple[Tensor, Tensor | None]:
    """The conv's weight and bias with `norm` folded in (or as they are without one), detached."""
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else None
    if norm is None:
        return weight, bias
    assert norm.running_mean is not None
    scale = folded_scale(norm).detach()
    shift = norm.bias.detach() if norm.bias is not None else torch.zeros_like(scale)
    base = bias if bias is not None else torch.zeros_like(scale)
    folded_bias = (base - norm.running_mean) * scale + shift
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1))), folded_bias


def fake_quantize_conv_weight(weight: Tensor) -> Tensor:
    """int8 per output channel, straight-through: the rows of the weight flattened to [out, in * kernel]."""
    flat = weight.reshape(weight.shape[0], -1)
    return fake_quantize_weight(flat, CONV_WEIGHT_BITS, None).reshape(weight.shape)


def fake_quantize_conv_input(x: Tensor) -> Tensor:
    """The input rounded to asymmetric int8 with one scale for the whole tensor (the dynamic schemes)."""
    if x.numel() == 0:
        return x
    return fake_quantize_activation(x.reshape(1, -1)).reshape(x.shape)


class _FakeQuantizedConv:
    """The fake-quantized forward shared by the Conv1d and Conv2d twins (a mixin before the torch class)."""

    scheme: QuantScheme
    fake_quantize: bool
    weight: Tensor
    bias: Tensor | None

    def _attach(self, scheme: QuantScheme, norm: _BatchNorm | None) -> None:
        self.scheme = scheme
        self.fake_quantize = True
        # a plain list: the BatchNorm stays registered where the model has it, not a second time here
        self._norm: list[_BatchNorm] = [norm] if norm is not None else []

    @property
    def folded_norm(self) -> _BatchNorm | None:
        """The BatchNorm folded into this conv's quantized weight, or None."""
        return self._norm[0] if self._norm else None

    def forward(self, x: Tensor) -> Tensor:
        conv_forward = self._conv_forward  # type: ignore[attr-defined]
        if not self.fake_quantize:
            return conv_forward(x, self.weight, self.bias)
        if self.scheme.activation_bits is not None:
            x = fake_quantize_conv_input(x)
        norm = self.folded_norm
        if norm is None:
            return conv_forward(x, fake_quantize_conv_weight(self.weight), self.bias)
        scale = folded_scale(norm).detach()
        scale = torch.where(scale.abs() > 1e-12, scale, torch.ones_like(scale))  # gamma = 0: the BN outputs beta
        shape = (-1, *([1] * (self.weight.dim() - 1)))
        out = conv_forward(x, fake_quantize_conv_weight(self.weight * scale.reshape(shape)), None)
        out = out / scale.reshape(1, -1, *([1] * (out.dim() - 2)))  # the BatchNorm, next, scales it back
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, *([1] * (out.dim() - 2)))
        return out


class FakeQuantizedConv1d(_FakeQuantizedConv, nn.Conv1d):
    """`nn.Conv1d` with int8 per-channel fake-quantized weights (and the following BatchNorm folded in)."""


class FakeQuantizedConv2d(_FakeQuantizedConv, nn.Conv2d):
    """`nn.Conv2d` with int8 per-channel fake-quantized weights (and the following BatchNorm folded in)."""


FAKE_CONVS: dict[type[nn.Module], type[nn.Module]] = {nn.Conv1d: FakeQuantizedConv1d, nn.Conv2d: FakeQuantizedConv2d}


def _same_conv(conv: nn.Module, conv_type: type[nn.Module]) -> Any:
    """A `conv_type` with `conv`'s hyper-parameters holding `conv`'s very Parameters (built on meta: no copy)."""
    twin = conv_type(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     conv.groups, conv.bias is not None, conv.padding_mode, device="meta")  # fmt: skip
    twin.weight = conv.weight
    twin.bias = conv.bias
    twin.train(conv.training)
    return twin


def fake_quantized_conv(conv: nn.Module, scheme: QuantScheme, norm: _BatchNorm | None) -> nn.Module:
    """The fake-quantized twin of `conv`, holding the same Parameters under the same names."""
    twin = _same_conv(conv, FAKE_CONVS[type(conv)])
    twin._attach(scheme, norm)
    return twin


def broadcast_folded_norm_statistics(model: nn.Module, src: int = 0) -> None:
    """Rank `src`'s running statistics into every folded BatchNorm of `model`, on every rank (a collective).

    DDP broadcasts rank 0's buffers before each forward; FSDP2 leaves them per rank. A folded BatchNorm's running
    variance sets the grid its conv's weight is rounded to, so without this each rank would train against its
    own grid, and the result would differ from DDP's. One broadcast for all of them.
    """
    statistics = [
        buffer
        for module in model.modules()
        if isinstance(module, _FakeQuantizedConv) and (norm := module.folded_norm) is not None
        for buffer in (norm.running_mean, norm.running_var)
        if buffer is not None
    ]
    if not statistics:
        return
    flat = torch.cat([buffer.reshape(-1) for buffer in statistics])
    torch.distributed.broadcast(flat, src)
    offset = 0
    for buffer in statistics:
        buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
        offset += buffer.numel()


def float_conv(twin: nn.Module) -> nn.Module:
    """The plain conv back from its twin (the same Parameters)."""
    plain_type = next(base for base, fake in FAKE_CONVS.items() if isinstance(twin, fake))
    return _same_conv(twin, plain_type)

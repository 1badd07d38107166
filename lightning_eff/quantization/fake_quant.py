"""Fake quantization in plain PyTorch: round to the low-bit grid in the forward, pass gradients straight through.

Pure elementwise tensor code with no data-dependent Python branches, so `torch.compile` fuses it into the
matmul's neighbours without graph breaks (torchao's fake quantizers cost 2.85-3.05x the float step on an
H100, a plain one like this 1.04x compiled; `benchmarks/quantization.py` measures both side by side, on
the CPU and, with `--only gpu`, on a GPU). The numerics follow torchao's QAT fake
quantizers, so a model trained here converts like one trained there:

- activations: per token (last dim), asymmetric int8, ``scale = (max - min) / 255`` over a range that always
  contains 0, zero point rounded into [-128, 127];
- weights: symmetric, per group of `group_size` input columns (or per output row), ``scale = max|w| / ((qmax -
  qmin) / 2)`` (``/ 7.5`` for int4, ``/ 127.5`` for int8), no zero point, so a zero weight stays exactly zero
  (what keeps pruned weights pruned through conversion);
- as torchao: scales in the input's dtype, floored at its smallest normal number, ``x * (1 / scale)`` rather
  than ``x / scale`` (they round differently on 0.5% of int4 weights), `torch.round` (half to even). A test
  checks bit-equality with torchao's `IntxFakeQuantizer` forward and backward.

The same `quantize_weight` gives the integers and scales that `convert` stores.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _floor(dtype: torch.dtype) -> float:
    """Floor of every scale (an all-zero row or group would divide by zero), torchao's choice."""
    return torch.finfo(dtype).smallest_normal


def integer_range(bits: int) -> tuple[int, int]:
    """The signed range of a `bits`-bit integer: (-8, 7) for 4 bits, (-128, 127) for 8."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def straight_through(x: Tensor, rounded: Tensor) -> Tensor:
    """`rounded` in the forward, the identity's gradient in the backward."""
    return x + (rounded - x).detach()


def _grouped(weight: Tensor, group_size: int | None) -> Tensor:
    """View [out, in] as [out, groups, group_size]; one group spans the row without `group_size`."""
    rows, columns = weight.shape
    size = columns if group_size is None else group_size
    return weight.reshape(rows, columns // size, size)


def weight_scales(weight: Tensor, bits: int, group_size: int | None) -> Tensor:
    """Symmetric scales in the weight's dtype, shape [out, groups, 1] (one group per row without `group_size`)."""
    low, high = integer_range(bits)
    max_abs = _grouped(weight.detach(), group_size).abs().amax(dim=-1, keepdim=True)
    return (max_abs / ((high - low) / 2)).clamp(min=_floor(weight.dtype))


def _weight_integers(weight: Tensor, scales: Tensor, bits: int, group_size: int | None) -> Tensor:
    """round(w / scale) clamped, `weight` detached: in place on one temporary (the same bits as out of place)."""
    low, high = integer_range(bits)
    return (_grouped(weight, group_size) * (1.0 / scales)).round_().clamp_(low, high)


def quantize_weight(weight: Tensor, bits: int, group_size: int | None) -> tuple[Tensor, Tensor]:
    """The integer weight (int8 storage, values in the `bits` range) and its float32 scales [out, groups]."""
    scales = weight_scales(weight, bits, group_size)
    integers = _weight_integers(weight.detach(), scales, bits, group_size)
    return integers.reshape(weight.shape).to(torch.int8), scales.squeeze(-1).float()


def fake_quantize_weight(weight: Tensor, bits: int, group_size: int | None) -> Tensor:
    """`weight` rounded to its symmetric `bits`-bit grid per group, with straight-through gradients."""
    scales = weight_scales(weight, bits, group_size)
    rounded = (_weight_integers(weight.detach(), scales, bits, group_size) * scales).reshape(weight.shape)
    return straight_through(weight, rounded)


def activation_qparams(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Per-token asymmetric scale and zero point in `x`'s dtype, shape [..., 1]: the range always includes 0."""
    detached = x.detach()
    return range_qparams(detached.amin(dim=-1, keepdim=True), detached.amax(dim=-1, keepdim=True), bits)


def range_qparams(min_value: Tensor, max_value: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Asymmetric scale and zero point (signed) for values in [min_value, max_value], widened to include 0."""
    low, high = integer_range(bits)
    min_value, max_value = min_value.clamp(max=0), max_value.clamp(min=0)
    scale = ((max_value - min_value) / float(high - low)).clamp(min=_floor(min_value.dtype))
    zero_point = torch.clamp(low - torch.round(min_value / scale), low, high)
    return scale, zero_point


def activation_integers(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int = 8) -> Tensor:
    """round(x / scale) + zero point, clamped to the `bits` range (still a float tensor)."""
    low, high = integer_range(bits)
    # In place on one temporary: fresh buffers per op (each a newly mapped, zeroed region at activation sizes)
    # cost 14x more than the arithmetic for a [4096, 128] input; the result is the same, bit for bit.
    return (x * (1.0 / scale)).round_().add_(zero_point).clamp_(low, high)


def fake_quantize_activation(x: Tensor, bits: int = 8) -> Tensor:
    """`x` rounded per token to an asymmetric `bits`-bit grid, with straight-through gradients."""
    scale, zero_point = activation_qparams(x, bits)
    rounded = activation_integers(x.detach(), scale, zero_point, bits).sub_(zero_point).mul_(scale)
    return straight_through(x, rounded)

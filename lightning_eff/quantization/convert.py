"""Conversion of a fake-quantized model to a real low-bit one, and its save/load without the training code.

What is stored is what the scheme promises: int8 weights with one scale per output row, or int4 weights
packed two per byte with one scale per group, so the saved file is 1/4 to 1/6 of fp32. How the stored
weights are multiplied was chosen by measuring this CPU (2-core x86, torch 2.13; `benchmarks/quantization.py`):

- int8 activations x int8 weights (``int8_dynamic``): a real integer matmul, `torch._int_mm` (int8 x int8 ->
  int32) on per-token activations, 3.7x faster than fp32 for a 256x1024 layer. torchao's int8 tensors took
  0.7-1.6x the fp32 time and `_weight_int8pack_mm` with fp32 activations 35x: not used.
- weight-only schemes and int4 weights: this CPU has no fast kernel that keeps int4 or int8 weights packed
  (`_weight_int4pack_mm_for_cpu` 1.5x faster than fp32 with bf16 inputs, 77x slower with fp32; torchao's
  Intx paths 1.0-1.6x slower), so the integers are dequantized to bf16 and multiplied in bf16, which this CPU
  does 3.5x faster than fp32. In eager mode the bf16 weight is built once and cached (not saved: the saved
  form stays the integers); an exported or compiled model dequantizes inside its graph on every call. For
  ``int8_dynamic_act_int4_weight`` the activations are still rounded per token to int8, as in training
  (integers up to 255 are exact in bf16).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from lightning_eff.quantization.attention import FakeQuantizedMultiheadAttention, QuantizedMultiheadAttention
from lightning_eff.quantization.conv import (
    CONV_WEIGHT_BITS,
    FAKE_CONVS,
    fake_quantize_conv_input,
    folded_weight_and_bias,
)
from lightning_eff.quantization.embedding import FakeQuantizedEmbedding
from lightning_eff.quantization.fake_quant import (
    activation_integers,
    activation_qparams,
    quantize_weight,
    range_qparams,
)
from lightning_eff.quantization.prepare import (
    FAKE_QUANTIZED,
    FakeQuantizedConv1D,
    FakeQuantizedLinear,
    keep_off_fused_paths,
)
from lightning_eff.quantization.pretrained import guard_save_pretrained
from lightning_eff.quantization.registered import FakeQuantizedRegistered, QuantizedRegistered, quantized_registered
from lightning_eff.quantization.schemes import QuantScheme
from lightning_eff.sharding import is_sharded, unsharded_copy


def pack_int4(integers: Tensor) -> Tensor:
    """Two int4 values (in [-8, 7]) per byte: column j in the low nibble, column j + width/2 in the high one."""
    half = integers.shape[-1] // 2
    nibbles = integers.to(torch.uint8) & 0xF
    return nibbles[..., :half] | (nibbles[..., half:] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """The inverse of `pack_int4`: int8 values in [-8, 7] (arithmetic shifts restore the sign)."""
    signed = packed.view(torch.int8)
    return torch.cat(((signed << 4) >> 4, signed >> 4), dim=-1)


class QuantizedLinear(nn.Module):
    """A Linear layer that holds its weight as integers and scales (see the module docstring for the matmul).

    Buffers (the saved state): ``qweight`` (int8 [out, in], or uint8 [out, in/2] with two int4 per byte),
    ``scales`` (float32 [out, groups]) and ``bias`` (float, if any).
    """

    qweight: Tensor
    scales: Tensor
    bias: Tensor | None

    def __init__(
        self, in_features: int, out_features: int, scheme: QuantScheme, group_size: int | None, bias: bool
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        self.group_size = group_size
        packed_width = in_features // 2 if scheme.weight_bits == 4 else in_features
        dtype = torch.uint8 if scheme.weight_bits == 4 else torch.int8
        groups = 1 if group_size is None else in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, packed_width, dtype=dtype))
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.integer_matmul = scheme.activation_bits is not None and scheme.weight_bits == 8
        self._bf16_weight: Tensor | None = None  # eager-mode cache of the dequantized weight; never saved
        # eager-mode cache of sum_k w_k per output row (the integer matmul's zero-point correction); derived from
        # the integers, so never saved: 4 bytes a row would cost a 32-wide layer a tenth of its int8 size
        self._row_sums: Tensor | None = None

    @classmethod
    def from_fake_quantized(cls, layer: FakeQuantizedLinear | FakeQuantizedConv1D) -> QuantizedLinear:
        """Round `layer`'s float weight exactly as its fake quantizer does and store the integers.

        An HF Conv1D's [in, out] weight is transposed here, once: the result is an ordinary [out, in] layer.
        """
        quantized = cls(layer.in_features, layer.out_features, layer.scheme, layer.group_size, layer.bias is not None)
        weight = layer.linear_weight().detach().contiguous()
        integers, scales = quantize_weight(weight, layer.scheme.weight_bits, layer.group_size)
        quantized.qweight = pack_int4(integers) if layer.scheme.weight_bits == 4 else integers
        quantized.scales = scales
        if layer.bias is not None:
            quantized.bias = layer.bias.detach().clone()
        return quantized.to(weight.device)

    def integer_weight(self) -> Tensor:
        """The weight's integers, int8 [out, in]."""
        return unpack_int4(self.qweight) if self.scheme.weight_bits == 4 else self.qweight

    def dequantized_weight(self) -> Tensor:
        """integers x scales, float32 [out, in]: the weight the fake-quantized model trained with."""
        integers = self.integer_weight().float()
        groups = self.scales.shape[1]
        grouped = integers.reshape(self.out_features, groups, -1) * self.scales.unsqueeze(-1)
        return grouped.reshape(self.out_features, self.in_features)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedLinear:
        self._bf16_weight = self._row_sums = None  # moved or cast: rebuilt from the integers on the next call
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._bf16_weight = self._row_sums = None  # new integers are copied into the buffers in place
        super()._load_from_state_dict(*args, **kwargs)

    def bf16_weight(self) -> Tensor:
        """The dequantized weight in bf16: cached in eager mode, recomputed inside export and compile."""
        if torch.compiler.is_compiling():
            return self.dequantized_weight().to(torch.bfloat16)
        if self._bf16_weight is None:
            # a normal tensor even when first called under inference_mode, so later autograd calls can use it
            with torch.inference_mode(False), torch.no_grad():
                self._bf16_weight = self.dequantized_weight().to(torch.bfloat16)
        return self._bf16_weight

    def row_sums(self) -> Tensor:
        """sum_k w_k per output row, int32: cached in eager mode, recomputed inside export and compile."""
        if torch.compiler.is_compiling():
            return self.qweight.sum(dim=1, dtype=torch.int32)
        if self._row_sums is None:
            with torch.inference_mode(False), torch.no_grad():
                self._row_sums = self.qweight.sum(dim=1, dtype=torch.int32)
        return self._row_sums

    def forward(self, x: Tensor) -> Tensor:
        if self.integer_matmul:
            return self._integer_matmul(x)
        weight = self.bf16_weight()
        if self.scheme.activation_bits is None:
            out = F.linear(x.to(torch.bfloat16), weight).to(x.dtype)
        else:
            bits = self.scheme.activation_bits
            scale, zero_point = activation_qparams(x, bits)
            centred = activation_integers(x, scale, zero_point, bits).sub_(zero_point)
            out = F.linear(centred.to(torch.bfloat16), weight).float().mul_(scale).to(x.dtype)
        return out if self.bias is None else out.add_(self.bias.to(x.dtype))

    def _integer_matmul(self, x: Tensor) -> Tensor:
        """int8 per-token activations x int8 weights in int32, then one float rescale per output."""
        assert self.scheme.activation_bits is not None
        bits = self.scheme.activation_bits
        rows = x.reshape(-1, self.in_features).float()
        scale, zero_point = activation_qparams(rows, bits)
        integers = activation_integers(rows, scale, zero_point, bits).to(torch.int8)
        out = torch._int_mm(integers, self.qweight.t()).float()
        # sum_k (q_k - z) w_k = sum_k q_k w_k - z * sum_k w_k: the zero point costs one row sum, paid once.
        # In place, one [tokens, out] buffer: a fresh buffer per step (each one a new mmap of zeroed pages, at
        # these sizes) cost more than the int8 matmul itself (measured: the layer 3.5x faster, same bits).
        out.addr_(zero_point.reshape(-1), self.row_sums().float(), alpha=-1)  # minus z (x) row sums, no temporary
        out.mul_(scale).mul_(self.scales.reshape(1, -1))
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


class QuantizedEmbedding(nn.Module):
    """An Embedding that holds its table as integers and scales, and dequantizes only the rows it looks up.

    Buffers: ``qweight`` (int8 [tokens, width], or uint8 [tokens, width/2] with two int4 per byte) and
    ``scales`` (float32 [tokens, groups]), the layout of `QuantizedLinear`, so a head tied to the embedding
    shares the very tensors. The lookup returns float32 rows: the weights the fake-quantized model trained with.
    """

    qweight: Tensor
    scales: Tensor

    def __init__(
        self, num_embeddings: int, embedding_dim: int, scheme: QuantScheme, group_size: int | None,
        padding_idx: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.scheme, self.group_size = scheme, group_size
        packed_width = embedding_dim // 2 if scheme.weight_bits == 4 else embedding_dim
        dtype = torch.uint8 if scheme.weight_bits == 4 else torch.int8
        groups = 1 if group_size is None else embedding_dim // group_size
        self.register_buffer("qweight", torch.zeros(num_embeddings, packed_width, dtype=dtype))
        self.register_buffer("scales", torch.ones(num_embeddings, groups))

    @property
    def in_features(self) -> int:
        return self.embedding_dim

    @property
    def out_features(self) -> int:
        return self.num_embeddings

    @classmethod
    def from_fake_quantized(cls, layer: FakeQuantizedEmbedding) -> QuantizedEmbedding:
        """Round the table exactly as the fake quantizer rounds its rows, and store the integers."""
        quantized = cls(layer.num_embeddings, layer.embedding_dim, layer.scheme, layer.group_size, layer.padding_idx)
        weight = layer.weight.detach().contiguous()
        integers, scales = quantize_weight(weight, layer.scheme.weight_bits, layer.group_size)
        quantized.qweight = pack_int4(integers) if layer.scheme.weight_bits == 4 else integers
        quantized.scales = scales
        return quantized.to(weight.device)

    def forward(self, input: Tensor) -> Tensor:
        rows = self.qweight[input]
        integers = unpack_int4(rows) if self.scheme.weight_bits == 4 else rows
        scales = self.scales[input]
        grouped = integers.reshape(*integers.shape[:-1], scales.shape[-1], -1).float() * scales.unsqueeze(-1)
        return grouped.reshape(*input.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme.name} (weight-only), "
                f"group_size={self.group_size}")  # fmt: skip


class QuantizedConv(nn.Module):
    """A Conv1d/Conv2d holding int8 weights (one scale per output channel), its BatchNorm folded in.

    Buffers: ``qweight`` (int8, the conv weight's shape), ``scales`` (float32 [out]) and ``bias`` (float32,
    the folded BN shift when there was one). How it convolves, measured on this project's x86 CPU
    (`benchmarks/quantization.py --only cnn`):

    - dynamic schemes, Conv2d, eager on the CPU: the input is rounded to uint8 with one scale for the tensor,
      as in training, and oneDNN's int8 convolution (``onednn::qconv2d_pointwise``, the kernel PyTorch's x86
      int8 inference uses) multiplies uint8 x int8 and writes fp32 (channels-last, which the next conv takes
      as it is): equal to the dequantized computation within float rounding, and several times faster than
      fp32. The weight is packed for oneDNN once, on first use (not saved);
    - weight-only schemes, Conv1d, inside export or compile, or another device: the weight is dequantized once
      (cached in eager mode) and convolved in fp32, so the saving is in bytes, not time.
    """

    qweight: Tensor
    scales: Tensor
    bias: Tensor | None

    def __init__(self, conv: _ConvNd, scheme: QuantScheme, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.dims = 1 if isinstance(conv, nn.Conv1d) else 2
        self.stride: tuple[int, ...] = conv.stride
        self.padding: str | tuple[int, ...] = conv.padding
        self.dilation: tuple[int, ...] = conv.dilation
        self.groups: int = conv.groups
        self.padding_mode: str = conv.padding_mode
        self.reversed_padding: list[int] = list(conv._reversed_padding_repeated_twice)
        self.scheme = scheme
        self.out_channels = int(weight.shape[0])
        integers, scales = quantize_weight(weight.reshape(self.out_channels, -1), CONV_WEIGHT_BITS, None)
        self.register_buffer("qweight", integers.reshape(weight.shape))
        self.register_buffer("scales", scales.reshape(-1))
        self.register_buffer("bias", None if bias is None else bias.float().clone())
        self._float_weight: Tensor | None = None
        # oneDNN's layout of qweight and its (zero) zero points, made on first use; never saved
        self._packed: tuple[Tensor, Tensor] | None = None

    @classmethod
    def from_fake_quantized(cls, layer: nn.Module) -> QuantizedConv:
        """Fold the layer's BatchNorm (if any) into its weight and bias, and round the weight as training did."""
        weight, bias = folded_weight_and_bias(layer, layer.folded_norm)  # type: ignore[arg-type]
        return cls(layer, layer.scheme, weight, bias)  # type: ignore[arg-type]

    @property
    def in_features(self) -> int:
        """Weights per output channel (for `weight_bytes`: in_features x out_features is the weight's size)."""
        return int(self.qweight[0].numel())

    @property
    def out_features(self) -> int:
        return self.out_channels

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedConv:
        self._float_weight = self._packed = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._float_weight = self._packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # The caches are rebuilt on first use; oneDNN's packed weight is an opaque tensor that neither
        # copy.deepcopy nor pickling can read (the report deep-copies the converted model to time it).
        return {**super().__getstate__(), "_float_weight": None, "_packed": None}

    def float_weight(self) -> Tensor:
        """integers x scales in float32, the conv weight: cached in eager mode, recomputed inside export."""
        shape = (-1, *([1] * (self.qweight.dim() - 1)))
        if torch.compiler.is_compiling():
            return self.qweight.float() * self.scales.reshape(shape)
        if self._float_weight is None:
            with torch.inference_mode(False), torch.no_grad():
                self._float_weight = self.qweight.float() * self.scales.reshape(shape)
        return self._float_weight

    def _int8_kernel_applies(self, x: Tensor) -> bool:
        return (
            self.scheme.activation_bits is not None
            and self.dims == 2
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and x.dim() == 4
            and x.numel() > 0
            and not torch.compiler.is_compiling()
            and torch.backends.mkldnn.is_available()
        )

    def _int8_convolution(self, x: Tensor) -> Tensor:
        """uint8 input (one scale, as training rounded it) x int8 weight in oneDNN, fp32 out.

        The scale and zero point are the fake quantizer's over the whole tensor (signed zero point z is the
        unsigned z + 128); `torch.quantize_per_tensor` rounds in one pass and keeps the memory format, so a
        channels-last activation is never copied.
        """
        scale, zero_point = range_qparams(x.detach().amin(), x.detach().amax())
        unsigned_zero = (zero_point + 128).to(torch.int64).reshape(())
        unsigned = torch.quantize_per_tensor(x.detach(), scale.reshape(()), unsigned_zero, torch.quint8).int_repr()
        geometry = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
        if self._packed is None:
            with torch.inference_mode(False), torch.no_grad():
                packed = torch.ops.onednn.qconv_prepack(self.qweight, self.scales, 1.0, 0, *geometry, None)
                self._packed = (packed, torch.zeros(self.out_channels, dtype=torch.int64))  # symmetric weights
        packed, weight_zero_points = self._packed
        return torch.ops.onednn.qconv2d_pointwise.tensor(
            unsigned, scale.reshape(()), unsigned_zero, packed, self.scales, weight_zero_points, self.bias,
            *geometry, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        if self._int8_kernel_applies(x):
            return self._int8_convolution(x)
        if self.scheme.activation_bits is not None:
            x = fake_quantize_conv_input(x)
        convolve = F.conv1d if self.dims == 1 else F.conv2d
        padding: Any = self.padding
        if self.padding_mode != "zeros":
            x, padding = F.pad(x, self.reversed_padding, mode=self.padding_mode), 0
        return convolve(x, self.float_weight(), self.bias, self.stride, padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{tuple(self.qweight.shape)}, stride={self.stride}, groups={self.groups}, int8 per channel"


QUANTIZED: tuple[type[nn.Module], ...] = (
    QuantizedRegistered,
    QuantizedLinear,
    QuantizedEmbedding,
    QuantizedConv,
    QuantizedMultiheadAttention,
)
"""The layer kinds `convert` produces."""
AnyQuantized = QuantizedLinear | QuantizedEmbedding | QuantizedConv
"""The converted kinds that hold their own integers (a `QuantizedMultiheadAttention` holds two `QuantizedLinear`s)."""


def _quantized(layer: nn.Module) -> AnyQuantized | QuantizedMultiheadAttention | QuantizedRegistered:
    if isinstance(layer, FakeQuantizedRegistered):
        return quantized_registered(layer)
    if isinstance(layer, FakeQuantizedMultiheadAttention):
        return QuantizedMultiheadAttention.from_fake_quantized(layer)
    if isinstance(layer, FakeQuantizedEmbedding):
        return QuantizedEmbedding.from_fake_quantized(layer)
    if isinstance(layer, tuple(FAKE_CONVS.values())):
        return QuantizedConv.from_fake_quantized(layer)
    return QuantizedLinear.from_fake_quantized(layer)  # type: ignore[arg-type]


def convert(model: nn.Module) -> nn.Module:
    """A copy of `model` with every fake-quantized layer replaced by a `QuantizedLinear` (or `QuantizedEmbedding`).

    In eval mode. A weight shared by several layers (a head tied to its embedding) is stored once: the
    converted layers hold the same integer tensors.

    `nn.TransformerEncoderLayer`s holding one stay off their fused fast path (`keep_off_fused_paths`), so the
    copy runs in eval, under `no_grad` and under `inference_mode`.

    An FSDP2-sharded `model` (``fully_shard``, which forbids deepcopy) is gathered into a plain CPU copy first
    (`sharding.unsharded_copy`): a collective, so every rank must call `convert`; to convert on one rank only,
    pass it ``unsharded_copy(model, rank0_only=True)`` instead.
    """
    plain = unsharded_copy(model) if is_sharded(model) else copy.deepcopy(model)
    assert plain is not None
    converted = plain.eval()
    by_weight: dict[int, nn.Module] = {}  # tied layers (one weight) are quantized once
    names = {id(module): name for name, module in converted.named_modules()}
    for name, module in list(converted.named_modules()):
        if isinstance(module, FAKE_QUANTIZED):
            parent_name, _, child = name.rpartition(".")
            layer = _quantized(module)
            norm = getattr(module, "folded_norm", None)
            if norm is not None:  # folded into the conv: the model's call of it becomes a no-op
                norm_parent, _, norm_child = names[id(norm)].rpartition(".")
                setattr(converted.get_submodule(norm_parent), norm_child, nn.Identity())
            tied = by_weight.setdefault(id(getattr(module, "weight", module)), layer)
            both = isinstance(tied, AnyQuantized) and isinstance(layer, AnyQuantized) and tied is not layer
            if both and torch.equal(tied.get_buffer("qweight"), layer.get_buffer("qweight")):
                layer.qweight, layer.scales = tied.qweight, tied.scales  # stay tied: the same integer tensors
            setattr(converted.get_submodule(parent_name), child, layer)
    keep_off_fused_paths(converted, QUANTIZED)
    for parameter in converted.parameters():
        parameter.requires_grad_(False)
    return guard_save_pretrained(converted)  # HF's save_pretrained would drop the integers: refused, with why


def quantized_layers(model: nn.Module) -> dict[str, AnyQuantized | QuantizedRegistered]:
    """Every converted layer of `model` by qualified name (a tied pair appears under both names)."""
    found: dict[str, AnyQuantized | QuantizedRegistered] = {}
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding, QuantizedConv, QuantizedRegistered)):
            found[name] = module
    return found


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the quantized layers' weights as saved: integers and scales; the same weights in fp32).

    Biases are not quantized (as in torchao) and count in the whole model's bytes, not here.
    """
    stored = fp32 = 0
    seen: set[int] = set()  # tied layers share their integers: counted once, as they are saved
    for layer in quantized_layers(model).values():
        if id(layer.qweight) in seen:
            continue
        seen.add(id(layer.qweight))
        stored += sum(t.numel() * t.element_size() for t in (layer.qweight, layer.scales))
        fp32 += 4 * (
            layer.weight_numel if isinstance(layer, QuantizedRegistered) else layer.in_features * layer.out_features
        )
    return stored, fp32

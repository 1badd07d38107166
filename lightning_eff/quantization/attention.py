"""Quantization-aware training for `nn.MultiheadAttention`'s fused weights, and its converted low-bit form.

`nn.MultiheadAttention` (the attention of `nn.TransformerEncoderLayer`) has no Linear layer to swap: its packed
``in_proj_weight`` [3E, E] and its ``out_proj.weight`` (a `NonDynamicallyQuantizableLinear` that is never
called) are read by `F.multi_head_attention_forward`. So the module itself is replaced: its forward runs
PyTorch's Python path with both weights rounded as a `FakeQuantizedLinear` rounds its weight (rows are
outputs, groups run along the input width; per row, so packing q, k and v together changes no scale).

Activations, for dynamic schemes: the query, key and value (the in-projection's inputs) are rounded per token.
The out-projection's input is made inside the fused function and stays float, in training and after
conversion alike, so the converted model computes what the trained one did.

This module imports only `fake_quant` and `schemes` at import time (`prepare` and `convert`, which may import
it, are imported where used).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_eff.quantization.fake_quant import fake_quantize_activation, fake_quantize_weight
from lightning_eff.quantization.schemes import QuantScheme

if TYPE_CHECKING:
    from lightning_eff.quantization.convert import QuantizedLinear


def _each_input(fn: Callable[[Tensor], Tensor], query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, ...]:
    """`fn` applied once per distinct tensor: `F.multi_head_attention_forward` tests ``query is key is value``."""
    new_query = fn(query)
    new_key = new_query if key is query else fn(key)
    new_value = new_key if value is key else new_query if value is query else fn(value)
    return new_query, new_key, new_value


def _attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor | None,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    key_padding_mask: Tensor | None,
    need_weights: bool,
    attn_mask: Tensor | None,
    average_attn_weights: bool,
    is_causal: bool,
) -> tuple[Tensor, Tensor | None]:
    """`nn.MultiheadAttention.forward`'s Python path (packed weights) with the weights given, not the module's.

    For dynamic schemes (``module.scheme.activation_bits``) the query, key and value are rounded per token.
    The masks go to `F.multi_head_attention_forward` as given: it makes them canonical as the module does.
    """
    scheme: QuantScheme = module.scheme  # type: ignore[assignment]
    bits = scheme.activation_bits
    if bits is not None:
        query, key, value = _each_input(lambda x: fake_quantize_activation(x, bits), query, key, value)
    batched = query.dim() == 3
    if module.batch_first and batched:
        query, key, value = _each_input(lambda x: x.transpose(1, 0), query, key, value)
    output, weights = F.multi_head_attention_forward(
        query,
        key,
        value,
        module.embed_dim,  # type: ignore[arg-type]
        module.num_heads,  # type: ignore[arg-type]
        in_proj_weight,
        in_proj_bias,
        module.bias_k,  # type: ignore[arg-type]
        module.bias_v,  # type: ignore[arg-type]
        module.add_zero_attn,  # type: ignore[arg-type]
        module.dropout,  # type: ignore[arg-type]
        out_proj_weight,
        out_proj_bias,
        training=module.training,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        average_attn_weights=average_attn_weights,
        is_causal=is_causal,
    )
    if module.batch_first and batched:
        output = output.transpose(1, 0)
    return output, weights


class FakeQuantizedMultiheadAttention(nn.MultiheadAttention):
    """An `nn.MultiheadAttention` whose forward sees ``in_proj_weight`` and ``out_proj.weight`` fake-quantized.

    It holds the original Parameters under the same names (``in_proj_weight``, ``in_proj_bias``, ``bias_k``,
    ``bias_v``, and the very ``out_proj`` module), so optimizers, pruning masks and checkpoints see the usual
    module. With `fake_quantize` False it is exactly the float module (its forward, fast path included).
    With it True it never takes the fused fast path (which would read the float weights); an encoder layer
    holding one must be kept off its own fast path too (`prepare.keep_off_fused_paths`). Dynamic schemes round
    the query, key and value per token; the out-projection's input stays float (it is made inside
    `F.multi_head_attention_forward`). Only packed q/k/v weights (``kdim == vdim == embed_dim``) are supported.
    """

    def __init__(self, embed_dim: int, num_heads: int, scheme: QuantScheme, group_size: int, **kwargs: Any) -> None:
        super().__init__(embed_dim, num_heads, **kwargs)
        self.scheme = scheme
        self.group_size = scheme.weight_group_size(group_size)
        self.fake_quantize = True

    @classmethod
    def from_mha(
        cls, mha: nn.MultiheadAttention, scheme: QuantScheme, group_size: int
    ) -> FakeQuantizedMultiheadAttention:
        """The fake-quantized twin of `mha`, holding its Parameters (ValueError for separate q/k/v weights)."""
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ValueError(
                "separate q/k/v projection weights (kdim or vdim differs from embed_dim) are not supported"
            )
        if scheme.grouped and mha.embed_dim % group_size:
            raise ValueError(f"embed_dim {mha.embed_dim} is not a multiple of group_size={group_size}")
        if scheme.weight_bits == 4 and mha.embed_dim % 2:
            raise ValueError(f"int4 weights pack two per byte: embed_dim {mha.embed_dim} must be even")
        layer = cls(mha.embed_dim, mha.num_heads, scheme, group_size, dropout=mha.dropout,
                    bias=mha.in_proj_bias is not None, add_bias_kv=mha.bias_k is not None,
                    add_zero_attn=mha.add_zero_attn, batch_first=mha.batch_first, device="meta",
                    dtype=mha.in_proj_weight.dtype)  # fmt: skip
        _share_parameters(mha, layer)
        return layer

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not self.fake_quantize:
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)  # fmt: skip
        bits = self.scheme.weight_bits
        in_proj_weight = fake_quantize_weight(self.in_proj_weight, bits, self.group_size)
        out_proj_weight = fake_quantize_weight(self.out_proj.weight, bits, self.group_size)
        return _attention(self, query, key, value, in_proj_weight, self.in_proj_bias, out_proj_weight,
                          self.out_proj.bias, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                          is_causal)  # fmt: skip

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                f"scheme={self.scheme.name}, group_size={self.group_size}")  # fmt: skip


def _share_parameters(source: nn.MultiheadAttention, target: nn.MultiheadAttention) -> None:
    """Make `target` hold `source`'s Parameters (same objects, same names) and its `out_proj` module."""
    target.in_proj_weight = source.in_proj_weight
    target.in_proj_bias = source.in_proj_bias
    target.bias_k = source.bias_k
    target.bias_v = source.bias_v
    target.out_proj = source.out_proj
    target.train(source.training)


def restore_float_mha(layer: FakeQuantizedMultiheadAttention) -> nn.MultiheadAttention:
    """The plain `nn.MultiheadAttention` holding `layer`'s Parameters (and `out_proj` module): the way back."""
    assert layer.in_proj_weight is not None  # packed weights only (`from_mha`)
    restored = nn.MultiheadAttention(layer.embed_dim, layer.num_heads, dropout=layer.dropout,
                                     bias=layer.in_proj_bias is not None, add_bias_kv=layer.bias_k is not None,
                                     add_zero_attn=layer.add_zero_attn, batch_first=layer.batch_first,
                                     device="meta", dtype=layer.in_proj_weight.dtype)  # fmt: skip
    _share_parameters(layer, restored)
    return restored


def _quantized_linear(
    weight: Tensor, bias: Tensor | None, scheme: QuantScheme, group_size: int | None
) -> QuantizedLinear:
    """A `QuantizedLinear` of [out, in] `weight`, rounded exactly as a `FakeQuantizedLinear` holding it rounds it."""
    from lightning_eff.quantization.convert import QuantizedLinear
    from lightning_eff.quantization.prepare import FakeQuantizedLinear

    out_features, in_features = weight.shape
    view = FakeQuantizedLinear(in_features, out_features, bias is not None, scheme, 1, device="meta")
    view.group_size = group_size
    view.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:  # else the view was made without one
        view.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return QuantizedLinear.from_fake_quantized(view)


class QuantizedMultiheadAttention(nn.Module):
    """Multi-head attention whose projection weights are stored as integers and scales.

    Submodules ``in_proj`` ([3E, E]) and ``out_proj`` ([E, E]) are `QuantizedLinear`s (their buffers ``qweight``,
    ``scales``, ``bias`` are the saved state, so `convert.weight_bytes` counts them); ``bias_k``/``bias_v`` are
    float buffers when present. They are never called: the forward dequantizes them to float32 weights (cached
    in eager mode, rebuilt inside export and compile) and runs `F.multi_head_attention_forward` as the
    fake-quantized module does, query, key and value rounded per token for dynamic schemes. It has the
    attributes `nn.TransformerEncoderLayer` reads before deciding on its fast path; `keep_off_fused_paths`
    must keep such a layer off that path (the fused kernel would need float weights).
    """

    bias_k: Tensor | None
    bias_v: Tensor | None

    def __init__(self, layer: FakeQuantizedMultiheadAttention) -> None:
        super().__init__()
        assert layer.in_proj_weight is not None  # packed weights only (`from_mha`)
        self.embed_dim, self.num_heads, self.head_dim = layer.embed_dim, layer.num_heads, layer.head_dim
        self.kdim, self.vdim, self._qkv_same_embed_dim = layer.kdim, layer.vdim, True
        self.batch_first, self.dropout, self.add_zero_attn = layer.batch_first, layer.dropout, layer.add_zero_attn
        self.scheme, self.group_size = layer.scheme, layer.group_size
        self.in_proj = _quantized_linear(layer.in_proj_weight, layer.in_proj_bias, layer.scheme, layer.group_size)
        self.out_proj = _quantized_linear(layer.out_proj.weight, layer.out_proj.bias, layer.scheme, layer.group_size)
        for name in ("bias_k", "bias_v"):
            extra = getattr(layer, name)
            self.register_buffer(name, None if extra is None else extra.detach().clone())
        self._weights: tuple[Tensor, Tensor] | None = None  # eager-mode cache of the float32 weights; never saved
        self.train(False)

    @classmethod
    def from_fake_quantized(cls, layer: FakeQuantizedMultiheadAttention) -> QuantizedMultiheadAttention:
        """Round `layer`'s weights exactly as its fake quantizer does and store the integers (in eval mode)."""
        return cls(layer)

    @property
    def in_proj_bias(self) -> Tensor | None:
        """What `nn.TransformerEncoderLayer` checks (a bias-free attention is never fused)."""
        return self.in_proj.bias

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedMultiheadAttention:
        self._weights = None  # moved or cast: rebuilt from the integers on the next call
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._weights = None  # new integers are copied into the buffers in place
        super()._load_from_state_dict(*args, **kwargs)

    def float_weights(self) -> tuple[Tensor, Tensor]:
        """(in_proj, out_proj) dequantized to float32: cached in eager mode, recomputed inside export and compile."""
        if torch.compiler.is_compiling():
            return self.in_proj.dequantized_weight(), self.out_proj.dequantized_weight()
        if self._weights is None:
            # a normal tensor even when first called under inference_mode, so later autograd calls can use it
            with torch.inference_mode(False), torch.no_grad():
                self._weights = (self.in_proj.dequantized_weight(), self.out_proj.dequantized_weight())
        return self._weights

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        in_proj_weight, out_proj_weight = (w.to(query.dtype) for w in self.float_weights())
        in_bias, out_bias = (None if b is None else b.to(query.dtype) for b in (self.in_proj.bias, self.out_proj.bias))
        return _attention(self, query, key, value, in_proj_weight, in_bias, out_proj_weight, out_bias,
                          key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)  # fmt: skip

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                f"scheme={self.scheme.name}, group_size={self.group_size}")  # fmt: skip

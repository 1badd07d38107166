"""Quantization of any module kind registered for pruning: one registration (`register_prunable`) serves both.

A kind (`lightning_eff.pruning.layers.PrunableKind`) says where a module keeps its weight and which of its
dimensions is the output and which the input. That is all fake quantization needs: the weight is moved so the
output dim comes first and the input dim last, flattened to rows ``[out, rest x in]`` (``[out, in]`` for a 2-D
weight), rounded per row (or per group of `group_size` input columns, for grouped schemes and 2-D weights
whose input width is a multiple of it) exactly as a `FakeQuantizedLinear` rounds its ``[out, in]`` weight, and
moved back. The layer's own forward then runs with that weight in place of its Parameter, so nothing has to
know how it computes.

- `fake_quantized_registered` turns a module into its fake-quantized twin *in place*: its class becomes a
  cached subclass (``FakeQuantized<Name>``), so every Parameter object, name and state_dict key is unchanged
  (optimizers, pruning masks and checkpoints see the float layer). With ``fake_quantize`` False it is exactly
  the original forward.
- `quantized_registered` returns a converted copy (``Quantized<Name>``) whose weight Parameter is replaced by
  the buffers ``qweight`` (int8 rows, or two int4 per uint8 byte) and ``scales`` (float32 [out, groups]).
- `restore_registered` is the way back to the plain class.

Dynamic schemes (``activation_bits``) also round the forward's *first positional floating-point tensor
argument* per token (last dim), as `FakeQuantizedLinear` rounds its input: this assumes that argument is the
layer's activation, multiplied along its last dim by the weight's input dim (a Linear-like layer). A layer
whose first input is something else should be quantized with a weight-only scheme (or excluded).

The weight is substituted for the duration of the call with `torch.nn.utils.stateless._reparametrize_module`
(what `torch.func.functional_call` uses), which works in eager mode, under autograd and under `torch.export`.

The dynamic classes pickle by reference to the registered class (``__reduce_ex__``), so `pickle` and
`copy.deepcopy` work whenever the registered class itself is picklable (defined at a module's top level).
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from lightning_eff.pruning.layers import PrunableKind
from lightning_eff.quantization.fake_quant import fake_quantize_activation, fake_quantize_weight, quantize_weight
from lightning_eff.quantization.schemes import QuantScheme

_ATTRIBUTES = ("scheme", "group_size", "fake_quantize", "registered_kind")
"""The attributes the fake-quantized twin adds (a module already holding one of them is refused)."""


def _layout(shape: torch.Size | tuple[int, ...], kind: PrunableKind) -> tuple[list[int], list[int]]:
    """(the permutation putting the output dim first and the input dim last, its inverse)."""
    dims = len(shape)
    out_dim, in_dim = kind.output_dim % dims, kind.input_dim % dims
    order = [out_dim, *(d for d in range(dims) if d not in (out_dim, in_dim)), in_dim]
    inverse = [0] * dims
    for position, dim in enumerate(order):
        inverse[dim] = position
    return order, inverse


def weight_rows(weight: Tensor, kind: PrunableKind) -> Tensor:
    """`weight` as rows ``[out, rest x in]``: output dim first, input dim last (``[out, in]`` for a 2-D weight)."""
    order, _ = _layout(weight.shape, kind)
    return weight.permute(order).reshape(weight.shape[order[0]], -1)


def weight_from_rows(rows: Tensor, shape: torch.Size | tuple[int, ...], kind: PrunableKind) -> Tensor:
    """The inverse of `weight_rows`: rows back in the weight's own layout `shape`."""
    order, inverse = _layout(shape, kind)
    return rows.reshape([shape[d] for d in order]).permute(inverse)


def registered_group_size(weight: Tensor, kind: PrunableKind, scheme: QuantScheme, group_size: int) -> int | None:
    """The scheme's group size for a 2-D weight whose input width is a multiple of it; else None (per row)."""
    group = scheme.weight_group_size(group_size)
    if group is None or weight.dim() != 2 or int(weight.shape[kind.input_dim]) % group:
        return None
    return group


def _round_activation(args: tuple[Any, ...], scheme: QuantScheme, owner: nn.Module) -> tuple[Any, ...]:
    """`args` with its first floating-point tensor rounded per token (dynamic schemes); unchanged otherwise."""
    if scheme.activation_bits is None:
        return args
    for index, value in enumerate(args):
        if isinstance(value, Tensor) and value.is_floating_point():
            rounded = fake_quantize_activation(value, scheme.activation_bits)
            return (*args[:index], rounded, *args[index + 1 :])
    raise TypeError(
        f"{type(owner).__name__}: scheme {scheme.name} rounds the activation, taken to be the first positional "
        "floating-point tensor argument, and this call has none (pass the input positionally, or use a "
        "weight-only scheme for this layer)"
    )


_FAKE_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}
_QUANTIZED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _new_instance(role: str, base: type[nn.Module]) -> nn.Module:
    """Unpickling: an empty instance of `base`'s fake-quantized (``fake``) or quantized (``quantized``) class."""
    cls = _fake_class(base) if role == "fake" else _quantized_class(base)
    return cls.__new__(cls)


def _reduce(module: nn.Module, role: str, base: type[nn.Module], protocol: int) -> Any:
    """``object.__reduce_ex__`` with the dynamic class replaced by a reference to the registered one."""
    reduced = object.__reduce_ex__(module, max(protocol, 2))
    return (_new_instance, (role, base), *reduced[2:])


class FakeQuantizedRegistered(nn.Module):
    """Mixin of the ``FakeQuantized<Name>`` classes; see `fake_quantized_registered`."""

    _registered_base: type[nn.Module]
    scheme: QuantScheme
    group_size: int | None
    fake_quantize: bool
    registered_kind: PrunableKind

    def fake_quantized_weight(self) -> Tensor:
        """The weight rounded to the scheme in its own layout, with straight-through gradients to the Parameter."""
        weight = self.get_parameter(self.registered_kind.weight)
        rows = fake_quantize_weight(weight_rows(weight, self.registered_kind), self.scheme.weight_bits, self.group_size)
        return weight_from_rows(rows, weight.shape, self.registered_kind)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.fake_quantize:
            return super().forward(*args, **kwargs)
        args = _round_activation(args, self.scheme, self)
        with _reparametrize_module(self, {self.registered_kind.weight: self.fake_quantized_weight()}):
            return super().forward(*args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _reduce(self, "fake", self._registered_base, protocol)

    def extra_repr(self) -> str:
        own = f"scheme={self.scheme.name}, group_size={self.group_size}, fake_quantize={self.fake_quantize}"
        base = super().extra_repr()
        return f"{base}, {own}" if base else own


class QuantizedRegistered(nn.Module):
    """Mixin of the ``Quantized<Name>`` classes; see `quantized_registered`."""

    _registered_base: type[nn.Module]
    qweight: Tensor
    scales: Tensor
    scheme: QuantScheme
    group_size: int | None
    registered_kind: PrunableKind
    weight_shape: tuple[int, ...]
    weight_dtype: torch.dtype
    packed: bool
    _dequantized: Tensor | None

    @property
    def weight_numel(self) -> int:
        """How many weights the float layer held (its fp32 bytes are 4x this)."""
        return int(torch.Size(self.weight_shape).numel())

    def _flat_features(self, name: str) -> int:
        """A Linear's view of the rows: out_features = output channels, in_features = the rest."""
        if name in self.__dict__:  # the layer's own attribute: its forward keeps seeing it
            return int(self.__dict__[name])
        out = int(self.weight_shape[self.registered_kind.output_dim])
        return out if name == "out_features" else self.weight_numel // out

    def integer_weight(self) -> Tensor:
        """The weight's integers in rows, int8 ``[out, rest x in]``."""
        if not self.packed:
            return self.qweight
        from lightning_eff.quantization.convert import unpack_int4  # convert imports prepare: imported late

        return unpack_int4(self.qweight)

    def _dequantize(self) -> Tensor:
        integers = self.integer_weight().float()
        rows = integers.reshape(integers.shape[0], self.scales.shape[1], -1) * self.scales.unsqueeze(-1)
        rows = rows.reshape(integers.shape[0], -1)
        return weight_from_rows(rows, self.weight_shape, self.registered_kind).to(self.weight_dtype)

    def dequantized_weight(self) -> Tensor:
        """integers x scales in the weight's own layout and dtype: cached in eager mode, recomputed when compiling."""
        if torch.compiler.is_compiling():
            return self._dequantize()
        if self._dequantized is None:
            with torch.inference_mode(False), torch.no_grad():
                self._dequantized = self._dequantize()
        return self._dequantized

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = _round_activation(args, self.scheme, self)
        with _reparametrize_module(self, {self.registered_kind.weight: self.dequantized_weight()}):
            return super().forward(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._dequantized = None  # moved or cast: rebuilt from the integers on the next call
        if self.weight_dtype.is_floating_point:  # follow a cast (model.half()) as the weight Parameter would have
            self.weight_dtype = fn(torch.empty(0, dtype=self.weight_dtype, device=self.qweight.device)).dtype
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._dequantized = None  # new integers are copied into the buffers in place
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_dequantized"] = None  # derived from the integers: never pickled or deep-copied
        return state

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _reduce(self, "quantized", self._registered_base, protocol)

    def extra_repr(self) -> str:
        own = (
            f"qweight={tuple(self.qweight.shape)} {'int4x2' if self.packed else 'int8'}, scheme={self.scheme.name}, "
            f"group_size={self.group_size}"
        )
        base = super().extra_repr()
        return f"{base}, {own}" if base else own


def _features_property(name: str) -> property:
    return property(lambda self: self._flat_features(name), doc=f"{name} of the weight as rows (for weight_bytes)")


def _fake_class(base: type[nn.Module]) -> type[nn.Module]:
    """``FakeQuantized<Name>``, a subclass of `base` (one per class)."""
    if base not in _FAKE_CLASSES:
        namespace = {"_registered_base": base, "__module__": __name__}
        _FAKE_CLASSES[base] = type(f"FakeQuantized{base.__name__}", (FakeQuantizedRegistered, base), namespace)
    return _FAKE_CLASSES[base]


def _quantized_class(base: type[nn.Module]) -> type[nn.Module]:
    """``Quantized<Name>``, a subclass of `base` (one per class); ``in_features``/``out_features`` unless
    `base` defines them itself."""
    if base not in _QUANTIZED_CLASSES:
        namespace: dict[str, Any] = {"_registered_base": base, "__module__": __name__}
        for name in ("in_features", "out_features"):
            if not any(name in vars(cls) for cls in base.__mro__):
                namespace[name] = _features_property(name)
        _QUANTIZED_CLASSES[base] = type(f"Quantized{base.__name__}", (QuantizedRegistered, base), namespace)
    return _QUANTIZED_CLASSES[base]


def is_fake_quantized_registered(module: nn.Module) -> bool:
    """Whether `module` is a fake-quantized twin made by `fake_quantized_registered`."""
    return isinstance(module, FakeQuantizedRegistered)


def is_quantized_registered(module: nn.Module) -> bool:
    """Whether `module` was made by `quantized_registered`."""
    return isinstance(module, QuantizedRegistered)


def fake_quantized_registered(
    module: nn.Module, kind: PrunableKind, scheme: QuantScheme, group_size: int
) -> FakeQuantizedRegistered:
    """Make `module` (of a registered kind) fake-quantized in place, and return it.

    Its class becomes ``FakeQuantized<Name>`` (a cached subclass of its own), so every Parameter object and
    state_dict key stays as it was. It gains ``scheme``, ``group_size`` (the scheme's, for a 2-D weight whose
    input width is a multiple of it; None = one scale per output row), ``fake_quantize`` (True) and
    ``registered_kind``. Idempotent: a module already fake-quantized is returned as it is.

    Raises:
        ValueError: the module has no weight under `kind` (yet), or already has an attribute named like one
            of those it would gain.
    """
    if isinstance(module, FakeQuantizedRegistered):
        return module
    if isinstance(module, QuantizedRegistered):
        raise ValueError(f"{type(module).__name__} is already converted")
    weight = kind.parameter(module)
    if not isinstance(weight, nn.Parameter):
        raise ValueError(f"{type(module).__name__} has no weight Parameter {kind.weight!r} to quantize")
    taken = [name for name in _ATTRIBUTES if hasattr(module, name)]
    if taken:
        raise ValueError(f"{type(module).__name__} already has attribute(s) {', '.join(taken)}: cannot quantize it")
    group = registered_group_size(weight, kind, scheme, group_size)
    module.__class__ = _fake_class(type(module))
    twin = cast(FakeQuantizedRegistered, module)
    twin.scheme, twin.group_size, twin.fake_quantize = scheme, group, True
    twin.registered_kind = kind
    return twin


def restore_registered(fake: nn.Module) -> nn.Module:
    """Undo `fake_quantized_registered` in place: the plain class again, holding the same Parameters."""
    if not isinstance(fake, FakeQuantizedRegistered):
        raise TypeError(f"{type(fake).__name__} is not a fake-quantized registered layer")
    base = fake._registered_base
    for name in _ATTRIBUTES:
        fake.__dict__.pop(name, None)
    plain: nn.Module = fake
    plain.__class__ = base
    return plain


def quantized_registered(fake: nn.Module) -> QuantizedRegistered:
    """A converted copy of `fake` (untouched) storing its weight as integers and scales, and its forward.

    Its class is ``Quantized<Name>``: the weight Parameter is gone; buffers ``qweight`` (int8 ``[out, rest x
    in]``, or uint8 ``[out, width / 2]`` holding two int4 for 4-bit schemes when the width is even) and
    ``scales`` (float32 ``[out, groups]``) hold it, rounded exactly as the fake quantizer rounds it. The forward
    is the layer's own with the weight dequantized (in its own layout and dtype; built once in eager mode,
    inside the graph under export or compile), the activation rounded per token for dynamic schemes.
    ``in_features``/``out_features`` read the rows' shape (``weight_numel`` the weight's size) for
    `convert.weight_bytes`. Other Parameters (the bias) and buffers stay as they were.
    """
    if not isinstance(fake, FakeQuantizedRegistered):
        raise TypeError(f"{type(fake).__name__} is not a fake-quantized registered layer")
    kind, scheme = fake.registered_kind, fake.scheme
    copied: nn.Module = copy.deepcopy(fake)
    weight = copied.get_parameter(kind.weight).detach()
    rows = weight_rows(weight, kind).contiguous()
    integers, scales = quantize_weight(rows, scheme.weight_bits, fake.group_size)
    packed = scheme.weight_bits == 4 and rows.shape[1] % 2 == 0
    if packed:
        from lightning_eff.quantization.convert import pack_int4  # convert imports prepare: imported late

        integers = pack_int4(integers)
    delattr(copied, kind.weight)
    copied.__dict__.pop("fake_quantize", None)
    copied.__class__ = _quantized_class(fake._registered_base)
    converted = cast(QuantizedRegistered, copied)
    converted.weight_shape, converted.weight_dtype = tuple(weight.shape), weight.dtype
    converted.packed, converted._dequantized = packed, None
    converted.register_buffer("qweight", integers)
    converted.register_buffer("scales", scales)
    return converted

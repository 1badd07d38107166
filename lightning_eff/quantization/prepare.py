"""Which layers a QAT run quantizes (Linear, HF Conv1D, Embedding, Conv1d/2d), and the fake twins that replace them."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_eff.pruning.layers import prunable_kind
from lightning_eff.quantization.attention import FakeQuantizedMultiheadAttention, restore_float_mha
from lightning_eff.quantization.conv import (
    CONV_KINDS,
    FAKE_CONVS,
    conv_batch_norm_pairs,
    fake_quantized_conv,
    float_conv,
)
from lightning_eff.quantization.embedding import FakeQuantizedEmbedding
from lightning_eff.quantization.fake_quant import fake_quantize_activation, fake_quantize_weight
from lightning_eff.quantization.probe import FAILED, probe_forward
from lightning_eff.quantization.registered import (
    FakeQuantizedRegistered,
    fake_quantized_registered,
    restore_registered,
)
from lightning_eff.quantization.schemes import QuantScheme
from lightning_eff.validation import ConfigError, match_globs


class FakeQuantizedLinear(nn.Linear):
    """An `nn.Linear` whose forward sees its weight (and, for dynamic schemes, its input) rounded to the scheme.

    It holds the original `weight` and `bias` Parameters (same objects, same names), so optimizers, pruning
    masks and checkpoints see an ordinary Linear. With `fake_quantize` False it is exactly the float layer:
    the callback trains in float until `start_step`. Scales come from each batch and each weight as it is,
    so there are no observers to freeze in eval. `restore_float_modules(model)` is the way back to plain
    `nn.Linear` layers holding the same Parameters (channel shrinking does it on its own).
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

    def linear_weight(self) -> Tensor:
        """The weight, [out, in]."""
        return self.weight

    def forward(self, x: Tensor) -> Tensor:
        if not self.fake_quantize:
            return F.linear(x, self.weight, self.bias)
        if self.scheme.activation_bits is not None:
            x = fake_quantize_activation(x, self.scheme.activation_bits)
        weight = fake_quantize_weight(self.weight, self.scheme.weight_bits, self.group_size)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme.name}, group_size={self.group_size}"


class FakeQuantizedConv1D(nn.Module):
    """Hugging Face's `Conv1D` (``y = x @ W + b``, W stored [in, out], as in GPT-2) with a fake-quantized forward.

    The numerics are those of a `FakeQuantizedLinear` with weight ``W.T``: one scale per output channel, or per
    group of `group_size` input columns. It holds the original Parameters (same objects, same names, same
    [in, out] layout), so optimizers and checkpoints see the usual Conv1D; conversion transposes once.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, scheme: QuantScheme, group_size: int) -> None:
        super().__init__()
        self.nx, self.nf = int(weight.shape[0]), int(weight.shape[1])
        self.weight = weight
        self.bias = bias
        self.scheme = scheme
        self.group_size = scheme.weight_group_size(group_size)
        self.fake_quantize = True

    @property
    def in_features(self) -> int:
        return self.nx

    @property
    def out_features(self) -> int:
        return self.nf

    @classmethod
    def from_conv1d(cls, conv: nn.Module, scheme: QuantScheme, group_size: int) -> FakeQuantizedConv1D:
        layer = cls(conv.weight, conv.bias, scheme, group_size)  # type: ignore[arg-type]
        layer.train(conv.training)
        return layer

    def linear_weight(self) -> Tensor:
        """The weight as a Linear holds it, [out, in] (a view of the [in, out] Parameter)."""
        return self.weight.t()

    def forward(self, x: Tensor) -> Tensor:
        weight = self.linear_weight()
        if self.fake_quantize:
            if self.scheme.activation_bits is not None:
                x = fake_quantize_activation(x, self.scheme.activation_bits)
            weight = fake_quantize_weight(weight, self.scheme.weight_bits, self.group_size)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"nx={self.nx}, nf={self.nf}, scheme={self.scheme.name}, group_size={self.group_size}"


FAKE_QUANTIZED: tuple[type[nn.Module], ...] = (
    FakeQuantizedLinear,
    FakeQuantizedConv1D,
    FakeQuantizedEmbedding,
    FakeQuantizedMultiheadAttention,
    FakeQuantizedRegistered,
    *FAKE_CONVS.values(),
)
"""The fake-quantized layer kinds `swap_in_fake_quantized` creates and `convert` turns into real low-bit ones."""
FAKE_LINEAR: tuple[type[nn.Module], ...] = (FakeQuantizedLinear, FakeQuantizedConv1D)


def _hf_conv1d() -> type | None:
    """transformers' `Conv1D` when transformers is already imported (a model holding one imported it), else None."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None) if module is not None else None


def _is_conv1d(module: nn.Module) -> bool:
    conv1d = _hf_conv1d()
    return conv1d is not None and type(module) is conv1d


def _quantizable_linear(module: nn.Module) -> bool:
    # Exactly nn.Linear (or HF Conv1D): subclasses such as MultiheadAttention's out_proj are read by their owner,
    # not called.
    return type(module) is nn.Linear or isinstance(module, FAKE_LINEAR) or _is_conv1d(module)


def _is_conv(module: nn.Module) -> bool:
    return type(module) in CONV_KINDS or type(module) in FAKE_CONVS.values()


def _is_packed_attention(module: nn.Module) -> bool:
    """An `nn.MultiheadAttention` with one packed q/k/v weight (the kind `FakeQuantizedMultiheadAttention` takes)."""
    if isinstance(module, FakeQuantizedMultiheadAttention):
        return True
    return type(module) is nn.MultiheadAttention and module._qkv_same_embed_dim


NATIVE_KINDS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.MultiheadAttention,
    nn.Embedding,
)
"""Module types with a fake-quantized twin of their own; another kind registered for pruning takes the generic one."""


def _is_registered_kind(module: nn.Module) -> bool:
    """A kind a user registered with `pruning.layers.register_prunable` (one registry for pruning and QAT)."""
    if isinstance(module, FakeQuantizedRegistered):
        return True
    return prunable_kind(module) is not None and not isinstance(module, NATIVE_KINDS) and not _is_conv1d(module)


def _weight_name(module: nn.Module) -> str:
    kind = prunable_kind(module)
    return kind.weight if kind is not None else "weight"


def _quantizable(module: nn.Module) -> bool:
    """A layer the plan may select: Linear-like, `nn.Embedding`, `nn.Conv1d/2d`, a packed `nn.MultiheadAttention`
    (exactly these types: a subclass may compute otherwise), or a kind registered with `register_prunable`."""
    kinds = (nn.Embedding, FakeQuantizedEmbedding)
    native = _quantizable_linear(module) or type(module) in kinds or _is_conv(module) or _is_packed_attention(module)
    return native or _is_registered_kind(module)


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim
    if _is_registered_kind(module):
        kind = prunable_kind(module)
        assert kind is not None
        return kind.input_width(module)
    if _is_conv1d(module) or isinstance(module, FakeQuantizedConv1D):
        return int(module.get_parameter("weight").shape[0])
    return int(module.get_parameter("weight").shape[1])


def _tensors(value: Any) -> list[Tensor]:
    """Every tensor in a (nested) model output: tensors, tuples, lists, dicts and HF ModelOutputs."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def find_output_head(model: nn.Module, example: tuple[tuple[Any, ...], dict[str, Any]] | None = None) -> str | None:
    """The quantizable layer whose output is the model's output (the logits), or None if no layer's is.

    With `example` (forward args and kwargs): one forward in eval mode without gradients, with forward hooks
    on the quantizable layers; the head is the last one called whose output is, or shares memory with, a tensor
    of the model's output. Nothing changes in the model (modes and the RNG are restored). Without `example`,
    from the structure: a quantizable layer whose weight is an `nn.Embedding`'s (a tied head), else the last
    module with parameters of its own when that is a quantizable layer (a final LayerNorm, as in BERT's
    encoder, means no head).
    """
    layers = {name: module for name, module in model.named_modules() if name and _quantizable_linear(module)}
    if not layers:
        return None
    if example is not None:
        found = _head_by_forward(model, layers, example)
        if found is not FAILED:
            return found  # type: ignore[return-value]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    tied = [name for name, module in layers.items() if id(module.get_parameter("weight")) in embeddings]
    if tied:
        return tied[-1]
    owners = [name for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]
    return owners[-1] if owners and owners[-1] in layers else None


def _head_by_forward(
    model: nn.Module, layers: dict[str, nn.Module], example: tuple[tuple[Any, ...], dict[str, Any]]
) -> object:
    produced: list[tuple[str, Tensor]] = []
    handles = [
        module.register_forward_hook(lambda _m, _a, out, name=name: produced.extend((name, t) for t in _tensors(out)))
        for name, module in layers.items()
    ]
    output = probe_forward(model, example, handles)
    if output is FAILED:  # an example the model cannot run: the caller falls back to the structure
        return FAILED
    outputs = _tensors(output)
    storages = {t.untyped_storage().data_ptr() for t in outputs if t.numel()}
    for name, tensor in reversed(produced):
        if any(tensor is t for t in outputs) or (tensor.numel() and tensor.untyped_storage().data_ptr() in storages):
            return name
    return None


@dataclass
class LayerPlan:
    """What a QAT run quantizes (`layers`), which layer is the output head, and what it skips and why."""

    layers: list[str]
    head: str | None
    skipped: dict[str, str] = field(default_factory=dict)
    only_head: bool = False
    tied_to_float: dict[str, str] = field(default_factory=dict)
    """Selected layers whose weight is also an `nn.Embedding`'s (which stays float): layer -> embedding."""
    folded: dict[str, str] = field(default_factory=dict)
    """Selected convs whose BatchNorm is folded into their quantized weight: conv -> BatchNorm."""


def _unsupported(model: nn.Module) -> dict[str, str]:
    reasons: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv3d, nn.EmbeddingBag)):
            reasons[name] = f"{type(module).__name__} not supported yet"
        elif isinstance(module, nn.MultiheadAttention) and not _is_packed_attention(module):
            reasons[name] = "a MultiheadAttention with separate q/k/v weights (kdim/vdim != embed_dim): not supported"
    return reasons


def plan_layers(
    model: nn.Module,
    scheme: QuantScheme,
    group_size: int,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    example: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
) -> LayerPlan:
    """`select_layers` with its reasons: the head (`find_output_head`) and every skipped layer."""
    candidates = [name for name, module in model.named_modules() if name and _quantizable(module)]
    if not candidates:
        raise ConfigError("include", include, "the model has no nn.Linear, HF Conv1D, nn.Embedding or conv to quantize")
    embedding = {name for name in candidates if isinstance(model.get_submodule(name), nn.Embedding)}
    head = find_output_head(model, example)
    skipped = _unsupported(model)
    only_head = False
    if include:
        chosen = match_globs(candidates, include, "include", "quantizable layer")
    else:
        chosen = set(candidates) - {head}
        if head is not None:
            skipped[head] = "output head (excluded by default: rounding the logits costs the most accuracy)"
        for name in sorted(chosen & embedding):  # embeddings it cannot take are skipped, not an error, by default
            problem = _embedding_problem(model, name, head, chosen, scheme, group_size)
            if problem:
                skipped[name] = problem
                chosen.discard(name)
        if not chosen - embedding and head is not None:  # the head is all there is: quantize it, and say so
            chosen, only_head = chosen | {head}, True
            skipped.pop(head, None)
    if exclude:
        excluded = match_globs(candidates, exclude, "exclude", "quantizable layer")
        for name in excluded & chosen:
            skipped[name] = "excluded"
        chosen -= excluded
    if not chosen:
        raise ConfigError("exclude", exclude, f"leaves no layer to quantize; layers: {', '.join(candidates)}")
    selected = [name for name in candidates if name in chosen]
    for name in [name for name in selected if name in embedding]:
        problem = _embedding_problem(model, name, head, chosen, scheme, group_size)
        if problem:
            raise ConfigError("include", name, f"cannot be quantized: {problem}")
    if scheme.grouped:
        for name in selected:
            layer = model.get_submodule(name)
            if _is_conv(layer) or (_is_registered_kind(layer) and layer.get_parameter(_weight_name(layer)).dim() > 2):
                continue  # convolutions (and registered kinds with 3+-dim weights) take one scale per output channel
            width = _in_features(model.get_submodule(name))
            if width % group_size:
                raise ConfigError("group_size", group_size,
                                  f"must divide the input width of every quantized layer; {name} has {width} "
                                  f"(exclude it, or pick a divisor of {width})")  # fmt: skip
    embeddings = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    weights = {name: id(getattr(model.get_submodule(name), "weight", None)) for name in selected}
    tied = {name: embeddings[weight] for name, weight in weights.items()
            if weight in embeddings and embeddings[weight] not in chosen}  # fmt: skip
    folded = conv_batch_norm_pairs(model, [name for name in selected if _is_conv(model.get_submodule(name))], example)
    return LayerPlan(selected, head, skipped, only_head=only_head, tied_to_float=tied, folded=folded)


def _embedding_problem(
    model: nn.Module, name: str, head: str | None, chosen: set[str], scheme: QuantScheme, group_size: int
) -> str | None:
    """Why embedding `name` cannot be quantized in this plan, or None when it can."""
    embedding = model.get_submodule(name)
    assert isinstance(embedding, nn.Embedding)
    if embedding.max_norm is not None:
        return "max_norm renormalizes the table in place on every lookup; not supported"
    if (
        head is not None
        and head not in chosen
        and embedding.weight is model.get_submodule(head).get_parameter("weight")
    ):
        return f"its weight is the output head {head}'s, which stays float (include both to quantize them once)"
    if scheme.grouped and embedding.embedding_dim % group_size:
        return f"its width {embedding.embedding_dim} is not a multiple of group_size={group_size}"
    return None


def select_layers(
    model: nn.Module,
    scheme: QuantScheme,
    group_size: int,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    example: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
) -> list[str]:
    """The qualified names of the Linear, HF Conv1D and Embedding layers to quantize.

    By default every one but the output head (`find_output_head`: the layer whose output is the model's
    output, found by one forward on `example` when given, else from the structure) and an embedding whose
    table is the head's weight (a tied head stays float, and so does its table): the logits are where
    rounding costs the most accuracy for the fewest bytes. A model whose only Linear is the head (a CNN)
    quantizes the head. `include` selects layers explicitly (then nothing is excluded by default); `exclude`
    removes layers. For grouped schemes every selected layer's input width must be a multiple of `group_size`.
    """
    return plan_layers(model, scheme, group_size, include, exclude, example).layers


def swap_in_fake_quantized(
    model: nn.Module, names: list[str], scheme: QuantScheme, group_size: int, folded: dict[str, str] | None = None
) -> None:
    """Replace each named Linear, HF Conv1D, Embedding or conv by its fake-quantized twin holding the same Parameters.

    Idempotent: a layer already fake-quantized stays as it is. A conv in `folded` (conv -> BatchNorm, as
    `plan_layers` found them; by default found from the model's structure) trains with that BatchNorm folded in.

    `nn.TransformerEncoderLayer`s holding a swapped layer are kept off their fused inference fast path (which
    reads ``linear1.weight`` and friends directly and would run the float weights): see `keep_off_fused_paths`.
    """
    if folded is None:
        folded = conv_batch_norm_pairs(model, [name for name in names if type(model.get_submodule(name)) in CONV_KINDS])
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, FAKE_QUANTIZED):
            continue
        parent_name, _, child = name.rpartition(".")
        swapped: nn.Module
        if isinstance(layer, nn.Linear):
            swapped = FakeQuantizedLinear.from_linear(layer, scheme, group_size)
        elif isinstance(layer, nn.Embedding):
            swapped = FakeQuantizedEmbedding.from_embedding(layer, scheme, group_size)
        elif _is_registered_kind(layer):
            kind = prunable_kind(layer)
            assert kind is not None
            swapped = fake_quantized_registered(layer, kind, scheme, group_size)
        elif isinstance(layer, nn.MultiheadAttention):
            swapped = FakeQuantizedMultiheadAttention.from_mha(layer, scheme, group_size)
        elif type(layer) in CONV_KINDS:
            norm = model.get_submodule(folded[name]) if name in folded else None
            swapped = fake_quantized_conv(layer, scheme, norm)  # type: ignore[arg-type]
        else:
            assert _is_conv1d(layer), f"{name} is a {type(layer).__name__}"
            swapped = FakeQuantizedConv1D.from_conv1d(layer, scheme, group_size)
        setattr(model.get_submodule(parent_name), child, swapped)
    keep_off_fused_paths(model, FAKE_QUANTIZED)


def _no_op_pre_hook(module: nn.Module, args: Any) -> None:
    return None


def keep_off_fused_paths(model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> None:
    """Make every `nn.TransformerEncoderLayer`/`nn.TransformerEncoder` holding a layer of `kinds` run its Python path.

    In eval with gradients off they otherwise take a fused kernel that reads ``linear1.weight`` etc. directly:
    validation would measure the float model and a converted one would fail. The lever is the one PyTorch
    documents in its fast-path conditions: a layer with forward hooks attached is never fused, so each such
    layer gets a no-op forward pre-hook (once; it survives deepcopy); encoders get ``use_nested_tensor = False``.
    """
    for module in model.modules():
        if not any(isinstance(m, kinds) for m in module.modules()):
            continue
        if isinstance(module, nn.TransformerEncoderLayer):
            if _no_op_pre_hook not in module._forward_pre_hooks.values():
                module.register_forward_pre_hook(_no_op_pre_hook)
        elif isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False


def set_fake_quantize(model: nn.Module, enabled: bool) -> None:
    """Switch every fake-quantized layer in `model` between float and fake-quantized forward."""
    for module in model.modules():
        if isinstance(module, FAKE_QUANTIZED):
            module.fake_quantize = enabled  # type: ignore[assignment]


def restore_float_modules(model: nn.Module) -> nn.Module:
    """Undo `swap_in_fake_quantized`: every fake-quantized layer becomes its float layer again.

    The way back from QAT to a float model (for `pruning.export.shrink`, `torch.export`, or more float
    training): a `FakeQuantizedLinear` becomes an `nn.Linear`, a `FakeQuantizedConv1D` Hugging Face's `Conv1D`,
    a `FakeQuantizedEmbedding` an `nn.Embedding`,
    each holding the same `weight` and `bias` Parameters (same objects, same names), so optimizers, masks and
    checkpoints are unaffected. Changes `model` in place and returns it (or the new layer when `model` itself
    is fake-quantized).
    """

    def plain(layer: nn.Module) -> nn.Module:
        restored: nn.Module
        if isinstance(layer, tuple(FAKE_CONVS.values())):
            return float_conv(layer)
        if isinstance(layer, FakeQuantizedMultiheadAttention):
            return restore_float_mha(layer)
        if isinstance(layer, FakeQuantizedRegistered):
            return restore_registered(layer)
        if isinstance(layer, FakeQuantizedEmbedding):
            restored = nn.Embedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx, device="meta",
                                    scale_grad_by_freq=layer.scale_grad_by_freq, sparse=layer.sparse)  # fmt: skip
            restored.weight = layer.weight
            restored.train(layer.training)
            return restored
        if isinstance(layer, FakeQuantizedConv1D):
            conv1d = _hf_conv1d()
            assert conv1d is not None  # a FakeQuantizedConv1D was made from one
            restored = conv1d(layer.nf, layer.nx)
        else:
            assert isinstance(layer, FakeQuantizedLinear)
            restored = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
        restored.weight = layer.weight
        restored.bias = layer.bias  # type: ignore[assignment]
        restored.train(layer.training)
        return restored

    if isinstance(model, FAKE_QUANTIZED):
        return plain(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, FAKE_QUANTIZED):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, plain(module))
    return model

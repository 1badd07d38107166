"""Physically remove pruned channels: the step that turns channel sparsity into a smaller, faster model.

Channel pruning (GradualPruning with `granularity="channels"`) only zeros channels in place: a pruned channel
has an all-zero output row (Linear) or filter (Conv), a zero bias entry, and zero gamma and beta in any
BatchNorm on its way. Such a channel carries exactly 0 to the next layer, so deleting it, together with the
next layer's matching input columns, leaves the outputs unchanged.

Only chains inside a plain `nn.Sequential` (one whose `forward` is Sequential's own) are touched, because
there the data flow is known: a producer, then modules that keep a zero channel zero, then one consumer.
A layer whose output goes anywhere else (a residual add, attention, the model's output) is left alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Exact types with f(0) = 0, applied to each element on its own (dropout only rescales): a zero channel
# stays zero. Sigmoid, Softplus, Hardtanh with a positive floor and the alpha dropouts do not qualify.
_ELEMENTWISE = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Tanh,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Softshrink,
    nn.Hardshrink,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
# Spatial operations that act on each channel alone and map an all-zero channel to zero.
_CHANNEL_LOCAL = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)

Leaf = tuple[str, nn.Module]
Layer = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
Norm = nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d
# Only these exact types are traced through: a subclass may override forward or carry per-channel state
# (a fake-quantized Linear's scales, say) that shrinking the weight alone would leave the wrong size.
_KNOWN = (nn.Linear, nn.Flatten, *_CONVS, *_BATCH_NORMS, *_ELEMENTWISE, *_CHANNEL_LOCAL)


@dataclass(frozen=True)
class _Chain:
    """A producer whose output channels reach exactly one consumer through zero-preserving modules.

    `block` is how many consumer inputs each producer channel feeds: 1, or the spatial size H*W when a
    Flatten sits in between (Flatten lays each channel out as one contiguous block of features).
    """

    producer_name: str
    producer: Layer
    norms: tuple[Norm, ...]
    consumer: Layer
    block: int


class LayerSize(NamedTuple):
    """Parameter counts of one layer before and after `shrink`."""

    before: int
    after: int


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_plain_sequential(module: nn.Module) -> bool:
    """A Sequential that runs its children in order; a subclass with its own forward could do anything."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _leaves(sequential: nn.Module, prefix: str) -> list[Leaf]:
    """The children of `sequential` in execution order, with nested plain Sequentials opened up."""
    leaves: list[Leaf] = []
    for name, child in sequential.named_children():
        qualified = _join(prefix, name)
        leaves += _leaves(child, qualified) if _is_plain_sequential(child) else [(qualified, child)]
    return leaves


def _runs(module: nn.Module, prefix: str = "") -> list[list[Leaf]]:
    """Every maximal run of modules executed one after another, found anywhere in `module`."""
    if not _is_plain_sequential(module):
        return [run for name, child in module.named_children() for run in _runs(child, _join(prefix, name))]
    leaves = _leaves(module, prefix)
    return [leaves, *(run for name, leaf in leaves for run in _runs(leaf, name))]


def _out_channels(layer: Layer) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _chain_from(run: list[Leaf], start: int) -> _Chain | None:
    """The chain that starts at `run[start]`, or None when its output cannot be traced to one consumer."""
    producer_name, producer = run[start]
    # Grouped convolutions tie output channels to input groups, so dropping some would break the grouping.
    if type(producer) not in _KNOWN or not isinstance(producer, Layer) or getattr(producer, "groups", 1) != 1:
        return None
    channels = _out_channels(producer)
    norms: list[Norm] = []
    flattened = False
    for _, module in run[start + 1 :]:
        if type(module) not in _KNOWN:
            return None
        spatial = isinstance(producer, _CONVS) and not flattened
        if isinstance(module, _ELEMENTWISE) or (spatial and isinstance(module, _CHANNEL_LOCAL)):
            continue
        if spatial and isinstance(module, _BATCH_NORMS):
            # Without affine parameters a zero channel leaves the norm as -mean/std, not zero.
            if not module.affine or module.num_features != channels:
                return None
            norms.append(module)
            continue
        if spatial and isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            flattened = True
            continue
        if isinstance(module, nn.Linear) and not spatial:
            block, remainder = divmod(module.in_features, channels)
            if remainder or (block != 1 and not flattened):
                return None
            return _Chain(producer_name, producer, tuple(norms), module, block)
        if spatial and isinstance(module, _CONVS) and module.groups == 1 and module.in_channels == channels:
            return _Chain(producer_name, producer, tuple(norms), module, 1)
        return None
    return None


def _chains(model: nn.Module) -> list[_Chain]:
    """All shrinkable chains of `model`, in the order `named_modules` lists their producers."""
    found = [chain for run in _runs(model) for start in range(len(run)) if (chain := _chain_from(run, start))]
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    return sorted(found, key=lambda chain: order[chain.producer_name])


def shrinkable_producers(model: nn.Module) -> list[str]:
    """Names of the Linear/Conv layers whose channels `shrink` can remove: the default targets of channel pruning.

    Example:
        >>> from lightning_eff.tasks.digits import DigitsMLP
        >>> shrinkable_producers(DigitsMLP(hidden_sizes=[64, 64]))
        ['net.1', 'net.4']
    """
    return [chain.producer_name for chain in _chains(model)]


def _kept_channels(chain: _Chain) -> torch.Tensor:
    """Indices of the channels that still carry a signal; one zero channel survives if none do."""
    weight = chain.producer.weight.detach()
    pruned = (weight.reshape(weight.shape[0], -1) == 0).all(dim=1)
    if chain.producer.bias is not None:
        pruned &= chain.producer.bias.detach() == 0
    for norm in chain.norms:
        pruned &= (norm.weight.detach() == 0) & (norm.bias.detach() == 0)
    kept = (~pruned).nonzero().flatten()
    return kept if kept.numel() else torch.zeros(1, dtype=torch.long, device=weight.device)


def _select(module: nn.Module, name: str, dim: int, index: torch.Tensor) -> None:
    """Keep only `index` along `dim` of the parameter or buffer `name`, keeping its kind, dtype and device."""
    tensor = getattr(module, name)
    if tensor is None:
        return
    smaller = tensor.detach().index_select(dim, index.to(tensor.device)).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(module, name, nn.Parameter(smaller, requires_grad=tensor.requires_grad))
    else:
        setattr(module, name, smaller)


def _shrink_chain(chain: _Chain, kept: torch.Tensor) -> None:
    producer, consumer = chain.producer, chain.consumer
    _select(producer, "weight", 0, kept)
    _select(producer, "bias", 0, kept)
    if isinstance(producer, nn.Linear):
        producer.out_features = kept.numel()
    else:
        producer.out_channels = kept.numel()
    for norm in chain.norms:
        for name in ("weight", "bias", "running_mean", "running_var"):
            _select(norm, name, 0, kept)
        norm.num_features = kept.numel()
    offsets = torch.arange(chain.block, device=kept.device)
    columns = (kept[:, None] * chain.block + offsets).flatten()
    _select(consumer, "weight", 1, columns)
    if isinstance(consumer, nn.Linear):
        consumer.in_features = columns.numel()
    else:
        consumer.in_channels = columns.numel()


@torch.no_grad()
def shrink(model: nn.Module) -> nn.Module:
    """A smaller copy of a channel-pruned `model` with the same outputs: pruned channels are cut out, not zeroed.

    Module names and types stay, so the copy's `state_dict` has the original's keys with smaller shapes.
    `model` itself is not changed.

    Args:
        model: a model whose pruned channels are zero in place (see the module docstring).
    """
    shrunk = copy.deepcopy(model)
    chains = _chains(shrunk)
    # Decide every cut before making any, so a layer that is both a consumer and a producer is read intact.
    kept = [_kept_channels(chain) for chain in chains]
    for chain, channels in zip(chains, kept, strict=True):
        _shrink_chain(chain, channels)
    return shrunk


def shrink_summary(original: nn.Module, shrunk: nn.Module) -> dict[str, LayerSize]:
    """Parameter counts of each layer that `shrink` made smaller, for reports and logs."""

    def own_parameters(module: nn.Module) -> int:
        return sum(parameter.numel() for parameter in module.parameters(recurse=False))

    after = dict(shrunk.named_modules())
    sizes = {
        name: LayerSize(own_parameters(module), own_parameters(after[name]))
        for name, module in original.named_modules()
    }
    return {name: size for name, size in sizes.items() if size.before != size.after}

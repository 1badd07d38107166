"""Structured pruning of discovered channel groups: score units, mask them, and cut them out for real.

`dependency.channel_groups` says which entries of which tensors form one unit (a channel, a head, a kv group).
Here a group's units are scored as a whole (`group_importance`: summed squared weights of every coupled slice,
so a BatchNorm, a bias or a consumer column counts with its producer's row), masked as a whole (`group_masks`:
every coupled parameter, so the masked model already computes what the smaller one will), and removed
(`shrink_groups`: a deep copy with the entries gone from every member, layer attributes such as
`out_features`, a depthwise conv's `groups` or an attention module's head count updated, and a summary per
layer). Anything that cannot be shrunk consistently is refused with the layer and the reason, never skipped:
a shrunk model either computes what the masked one does or does not exist.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.pruning.dependency import ChannelGroup

Masks = dict[str, Tensor]
SCOPES = ("layer", "global")
# Integer attributes of an attention module that count heads (or head-sized widths), scaled with the heads kept.
HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "num_key_value_heads", "n_head", "n_heads", "heads",
                   "num_kv_heads", "n_kv_heads", "all_head_size", "split_size")  # fmt: skip
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm, nn.modules.instancenorm._InstanceNorm)


class ShrinkError(ValueError):
    """Masks or groups that cannot be turned into a smaller model with the same outputs."""


@dataclass
class LayerShrink:
    """What `shrink_groups` changed in one module: tensor shapes and attributes, before -> after."""

    kind: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    attributes: dict[str, tuple[int, int]] = field(default_factory=dict)
    parameters: tuple[int, int] = (0, 0)  # the module's own parameter count, before -> after


def detached_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` without the Trainer or Fabric a LightningModule refers to (those stay out)."""
    memo: dict[int, Any] = {}
    for attribute in ("_trainer", "_fabric"):
        if (value := getattr(model, attribute, None)) is not None:
            memo[id(value)] = None
    return copy.deepcopy(model, memo)


def _own_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters(recurse=False))


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    return {**dict(model.named_buffers(remove_duplicate=False)), **dict(model.named_parameters(remove_duplicate=False))}


def _unit_slices(tensor: Tensor, dim: int, index: Tensor) -> Tensor:
    """[units, everything else]: the entries of each unit along `dim`, with the rest of the tensor."""
    moved = tensor.movedim(dim, 0)
    return moved[index.reshape(-1).to(tensor.device)].reshape(index.shape[0], -1)


def group_importance(model: nn.Module, group: ChannelGroup) -> Tensor:
    """One score per unit: the sum of squared entries of every coupled parameter slice (buffers excluded)."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    score = torch.zeros(group.size, dtype=torch.float64)
    for member in group.members:
        if member.name in parameters:
            values = parameters[member.name].detach().double()
            score += _unit_slices(values, member.dim, member.index).pow(2).sum(1).cpu()
    return score


def unit_masks(model: nn.Module, pruned: Sequence[tuple[ChannelGroup, Tensor]]) -> Masks:
    """Masks (True = pruned) of every coupled parameter for the given pruned units (a bool per unit) per group.

    A mask has the parameter's rank with the member dimension's size and 1 elsewhere; a parameter coupled in
    two groups (a conv's rows and columns) gets both, broadcast together.
    """
    parameters = dict(model.named_parameters(remove_duplicate=False))
    masks: Masks = {}
    for group, units in pruned:
        for member in group.members:
            if member.name not in parameters:
                continue
            parameter = parameters[member.name]
            along = torch.zeros(member.extent, dtype=torch.bool)
            along[member.index[units.cpu()].reshape(-1)] = True
            shape = [1] * parameter.dim()
            shape[member.dim] = member.extent
            mask = along.reshape(shape).to(parameter.device)
            masks[member.name] = masks[member.name] | mask if member.name in masks else mask
    return masks


def group_masks(model: nn.Module, groups: Sequence[ChannelGroup], sparsity: float, scope: str = "layer") -> Masks:
    """Masks that prune `sparsity` of the units, lowest `group_importance` first; each group keeps one unit.

    scope="layer" prunes that share of every group; "global" ranks all units together after dividing each
    group's scores by their mean (groups differ in scale), so weak groups give more.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity}: must be in [0, 1)")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: must be one of {', '.join(SCOPES)}")
    scores = [group_importance(model, group) for group in groups]
    chosen: list[tuple[ChannelGroup, Tensor]] = []
    if scope == "layer":
        for group, score in zip(groups, scores, strict=True):
            units = torch.zeros(group.size, dtype=torch.bool)
            units[score.argsort(stable=True)[: min(round(sparsity * group.size), group.size - 1)]] = True
            chosen.append((group, units))
        return unit_masks(model, chosen)
    normalized = [score / score.mean().clamp_min(1e-30) for score in scores]
    for score in normalized:
        score[score.argmax()] = float("inf")
    flat = torch.cat(normalized) if normalized else torch.zeros(0)
    picked = torch.zeros(flat.numel(), dtype=torch.bool)
    count = min(round(sparsity * flat.numel()), int(torch.isfinite(flat).sum()))
    picked[flat.argsort(stable=True)[:count]] = True
    offset = 0
    for group in groups:
        chosen.append((group, picked[offset : offset + group.size]))
        offset += group.size
    return unit_masks(model, chosen)


def pruned_units(group: ChannelGroup, masks: Mapping[str, Tensor], parameters: Mapping[str, Tensor]) -> Tensor:
    """Units fully masked in every coupled parameter (buffers aside); raise if the members disagree.

    A parameter without a mask counts as unpruned, so masks that leave out a consumer's columns are refused
    rather than shrunk into a model that computes something else.
    """
    verdicts = []
    for member in group.members:
        if member.name in parameters:
            mask = masks.get(member.name)
            full = torch.zeros((), dtype=torch.bool) if mask is None else mask
            full = full.expand(parameters[member.name].shape)
            verdicts.append((member, _unit_slices(full, member.dim, member.index).all(1).cpu()))
    if not verdicts:
        return torch.zeros(group.size, dtype=torch.bool)
    stacked = torch.stack([verdict for _, verdict in verdicts])
    pruned, partly = stacked.all(0), stacked.any(0) & ~stacked.all(0)
    if partly.any():
        unit = int(partly.nonzero()[0])
        inside = [repr(m) for m, v in verdicts if v[unit]]
        outside = [repr(m) for m, v in verdicts if not v[unit]]
        raise ShrinkError(f"group {group.name}: unit {unit} is pruned in {', '.join(inside)} but not in "
                          f"{', '.join(outside)}; mask every coupled member (group_masks does)")  # fmt: skip
    return pruned


def _owner(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def shrink_refusals(model: nn.Module, group: ChannelGroup) -> list[str]:
    """Why this group's members cannot be shrunk consistently (empty when they can)."""
    reasons = []
    modules = dict(model.named_modules())
    for member in group.members:
        module_name = _owner(member.name)[0]
        module = modules.get(module_name)
        parent = modules.get(_owner(module_name)[0]) if module_name else None
        if isinstance(module, nn.MultiheadAttention) or (
            isinstance(parent, nn.MultiheadAttention) and module is parent.out_proj
        ):
            mha = module_name if isinstance(module, nn.MultiheadAttention) else _owner(module_name)[0]
            reasons.append(f"nn.MultiheadAttention {mha} requires embed_dim == num_heads * head_dim and embed_dim "
                           "is also its input and output width (the residual stream): its heads cannot be "
                           "removed, only the feed-forward pair around it")  # fmt: skip
        elif isinstance(module, _NORMS):
            reasons.append(f"{type(module).__name__} {module_name} normalizes over these channels")
        elif isinstance(module, nn.Embedding) and member.dim == 0:
            reasons.append(f"rows of the embedding {module_name} are its vocabulary")
        elif isinstance(module, nn.modules.conv._ConvTransposeNd):
            reasons.append(f"transposed convolution {module_name} is not supported")
        elif module is None:
            reasons.append(f"{member.name} is not a tensor of the model")
    return list(dict.fromkeys(reasons))


def _common_module(names: Sequence[str]) -> str:
    parts = [_owner(name)[0].split(".") for name in names]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _fit(module: nn.Module, change: LayerShrink) -> None:
    """Make a module's size attributes match its shrunk tensors."""

    def set_attribute(attribute: str, value: int) -> None:
        before = getattr(module, attribute)
        if before != value:
            setattr(module, attribute, value)
            change.attributes[attribute] = (before, value)

    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and weight is not None:
        set_attribute("out_features", weight.shape[0])
        set_attribute("in_features", weight.shape[1])
    elif isinstance(module, nn.modules.conv._ConvNd) and weight is not None:
        per_group = module.out_channels // module.groups
        set_attribute("groups", weight.shape[0] // per_group if module.groups > 1 else 1)
        set_attribute("out_channels", weight.shape[0])
        set_attribute("in_channels", weight.shape[1] * module.groups)
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        reference = weight if weight is not None else module.running_mean
        if reference is not None:
            set_attribute("num_features", reference.shape[0])
    elif isinstance(module, nn.Embedding):
        set_attribute("num_embeddings", module.weight.shape[0])
        set_attribute("embedding_dim", module.weight.shape[1])
    elif type(module).__name__ == "Conv1D" and weight is not None and hasattr(module, "nf"):  # HF, [in, out]
        set_attribute("nx", weight.shape[0])
        set_attribute("nf", weight.shape[1])


def _scale_heads(module: nn.Module, kept: int, total: int, where: str, change: LayerShrink) -> None:
    for attribute in HEAD_ATTRIBUTES:
        before = getattr(module, attribute, None)
        if isinstance(before, int) and not isinstance(before, bool):
            after, remainder = divmod(before * kept, total)
            if remainder:
                raise ShrinkError(f"{where}.{attribute}={before} cannot keep {kept}/{total} of its heads")
            setattr(module, attribute, after)
            change.attributes[attribute] = (before, after)


@torch.no_grad()
def shrink_groups(
    model: nn.Module, groups: Sequence[ChannelGroup], masks: Mapping[str, Tensor]
) -> tuple[nn.Module, dict[str, LayerShrink]]:
    """A deep copy of `model` with every pruned unit of `groups` removed from every member, and what changed.

    A unit is pruned when `masks` mark all its entries in every masked member (as `group_masks` makes them);
    the copy then computes what the masked model computes. Raises `ShrinkError` naming the layers when a group
    cannot be shrunk, when masks disagree within a group, when a group would lose every unit, or when the
    masks prune nothing at all (the copy would be the model unchanged).
    """
    refusals = [f"{group.name}: {reason}" for group in groups for reason in shrink_refusals(model, group)]
    if refusals:
        raise ShrinkError("cannot shrink " + "; ".join(refusals))
    parameters = dict(model.named_parameters(remove_duplicate=False))
    removed: dict[tuple[str, int], set[int]] = {}
    head_changes: list[tuple[str, int, int]] = []
    for group in groups:
        units = pruned_units(group, masks, parameters)
        if not units.any():
            continue
        if units.all():
            raise ShrinkError(f"group {group.name}: every unit is pruned; keep at least one")
        for member in group.members:
            removed.setdefault((member.name, member.dim), set()).update(member.index[units].reshape(-1).tolist())
        if group.kind == "heads":
            head_changes.append((_common_module([m.name for m in group.members]), int((~units).sum()), group.size))
    if not removed:
        raise ShrinkError("the masks prune no unit of any group: nothing to remove")

    before = {name: _own_parameters(module) for name, module in model.named_modules()}
    shrunk = detached_copy(model)
    named = _tensors(shrunk)
    names_of: dict[int, list[str]] = {}
    for name, tensor in named.items():
        names_of.setdefault(id(tensor), []).append(name)
    summary: dict[str, LayerShrink] = {}
    modules = dict(shrunk.named_modules())

    def change_of(module_name: str) -> LayerShrink:
        return summary.setdefault(module_name, LayerShrink(type(modules[module_name]).__name__))

    done: set[int] = set()
    for (name, _), _ in list(removed.items()):
        tensor = named[name]
        if id(tensor) in done:
            continue
        done.add(id(tensor))
        aliases = names_of[id(tensor)]
        smaller = tensor.detach()
        for dim in range(tensor.dim()):
            gone = set().union(*(removed.get((alias, dim), set()) for alias in aliases))
            if gone:
                keep = [i for i in range(tensor.shape[dim]) if i not in gone]
                smaller = smaller.index_select(dim, torch.tensor(keep, device=tensor.device))
        replacement: Tensor = smaller.clone()
        if isinstance(tensor, nn.Parameter):
            replacement = nn.Parameter(replacement, requires_grad=tensor.requires_grad)
        for alias in aliases:
            module_name, leaf = _owner(alias)
            setattr(modules[module_name], leaf, replacement)
            change_of(module_name).shapes[leaf] = (tuple(tensor.shape), tuple(replacement.shape))
    for module_name in list(summary):
        _fit(modules[module_name], summary[module_name])
    for where, kept, total in head_changes:
        for sub_name, sub in modules[where].named_modules(prefix=where):
            if not isinstance(sub, (nn.Linear, nn.modules.conv._ConvNd)):
                _scale_heads(sub, kept, total, sub_name or "the model", change_of(sub_name))
    for name, change in summary.items():
        change.parameters = (before[name], _own_parameters(modules[name]))
    return shrunk, {name: change for name, change in summary.items() if change.shapes or change.attributes}


def _tensor_leaves(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [leaf for value in output.values() for leaf in _tensor_leaves(value)]
    if isinstance(output, (list, tuple)):
        return [leaf for value in output for leaf in _tensor_leaves(value)]
    return []


def _disagreement(model: nn.Module, groups: Sequence[ChannelGroup], example_kwargs: Mapping[str, Any]) -> str | None:
    """Prune unit 0 of every group: None when masked and shrunk models agree on the example, else why not."""
    pruned = []
    for group in groups:
        units = torch.zeros(group.size, dtype=torch.bool)
        units[0] = True
        pruned.append((group, units))
    masks = unit_masks(model, pruned)
    masked = detached_copy(model).eval()
    parameters = dict(masked.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, mask in masks.items():
            parameters[name].mul_(~mask)
        expected = _tensor_leaves(masked(**example_kwargs))
        try:
            shrunk, _ = shrink_groups(model, groups, masks)
            got = _tensor_leaves(shrunk.eval()(**example_kwargs))
        except Exception as error:  # the model's own forward may not survive the new shapes
            detail = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
            return f"the model's forward does not run at the pruned sizes (it computes shapes its own way): {detail}"
    if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected, strict=False)):
        return "the shrunk model's outputs have other shapes than the masked model's"
    for g, e in zip(got, expected, strict=True):
        if g.is_floating_point() and not torch.allclose(g, e, rtol=1e-4, atol=1e-5 * max(1.0, e.abs().max().item())):
            return f"shrunk and masked outputs differ by {(g - e).abs().max().item():.3g}"
    return None


def verify_groups(
    model: nn.Module, groups: Sequence[ChannelGroup], example_kwargs: Mapping[str, Any]
) -> dict[str, str]:
    """Group name -> why pruning it for real breaks the model (one unit pruned on the example inputs).

    All groups are tried at once; only when that fails is each tried alone, so a healthy model costs one
    masked and one shrunk forward.
    """
    failures: dict[str, str] = {}
    pending = list(groups)
    while pending and _disagreement(model, pending, example_kwargs) is not None:
        for group in pending:
            if (reason := _disagreement(model, [group], example_kwargs)) is not None:
                failures[group.name] = reason
        remaining = [group for group in pending if group.name not in failures]
        if len(remaining) == len(pending):  # each passes alone but not together: refuse them all
            failures.update({group.name: "fails only together with other groups" for group in pending})
            break
        pending = remaining
    return failures

"""Which weights a pruning run targets, and which parameters move with a pruned channel."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightning_eff.pruning.export import shrinkable_producers
from lightning_eff.validation import ConfigError, match_globs

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class PruningTarget:
    """One targeted weight.

    Args:
        module: the layer's qualified name, e.g. ``net.1``.
        weight: its weight parameter's name, e.g. ``net.1.weight``.
        coupled: parameters whose entry i belongs to output channel i (the bias, a following BatchNorm's
            weight and bias): channel pruning zeroes them with the row, so the channel's output is exactly 0
            and `export.shrink` can remove it without changing the model's outputs.
    """

    module: str
    weight: str
    coupled: tuple[str, ...] = ()


def coupled_parameters(model: nn.Module, module_name: str) -> tuple[str, ...]:
    """The bias of `module_name` and the affine parameters of a BatchNorm right after it in a Sequential."""
    layer = model.get_submodule(module_name)
    coupled = [f"{module_name}.bias"] if getattr(layer, "bias", None) is not None else []
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(parent, nn.Sequential):
        names = [name for name, _ in parent.named_children()]
        following = parent[names.index(child) + 1] if names.index(child) + 1 < len(names) else None
        if isinstance(following, NORMS) and following.affine:
            prefix = f"{parent_name}.{names[names.index(child) + 1]}" if parent_name else names[names.index(child) + 1]
            coupled += [f"{prefix}.weight", f"{prefix}.bias"]
    return tuple(coupled)


def _input_width(layer: nn.Module) -> int:
    weight = layer.get_parameter("weight")
    return int(weight.shape[1])


def select_targets(
    model: nn.Module,
    granularity: str,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    group_size: int | None = None,
) -> list[PruningTarget]:
    """The layers to prune, by module-name globs.

    By default every Linear and Conv layer; for ``channels``, the layers whose channels `export.shrink`
    can remove (pruning a classifier head's rows would delete classes); for ``n:m``, the Linear layers
    whose input width is a multiple of M. An include or exclude pattern that matches nothing is an error
    that lists the layers that exist.
    """
    layers = {name: module for name, module in model.named_modules() if isinstance(module, PRUNABLE)}
    available = list(layers)
    if include:
        chosen = match_globs(available, include, "include", "prunable layer")
    elif granularity == "channels":
        chosen = set(shrinkable_producers(model))
    else:
        chosen = set(available)
    excluded = match_globs(available, exclude, "exclude", "prunable layer") if exclude else set()
    if chosen and chosen <= excluded:
        raise ConfigError("exclude", exclude, f"leaves no layer to prune; layers: {', '.join(available)}")
    chosen -= excluded
    if granularity == "n:m" and group_size is not None:
        unfit = sorted(
            name
            for name in chosen
            if not isinstance(layers[name], nn.Linear) or _input_width(layers[name]) % group_size
        )
        if include and unfit:
            rule = f"is not a Linear layer whose input width is a multiple of M={group_size}"
            raise ConfigError("include", unfit[0], rule)
        chosen -= set(unfit)
    if not chosen:
        raise ConfigError("include", include, f"leaves no layer to prune; layers: {', '.join(available)}")
    ordered = [name for name in available if name in chosen]
    return [
        PruningTarget(
            module=name,
            weight=f"{name}.weight",
            coupled=coupled_parameters(model, name) if granularity == "channels" else (),
        )
        for name in ordered
    ]

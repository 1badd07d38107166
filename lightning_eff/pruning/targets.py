"""Which weights a pruning run targets, and which parameters move with a pruned channel.

Layers are found through the registry in `layers.py` (Linear, Conv, MultiheadAttention's packed projection,
Hugging Face's Conv1D, and whatever a user registers). A weight that several names share (tied weights:
GPT-2's ``lm_head`` and ``wte``, BERT's MLM decoder and word embeddings) is one target with one mask, keyed
by its canonical name, the one `named_parameters()` gives (the first registered); the other names are its
aliases. Embeddings are an opt-in kind: pruned (unstructured) only when `include` names them. A layer whose
weight is shared with one (a head tied to the token embedding) is left dense unless `include` names it,
because pruning it prunes the embedding too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
from torch import nn

from lightning_eff.pruning.layers import PrunableKind, prunable_kind
from lightning_eff.validation import ConfigError, match_globs

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The built-in PyTorch layer types; the full, extensible list is the registry in `layers.py`."""
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
NM_KINDS = "Linear, HF Conv1D, MultiheadAttention in_proj"


@dataclass(frozen=True)
class PruningTarget:
    """One targeted weight.

    Args:
        module: the layer's qualified name, e.g. ``net.1``.
        weight: its weight parameter's canonical name, e.g. ``net.1.weight`` (for a tied weight, the name
            `named_parameters()` gives, which may belong to another module: ``transformer.wte.weight``).
        coupled: parameters whose entry i belongs to output channel i (the bias, a following BatchNorm's
            weight and bias): channel pruning zeroes them with the row, so the channel's output is exactly 0
            and `export.shrink` can remove it without changing the model's outputs.
        aliases: the weight's other names (tied weights), e.g. ``lm_head.weight``; they share the mask.
        output_dim: the weight's output-channel dimension (1 for Hugging Face's Conv1D, whose weight is [in, out]).
        input_dim: the weight's input dimension, along which N:M groups run.
    """

    module: str
    weight: str
    coupled: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    output_dim: int = 0
    input_dim: int = 1

    @property
    def layout(self) -> tuple[int, int]:
        """(output dim, input dim), as `masks.compute_masks` takes it."""
        return self.output_dim, self.input_dim


@dataclass
class Selection:
    """What `select` chose: the targets, and the layers it left dense on purpose with the reason."""

    targets: list[PruningTarget]
    left_dense: dict[str, str] = field(default_factory=dict)

    @property
    def ties(self) -> dict[str, tuple[str, ...]]:
        """Targeted weights that have other names: canonical name -> aliases."""
        return {t.weight: t.aliases for t in self.targets if t.aliases}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def prunable_layers(model: nn.Module, opt_in: bool = False) -> dict[str, tuple[nn.Module, PrunableKind]]:
    """Every module of `model` with a registered kind and a weight, by qualified name, in `named_modules` order
    (with ``opt_in``, the opt-in kinds too: embeddings)."""
    layers = {}
    for name, module in model.named_modules():
        kind = prunable_kind(module, opt_in)
        if kind is not None:
            layers[name] = (module, kind)
    return layers


def parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter (by `id`), canonical first: tied parameters have several."""
    names: dict[int, list[str]] = {id(parameter): [name] for name, parameter in model.named_parameters()}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if name not in names[id(parameter)]:
            names[id(parameter)].append(name)
    return names


def _is_prunable_slot(model: nn.Module, name: str) -> bool:
    """Whether parameter `name` is the prunable weight of a prunable layer (not an Embedding's table, say)."""
    prefix, _, attribute = name.rpartition(".")
    kind = prunable_kind(model.get_submodule(prefix))
    return kind is not None and kind.weight == attribute


def _owner(model: nn.Module, name: str) -> str:
    prefix = name.rpartition(".")[0]
    return type(model.get_submodule(prefix)).__name__


def coupled_parameters(model: nn.Module, module_name: str) -> tuple[str, ...]:
    """The bias of `module_name` and the affine parameters of a BatchNorm right after it in a Sequential."""
    layer = model.get_submodule(module_name)
    kind = prunable_kind(layer)
    bias = kind.bias if kind is not None else "bias"
    coupled = [_join(module_name, bias)] if bias and getattr(layer, bias, None) is not None else []
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(parent, nn.Sequential):
        names = [name for name, _ in parent.named_children()]
        following = parent[names.index(child) + 1] if names.index(child) + 1 < len(names) else None
        if isinstance(following, NORMS) and following.affine:
            prefix = f"{parent_name}.{names[names.index(child) + 1]}" if parent_name else names[names.index(child) + 1]
            coupled += [f"{prefix}.weight", f"{prefix}.bias"]
    return tuple(coupled)


def check_no_opt_in_layer(model: nn.Module, key: str, patterns: list[str]) -> None:
    """For ``channels``: a pattern that names only opt-in layers (embeddings) is a `ConfigError` saying so."""
    layers = prunable_layers(model, opt_in=True)
    for pattern in patterns:
        hits = [name for name in layers if fnmatchcase(name, pattern)]
        if hits and all(layers[name][1].opt_in for name in hits):
            kind = type(layers[hits[0]][0]).__name__
            raise ConfigError(key, pattern, f"names {hits[0]} ({kind}), which is pruned with granularity=unstructured"
                                            " only: channels come from the model's channel groups")  # fmt: skip


def select(
    model: nn.Module,
    granularity: str,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    group_size: int | None = None,
) -> Selection:
    """The layers to prune, by module-name globs, and the ones left dense on purpose (see `select_targets`)."""
    layers = prunable_layers(model, opt_in=granularity != "channels")
    available = list(layers)
    names = parameter_names(model)
    canonical = {name: group[0] for group in names.values() for name in group}

    def weight_of(layer: str) -> torch.Tensor:
        module, kind = layers[layer]
        weight = kind.parameter(module)
        assert weight is not None  # prunable_kind only admits layers that have one
        return weight

    def names_of(layer: str) -> list[str]:
        return names.get(id(weight_of(layer)), [_join(layer, layers[layer][1].weight)])

    by_default = {name for name in available if not layers[name][1].opt_in}
    chosen = match_globs(available, include, "include", "prunable layer") if include else by_default
    excluded = match_globs(available, exclude, "exclude", "prunable layer") if exclude else set()
    if chosen and chosen <= excluded:
        raise ConfigError("exclude", exclude, f"leaves no layer to prune; layers: {', '.join(available)}")
    chosen -= excluded
    left_dense: dict[str, str] = {}
    excluded_weights = {id(weight_of(layer)): layer for layer in excluded}
    for layer in [name for name in available if name in chosen]:
        others = [name for name in names_of(layer) if not _is_prunable_slot(model, name)]
        if id(weight_of(layer)) in excluded_weights:
            left_dense[layer] = f"its weight is also excluded layer {excluded_weights[id(weight_of(layer))]}'s"
        elif others and not include:
            left_dense[layer] = (
                f"its weight is tied to {others[0]} ({_owner(model, others[0])}), which stays dense; "
                "include the layer to prune both"
            )
    chosen -= set(left_dense)
    if granularity == "n:m" and group_size is not None:
        unfit = {}
        for layer in sorted(chosen):
            module, kind = layers[layer]
            if not kind.nm:
                kind_name = type(module).__name__
                unfit[layer] = f"it is a {kind_name}; n:m is for weights multiplied as matrices ({NM_KINDS})"
            elif kind.input_width(module) % group_size:
                unfit[layer] = f"input width {kind.input_width(module)} is not a multiple of M={group_size}"
        if include and unfit:
            layer = next(iter(unfit))
            rule = f"cannot be pruned n:m with M={group_size}: {unfit[layer]}"
            raise ConfigError("include", layer, rule)
        left_dense.update(unfit)
        chosen -= set(unfit)
    if not chosen:
        dense = "".join(f"; {layer} left dense: {why}" for layer, why in left_dense.items())
        raise ConfigError("include", include, f"leaves no layer to prune; layers: {', '.join(available)}{dense}")
    targets: list[PruningTarget] = []
    seen: set[int] = set()
    for layer in available:
        if layer not in chosen or id(weight_of(layer)) in seen:
            continue  # a weight shared by two chosen layers is pruned once
        seen.add(id(weight_of(layer)))
        all_names = names_of(layer)
        kind = layers[layer][1]
        coupled = coupled_parameters(model, layer) if granularity == "channels" else ()
        targets.append(
            PruningTarget(
                module=layer,
                weight=all_names[0],
                coupled=tuple(dict.fromkeys(canonical.get(name, name) for name in coupled)),
                aliases=tuple(all_names[1:]),
                output_dim=kind.output_dim,
                input_dim=kind.input_dim,
            )
        )
    return Selection(targets, {layer: left_dense[layer] for layer in available if layer in left_dense})


def select_targets(
    model: nn.Module,
    granularity: str,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    group_size: int | None = None,
) -> list[PruningTarget]:
    """The layers to prune, by module-name globs.

    By default every prunable layer (`layers.py`: Linear, Conv, MultiheadAttention's in_proj, HF Conv1D, and
    registered kinds) but the opt-in kinds (embeddings: `include` names them) and a layer whose weight is tied
    to an opt-in or unregistered module (a head tied to an embedding: `include` it to prune both, once);
    ``channels`` is selected by group instead, from the model's graph (`GradualPruning` with `group_plan`: a
    classifier head's rows reach the output and stay); for
    ``n:m``, the layers of an n:m kind whose input width is a multiple of M. A weight shared by several chosen
    layers is one target. An include or exclude pattern that matches nothing is an error listing the layers.
    """
    return select(model, granularity, include, exclude, group_size).targets

"""GradualPruning(granularity="channels"): channel groups found in the model's graph, masked and shrunk together.

Example inputs: `pl_module.example_input_array` when set (a tensor or tuple: positional, a dict: keyword
arguments of the LightningModule's forward); otherwise the inputs of the first forward call, during the first
training step, of the LightningModule or one of its direct children (forward pre-hooks with kwargs; the
outermost module called first wins, e.g. ``self.model(**inputs)`` in ``training_step``). Under DDP rank 0's
inputs are broadcast, so every rank traces the same graph on the same batch and finds the same groups.

The module is traced as a deep copy in eval mode, with fake-quantized layers restored to float
(`quantization.restore_float_modules`). Group member names are relative to that module; the plan keeps its
`prefix` in the LightningModule, and masks are keyed by the LightningModule's parameter names.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import replace
from fnmatch import fnmatchcase
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_eff.pruning.dependency import Analysis, ChannelGroup, Member, Skipped, analyze
from lightning_eff.pruning.layers import prunable_kind
from lightning_eff.pruning.structured_shrink import Masks, detached_copy, group_masks, pruned_units
from lightning_eff.pruning.targets import PruningTarget
from lightning_eff.quantization.prepare import restore_float_modules
from lightning_eff.validation import ConfigError


class InputCapture:
    """Records the first forward call (module name, args, kwargs) of a LightningModule or its direct children."""

    def __init__(self, pl_module: nn.Module) -> None:
        self.call: tuple[str, tuple, dict[str, Any]] | None = None
        self.handles = [
            module.register_forward_pre_hook(self._hook(name), with_kwargs=True)
            for name, module in [("", pl_module), *pl_module.named_children()]
        ]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            # Under DDP, Lightning calls the LightningModule with `forward` patched to `training_step`: not a forward
            if self.call is None and "forward" not in vars(module):
                self.call = (name, tuple(args), dict(kwargs))
                self.remove()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def as_kwargs(module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A call's positional and keyword arguments as keyword arguments of `module.forward` (**kwargs opened)."""
    signature = inspect.signature(module.forward)
    bound = signature.bind(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            raise ConfigError("granularity", "channels", f"{type(module).__name__}.forward takes *{name}: channel "
                              "groups are traced with keyword inputs; set example_input_array to a dict")  # fmt: skip
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _prefixed(group: ChannelGroup, prefix: str) -> ChannelGroup:
    if not prefix:
        return group
    members = tuple(Member(f"{prefix}.{m.name}", m.dim, m.index, m.extent) for m in group.members)
    return replace(group, name=f"{prefix}.{group.name}", members=members)


def producers(model: nn.Module, group: ChannelGroup) -> list[str]:
    """Module names of the group's producers: layers whose output channels (weight rows) are members."""
    names = []
    for member in group.members:
        module_name, _, leaf = member.name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        kind = prunable_kind(module)
        weight = getattr(module, leaf, None)
        is_weight = kind is not None and leaf == kind.weight and isinstance(weight, Tensor)
        if is_weight and member.dim == kind.output_dim % weight.dim():  # type: ignore[union-attr]
            names.append(module_name)
    return list(dict.fromkeys(names))


class GroupPlan:
    """The channel groups of one model (names as in the LightningModule), the selection and the masks' maths."""

    def __init__(self, prefix: str, analysis: Analysis, groups: list[ChannelGroup], skipped: list[Skipped]) -> None:
        self.prefix = prefix
        self.analysis = analysis  # relative to the traced module
        self.groups = groups  # selected, LightningModule names
        self.skipped = skipped  # not prunable, or not selected (with the reason)

    def module(self, pl_module: nn.Module) -> nn.Module:
        return pl_module.get_submodule(self.prefix) if self.prefix else pl_module

    def masks(self, pl_module: nn.Module, sparsity: float, scope: str) -> Masks:
        """Masks of every member parameter of the selected groups, by the LightningModule's parameter names."""
        return group_masks(pl_module, self.groups, sparsity, scope)

    def unit_sparsity(self, masks: Mapping[str, Tensor], parameters: Mapping[str, Tensor]) -> dict[str, float]:
        """Share of each selected group's units that the masks prune."""
        return {g.name: float(pruned_units(g, masks, parameters).float().mean()) for g in self.groups}

    def targets(self, parameters: Mapping[str, Tensor]) -> list[PruningTarget]:
        """Every parameter a selected group masks, as a target (for the per-layer sparsity and the report)."""
        names = dict.fromkeys(m.name for g in self.groups for m in g.members if m.name in parameters)
        return [PruningTarget(module=name.rpartition(".")[0], weight=name) for name in names]

    def groups_for(self, model: nn.Module) -> list[ChannelGroup]:
        """The groups named for `model`: the LightningModule itself, or the traced module inside it."""
        names = {*dict(model.named_parameters(remove_duplicate=False)), *dict(model.named_buffers())}
        if not self.prefix or all(m.name in names for g in self.groups for m in g.members):
            return self.groups
        cut = len(self.prefix) + 1
        return [replace(g, members=tuple(replace(m, name=m.name[cut:]) for m in g.members)) for g in self.groups]


def _select(pl_module: nn.Module, analysis: Analysis, prefix: str, include: list[str] | None,
            exclude: list[str] | None) -> GroupPlan:  # fmt: skip
    groups = [_prefixed(g, prefix) for g in analysis.groups]
    skipped = [Skipped(_prefixed(s.group, prefix), s.reasons) for s in analysis.skipped]
    layers = {g.name: producers(pl_module, g) for g in groups}
    every = list(
        dict.fromkeys(name for g in [*groups, *(s.group for s in skipped)] for name in producers(pl_module, g))
    )
    for key, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or []:
            if not any(fnmatchcase(name, pattern) for name in every):
                raise ConfigError(key, pattern, f"matches no layer of a channel group; layers: {', '.join(every)}")
    chosen, left = [], []
    for group in groups:
        names = layers[group.name]
        if include and not any(fnmatchcase(n, p) for n in names for p in include):
            left.append(Skipped(group, ("not selected by include",)))
        elif exclude and any(fnmatchcase(n, p) for n in names for p in exclude):
            left.append(Skipped(group, ("excluded",)))
        else:
            chosen.append(group)
    if not chosen:
        reasons = "; ".join(f"{s.group.name}: {s.reasons[0]}" for s in [*skipped, *left][:6])
        key, value = (
            ("include", include) if include else ("exclude", exclude) if exclude else ("granularity", "channels")
        )
        traced = f"; traced {prefix}, the first module training_step called: set example_input_array or call " \
            "the whole model" if prefix else ""  # fmt: skip
        raise ConfigError(key, value, f"leaves no channel group to prune ({reasons}){traced}")
    return GroupPlan(prefix, analysis, chosen, skipped + left)


def _example_call(pl_module: L.LightningModule) -> tuple[str, tuple, dict[str, Any]] | None:
    """`example_input_array` as a call of the LightningModule itself, or None when it is not set."""
    example = pl_module.example_input_array
    if example is None:
        return None
    if isinstance(example, Mapping):
        return "", (), dict(example)
    return "", tuple(example) if isinstance(example, (tuple, list)) else (example,), {}


def _trace_and_select(pl_module: L.LightningModule, call: tuple[str, tuple, dict[str, Any]],
                      include: list[str] | None, exclude: list[str] | None,
                      broadcast: Any = None) -> GroupPlan:  # fmt: skip
    name, args, kwargs = call
    module = pl_module.get_submodule(name) if name else pl_module
    inputs = as_kwargs(module, args, kwargs)
    device = next(module.parameters()).device
    cpu = apply_to_collection(inputs, Tensor, lambda t: t.detach().cpu())
    if broadcast is not None:
        cpu = broadcast(cpu)
    inputs = apply_to_collection(cpu, Tensor, lambda t: t.to(device))
    traced = restore_float_modules(detached_copy(module)).eval()
    with torch.random.fork_rng(devices=[]):
        analysis = analyze(traced, inputs)
    return _select(pl_module, analysis, name, include, exclude)


def check_selection(pl_module: L.LightningModule, include: list[str] | None, exclude: list[str] | None) -> None:
    """Before training: where `example_input_array` is set, trace now, so a selection that leaves no group fails
    at setup (the app's `check_model`) rather than after the first training step."""
    call = _example_call(pl_module)
    if call is not None:
        _trace_and_select(pl_module, call, include, exclude)


def discover(trainer: L.Trainer, pl_module: L.LightningModule, call: tuple[str, tuple, dict[str, Any]] | None,
             include: list[str] | None, exclude: list[str] | None) -> GroupPlan:  # fmt: skip
    """Trace the module of `call` (or `example_input_array`) and select its groups; the same on every rank."""
    call = _example_call(pl_module) or call
    if call is None:
        raise ConfigError("granularity", "channels", "needs example inputs to trace the model: set "
                          "example_input_array, or call the model (or a child module) in training_step")  # fmt: skip
    broadcast = (lambda value: trainer.strategy.broadcast(value, src=0)) if trainer.world_size > 1 else None
    plan = _trace_and_select(pl_module, call, include, exclude, broadcast)
    name = call[0]
    rank_zero_info(f"GradualPruning: {len(plan.groups)} channel groups of {name or type(pl_module).__name__} "
                   f"selected, {len(plan.skipped)} left: " + "; ".join(f"{s.group.name}: {s.reasons[0]}"
                                                                      for s in plan.skipped[:10]))  # fmt: skip
    return plan

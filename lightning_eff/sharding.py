"""FSDP2 (``fully_shard``) helpers the capabilities share: local shards, and a plain copy of a sharded model.

Under Lightning's `ModelParallelStrategy` a module's parameters are `DTensor`s sharded along dim 0 between
steps. A callback that edits weights works on `local_shard(parameter)` (the rank's rows); one that needs the
whole model (QAT's conversion, pruning's export) takes `unsharded_copy`, which gathers one parameter at a
time and builds a plain module of the original classes, since FSDP2 forbids `copy.deepcopy`.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, TypeVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor

ModuleT = TypeVar("ModuleT", bound=nn.Module)

_FSDP_ATTRIBUTES = ("_fsdp_use_orig_params", "_is_fsdp_managed_module")
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")  # fmt: skip


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this rank holds (sharing its storage: editing it edits the parameter), detached from
    autograd like ``parameter.data``; a plain tensor as is."""
    return tensor.to_local().detach() if isinstance(tensor, DTensor) else tensor


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` is under FSDP2's `fully_shard` (or tensor parallelism), which forbids deepcopy.

    By the modules as well as the parameters: after a forward without backward FSDP2 leaves the root unit's
    parameters gathered, plain tensors, until the next backward.
    """
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(parameter, DTensor) for parameter in module.parameters()) or any(
        isinstance(unit, FSDPModule) for unit in module.modules()
    )


def reshard(module: nn.Module) -> None:
    """Put every FSDP2 unit of `module` back in its sharded state.

    After a forward without backward (Lightning's model summary runs one), FSDP2 leaves the root unit gathered:
    its parameters are plain tensors until the next backward. Code that holds on to parameters (the optimizer
    does; so does pruning) must see the sharded DTensors, which are the ones that persist.
    """
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a DTensor: every rank must call it in the same order)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def plain_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The user's class under FSDP2's dynamic ``FSDP<Name>`` subclass."""
    from torch.distributed.fsdp import FSDPModule

    if not issubclass(cls, FSDPModule):
        return cls
    return next(base for base in cls.__mro__[1:] if issubclass(base, nn.Module) and not issubclass(base, FSDPModule))


def _is_fsdp_hook(hook: Any) -> bool:
    function = getattr(hook, "func", hook)  # functools.partial
    function = getattr(function, "__func__", function)  # bound method
    return str(getattr(function, "__module__", "")).startswith("torch.distributed.fsdp")


def _copy_module(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    cls = plain_class(type(module))
    copied: nn.Module = cls.__new__(cls)
    memo[id(module)] = copied
    # __getstate__, as pickling and deepcopy do: a LightningModule drops its trainer there.
    state = {key: value for key, value in module.__getstate__().items()
             if key not in _FSDP_ATTRIBUTES and not key.startswith("__composable_api_state_key")}  # fmt: skip
    if "_device_mesh" in state:  # the copy is not sharded; a mesh holds process groups
        state["_device_mesh"] = None
    copied.__dict__["_modules"] = {name: None if child is None else _copy_module(child, memo)
                                   for name, child in state.pop("_modules").items()}  # fmt: skip
    for key in _HOOK_DICTS:
        if key in state:
            state[key] = OrderedDict((k, h) for k, h in state[key].items() if not _is_fsdp_hook(h))
    if "_forward_pre_hooks_with_kwargs" in state:
        state["_forward_pre_hooks_with_kwargs"] = {k: v for k, v in state["_forward_pre_hooks_with_kwargs"].items()
                                                   if k in state["_forward_pre_hooks"]}  # fmt: skip
    for key, value in state.items():
        copied.__dict__[key] = copy.deepcopy(value, memo)
    return copied


def unsharded_copy(module: ModuleT, rank0_only: bool = False) -> ModuleT | None:
    """A plain (unsharded, CPU) copy of `module`, its FSDP2 hooks and state left behind; a collective.

    Parameters and buffers are gathered one at a time (`DTensor.full_tensor`), so the whole model is never held
    twice while gathering. With `rank0_only`, other ranks take part in the gathers, keep nothing and get None.
    Ties (one parameter under two names) stay tied in the copy. A module that is not sharded is deep-copied.
    """
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    memo: dict[int, Any] = {}
    seen: set[int] = set()
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for _, tensor in named:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        whole = full_tensor(tensor).detach()
        if rank0_only and rank != 0:
            continue
        whole = whole.cpu().clone()
        memo[id(tensor)] = nn.Parameter(whole, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else whole
    if rank0_only and rank != 0:
        return None
    copied = _copy_module(module, memo)
    return copied  # type: ignore[return-value]


def fully_shard_blocks(root: nn.Module, blocks: list[nn.Module], mesh: Any, **kwargs: Any) -> None:
    """FSDP2 the usual way: each block its own unit (gathered only while it runs), then the root for the rest.

    A no-op on a root already sharded (`configure_model` runs again on every `fit`).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(root, FSDPModule):
        return
    for block in blocks:
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(root, mesh=mesh, **kwargs)

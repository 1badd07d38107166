"""Channel ids and their union-find: the bookkeeping under `channel_trace` (see `dependency`'s docstring).

Every (parameter or buffer, dimension) gets a range of ids when an op first gives it a meaning; ops pair ids
element by element; union-find over them gives the atoms (entries that must be pruned together).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx.node import Node

IdsValue = Any  # Tensor of ids, _Ref, None, or a list/tuple of those


@dataclass(frozen=True)
class _Ref:
    """A parameter or buffer placeholder: its dimensions get ids only when an op says what they mean."""

    name: str
    parameter: bool


def _bind(target: Any, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """An op's arguments by schema name, defaults filled in."""
    schema = target._schema.arguments
    bound = {arg.name: arg.default_value for arg in schema if arg.has_default_value()}
    bound.update(zip((arg.name for arg in schema), args, strict=False))
    bound.update(kwargs)
    return bound


def _constant(ids: Tensor, dim: int) -> bool:
    return ids.shape[dim] <= 1 or bool((ids == ids.narrow(dim, 0, 1)).all())


def _compact(ids: Tensor) -> Tensor:
    """`ids` with every dimension they do not vary along cut to size 1 (batch, tokens, pixels): same atoms."""
    for dim in range(ids.dim()):
        if ids.shape[dim] > 1 and _constant(ids, dim):
            ids = ids.narrow(dim, 0, 1)
    return ids


def _along(vector: Tensor, dim: int, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """`vector` laid along `dim` of a tensor of `shape`, repeated over every other dimension."""
    view = [1] * len(shape)
    view[dim] = vector.numel()
    return vector.reshape(view).expand(shape).contiguous()


def _module_of(node: Node, with_type: bool = False) -> str:
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if not stack:
        return "the model"
    path, kind = stack[-1]
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    return f"{path or 'the model'} ({kind.rpartition('.')[2]})" if with_type else path or "the model"


def _flat(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _flat(item)]
    return [value]


class ChannelIds:
    """Runs an exported graph on real inputs while propagating channel ids (see the module docstring)."""

    def __init__(self, canonical: Mapping[str, str]) -> None:
        self.canonical = canonical  # tied tensors: every alias -> the first name the model lists
        self.parent = torch.empty(0, dtype=torch.long)
        self.spaces: dict[tuple[str, int], tuple[int, int]] = {}
        self.marks: list[tuple[Tensor, str]] = []
        self.head_ids: list[Tensor] = []
        self.user_inputs: set[Node] = set()

    # --- union-find over channel ids --------------------------------------------------------------------
    def space(self, name: str, dim: int, size: int) -> Tensor:
        if (name, dim) not in self.spaces:
            base = len(self.parent)
            self.parent = torch.cat([self.parent, torch.arange(base, base + size)])
            self.spaces[(name, dim)] = (base, size)
        base, size = self.spaces[(name, dim)]
        return torch.arange(base, base + size)

    def find(self, ids: Tensor) -> Tensor:
        roots = self.parent[ids]
        while not torch.equal(up := self.parent[roots], roots):
            roots = up
        self.parent[ids] = roots
        return roots

    def roots(self, ids: Tensor) -> Tensor:
        out = ids.clone()
        valid = ids >= 0
        out[valid] = self.find(ids[valid])
        return out

    def union(self, a: Tensor, b: Tensor) -> None:
        while a.numel():
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            a, b = torch.minimum(ra, rb)[differ], torch.maximum(ra, rb)[differ]
            self.parent.scatter_reduce_(0, b, a, reduce="amin")

    def pair(self, a: Tensor, b: Tensor) -> None:
        """Union a's and b's ids element by element (after broadcasting), skipping untracked entries."""
        rank = max(a.dim(), b.dim())
        a, b = a.reshape((1,) * (rank - a.dim()) + a.shape), b.reshape((1,) * (rank - b.dim()) + b.shape)
        for dim in range(rank):  # drop dimensions along which neither varies: they add no pairs
            if _constant(a, dim) and _constant(b, dim):
                a, b = a.narrow(dim, 0, min(1, a.shape[dim])), b.narrow(dim, 0, min(1, b.shape[dim]))
        a, b = (t.reshape(-1) for t in torch.broadcast_tensors(a, b))
        valid = (a >= 0) & (b >= 0)
        if valid.any():
            pairs = torch.unique(a[valid] * len(self.parent) + b[valid])
            self.union(pairs // len(self.parent), pairs % len(self.parent))

    def mark(self, ids: Tensor, reason: str) -> None:
        ids = _compact(ids)
        ids = ids[ids >= 0].unique()
        if ids.numel():
            self.marks.append((ids, reason))

    def atomic(self, ids: Tensor, dim: int) -> bool:
        """Whether the entries along `dim` already belong to one atom for every other index."""
        return _constant(self.roots(_compact(ids)), dim)

    def join_along(self, ids: Tensor, dim: int) -> None:
        """Make the entries along `dim` one atom for every other index (a head from its head_dim entries)."""
        rows = ids.movedim(dim, -1).reshape(-1, ids.shape[dim])
        self.pair(rows[:, :1].expand_as(rows), rows)
        self.head_ids.append(rows[:, 0][rows[:, 0] >= 0].unique())

    # --- values -----------------------------------------------------------------------------------------
    def value(self, ids: IdsValue, real: Any) -> Tensor | None:
        """Ids of an activation; a parameter used as one carries ids on its channel-like dimension."""
        if isinstance(ids, Tensor):
            return ids
        if isinstance(ids, _Ref) and ids.parameter and isinstance(real, Tensor) and real.dim():
            wide = [dim for dim, size in enumerate(real.shape) if size > 1]
            dim = wide[0] if len(wide) == 1 else real.dim() - 1
            return _along(self.space(ids.name, dim, real.shape[dim]), dim, real.shape)
        return None  # untracked, or a buffer used as data (rotary frequencies, position ids)

    def consume(self, ids: Tensor | None, dim: int, space: Tensor, node: Node) -> None:
        """A layer reads channel dimension `dim` of its input through its own input dimension `space`."""
        reason = self.untracked_input(node)
        if ids is None:
            self.mark(space, reason)
            return
        ids = ids.movedim(dim, -1)
        self.pair(ids, space)
        missing = (ids.reshape(-1, ids.shape[-1]) < 0).any(0)
        self.mark(space[missing], reason)

    def untracked_input(self, node: Node) -> str:
        if any(source in self.user_inputs for source in node.all_input_nodes):
            return f"input of {_module_of(node)} is the model input"
        return f"input of {_module_of(node)} has no channel ids (see the other reasons)"

    def keep_along(self, ids: Tensor | None, dim: int, node: Node) -> Tensor | None:
        """Ids of a contraction's kept dims: None when `ids` only vary along the contracted `dim`."""
        if ids is None or _constant(ids, dim) or self.atomic(ids, dim):
            return None if ids is None else ids.narrow(dim, 0, 1)
        if all(_constant(ids, other) for other in range(ids.dim()) if other != dim % ids.dim()):
            return None
        self.mark(ids, f"mixed across channels by a matmul in {_module_of(node)}")
        return None

    def combine(self, parts: list[Tensor | None], shape: torch.Size | tuple[int, ...]) -> Tensor | None:
        tracked = [torch.broadcast_to(part, shape).contiguous() for part in parts if part is not None]
        if not tracked:
            return None
        result = tracked[0]
        for other in tracked[1:]:
            self.pair(result, other)
            result = torch.where(result < 0, other, result)
        return result

    def matmul(self, a: Tensor | None, b: Tensor | None, ka: Tensor | None, kb: Tensor | None,
               shape: torch.Size | tuple[int, ...], node: Node) -> Tensor | None:  # fmt: skip
        """[..., n, k] @ [..., k, m]: a's and b's contraction ids pair up; the kept ids go to the output."""
        a_varies = a is not None and not _constant(a, -1)
        b_varies = b is not None and not _constant(b, -2)
        if a_varies and b_varies:
            self.pair(a.unsqueeze(-1), b.unsqueeze(-3))  # type: ignore[union-attr]
        elif a_varies or b_varies:
            varying = a if a_varies else b
            self.mark(varying, f"contracted with an untracked dimension in {_module_of(node)}")  # type: ignore[arg-type]
        return self.combine([self.keep_along(ka, -1, node), self.keep_along(kb, -2, node)], shape)

    # --- rules ------------------------------------------------------------------------------------------

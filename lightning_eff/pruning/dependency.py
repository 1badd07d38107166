"""Which channels must be pruned together, found from the model's own computation graph (a small DepGraph).

Removing channel c of a layer is exact only if every tensor entry that meets c goes too: the producer's row and
bias entry, the BatchNorm entries that normalize it, every consumer's input column, every other producer whose
output is added to it (a residual stream), the concatenation offset it lands at, the depthwise filter that reads
it, and, for attention, the whole head with its q, k and v rows and output-projection columns. Names and module
types cannot tell these couplings (a residual add or a `split` is invisible to them); the graph can.

Tracing: `torch.export.export(model, (), example_kwargs, strict=False)`, for plain PyTorch and Hugging Face models
alike. transformers 5 has no `transformers.utils.fx`; torch.fx's `symbolic_trace` stops at data-dependent Python
(HF mask code, `nn.TransformerEncoder`'s fast-path checks); forward hooks see modules but not the functional glue
(adds, splits, views) where channels couple. Export gives one ATen graph with a small op vocabulary whose
parameters are placeholders named by their qualified names, so parameter identity, tied weights included, is exact.

Propagation: the graph is run once on the example inputs, carrying next to each real tensor an int64 tensor of
the same shape that holds the *channel id* of every element (-1: none). Ids are allocated per (parameter or
buffer, dimension) when an op first gives that dimension a meaning: a Linear's output rows, a Conv's input
columns. Data-movement ops (view, permute, slice, split, cat, index...) are applied to the ids themselves;
elementwise ops union the ids of their operands element by element (residual adds, gated MLPs); a few ops have
their own rule (linear, HF Conv1D's addmm, conv incl. grouped/depthwise, batch/layer/RMS norm, embedding,
matmul, scaled_dot_product_attention, reductions, pooling). Union-find over the ids gives *atoms*: the smallest
sets of entries that must go together. A reshape that splits one channel dimension into several (hidden ->
heads x head_dim) joins its innermost split dimension into one atom per outer index, because the model's own
`view(..., -1, head_dim)` only survives whole heads being removed; q.k^T then pairs q and k heads, attn @ v the
value heads, and a GQA expand (repeat_kv) or SDPA's enable_gqa ties each kv head to its query heads.

An atom is unprunable when an op mixes its entries with other channels (Layer/RMS norm statistics, any reduction
over channels: the normalizer changes when a channel goes), when it reaches the model's output or comes from its
input, when it is an embedding's width, or when it meets an op without a rule here (listed, never guessed).
Atoms that touch the same (tensor, dimension) set form a `ChannelGroup`; unprunable ones land in
`Analysis.skipped` with the reasons. By default each group is then checked for real: one unit pruned, the masked
and the physically shrunk model must agree on the example inputs (`structured_shrink.verify_groups`), which
catches forwards that recompute shapes their own way (a head size read from the input width).
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx.node import Node, map_aggregate, map_arg

aten = torch.ops.aten
IdsValue = Any  # Tensor of ids, _Ref, None, or a list/tuple of those


class TraceError(RuntimeError):
    """The model cannot be turned into a graph (data-dependent control flow, unsupported inputs)."""


@dataclass(frozen=True, eq=False)
class Member:
    """One coupled dimension: entries `index[u]` along `dim` of tensor `name` belong to unit u of the group.

    `index` is [units, entries per unit]; `extent` is the dimension's size, so `segment` shows a packed layer's
    slice (a concatenation offset) when the group covers only part of the dimension.
    """

    name: str
    dim: int
    index: Tensor
    extent: int

    @property
    def segment(self) -> tuple[int, int] | None:
        low, high = int(self.index.min()), int(self.index.max()) + 1
        return None if (low, high) == (0, self.extent) else (low, high)

    def __repr__(self) -> str:
        where = "" if self.segment is None else f"[{self.segment[0]}:{self.segment[1]}]"
        return f"{self.name}:{self.dim}{where}"


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Coupled channel dimensions that are pruned together, unit by unit (a channel, or a head for attention).

    For GQA a unit is one kv head with its query heads; for a grouped conv one group of channels.
    """

    name: str
    kind: str  # "channels" or "heads"
    members: tuple[Member, ...]

    @property
    def size(self) -> int:
        return int(self.members[0].index.shape[0])

    def member(self, name: str, dim: int) -> Member:
        for member in self.members:
            if (member.name, member.dim) == (name, dim):
                return member
        raise KeyError(f"{name}:{dim} is not a member of group {self.name}")

    def dimensions(self) -> set[tuple[str, int]]:
        """Every coupled (tensor name, dimension)."""
        return {(member.name, member.dim) for member in self.members}

    def __repr__(self) -> str:
        return f"ChannelGroup({self.name}, {self.size} {self.kind}: {', '.join(map(repr, self.members))})"


@dataclass(frozen=True)
class Skipped:
    """A group that is not pruned, and why."""

    group: ChannelGroup
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Analysis:
    """`groups` can be pruned; `skipped` cannot, with reasons; `example_kwargs` are the inputs traced with."""

    groups: list[ChannelGroup]
    skipped: list[Skipped]
    example_kwargs: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class _Ref:
    """A parameter or buffer placeholder: its dimensions get ids only when an op says what they mean."""

    name: str
    parameter: bool


_IDENTITY = {aten.alias.default, aten.detach.default, aten.clone.default, aten.contiguous.default,
             aten.lift_fresh_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
             aten.to.other, aten._to_copy.default, aten.dropout.default, aten.type_as.default,
             aten.feature_dropout.default}  # fmt: skip
_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
             aten.unflatten.int}  # fmt: skip
_MOVES = _RESHAPES | {
    aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.slice.Tensor, aten.select.int,
    aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int, aten.narrow.default,
    aten.repeat.default, aten.repeat_interleave.self_int, aten.index_select.default, aten.index.Tensor,
    aten.gather.default, aten.flip.default, aten.roll.default, aten.movedim.int, aten.cat.default,
    aten.stack.default, aten.pixel_shuffle.default, aten.pixel_unshuffle.default,
}  # fmt: skip
_EXTRA_POINTWISE = {aten.hardswish.default, aten.__and__.Tensor, aten.__or__.Tensor, aten.bitwise_and.Tensor,
                    aten.bitwise_or.Tensor}  # fmt: skip
_MATMULS = {aten.mm.default, aten.bmm.default, aten.matmul.default}
_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
          aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default}  # fmt: skip
_BATCH_NORMS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
                aten.native_batch_norm.default}  # fmt: skip
_NORMS = {aten.layer_norm.default: "LayerNorm", aten.native_layer_norm.default: "LayerNorm",
          aten.rms_norm.default: "RMSNorm", aten.group_norm.default: "GroupNorm",
          aten.native_group_norm.default: "GroupNorm"}  # fmt: skip
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction,
               aten.var.dim, aten.std.correction, aten.std.dim, aten.logsumexp.default, aten.linalg_vector_norm.default,
               aten.prod.dim_int, aten.max.dim, aten.min.dim, aten.argmax.default, aten.argmin.default}  # fmt: skip
_SAME_SHAPE_REDUCTIONS = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
                          aten.cumsum.default, aten.cumprod.default}  # fmt: skip
# Ops that act on each channel's spatial extent alone, keyed to the number of trailing spatial dimensions.
_SPATIAL = {aten.adaptive_avg_pool1d.default: 1, aten.adaptive_avg_pool2d.default: 2,
            aten._adaptive_avg_pool2d.default: 2, aten.adaptive_avg_pool3d.default: 3,
            aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3,
            aten.max_pool1d.default: 1, aten.max_pool2d.default: 2, aten.max_pool3d.default: 3,
            aten.max_pool2d_with_indices.default: 2, aten.upsample_nearest2d.vec: 2,
            aten.upsample_bilinear2d.vec: 2, aten.upsample_nearest2d.default: 2}  # fmt: skip


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


class _Tracer:
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
    def rule(self, node: Node, args: tuple, kwargs: dict, ids: tuple, kw_ids: dict, out: Any) -> IdsValue:
        """The ids of `node`'s output, from the real `args`/`kwargs` and their ids `ids`/`kw_ids`."""
        target = node.target
        if target is operator.getitem:
            return ids[0][args[1]] if isinstance(ids[0], (list, tuple)) else None
        tracked = [i for i in _flat(list(ids) + list(kw_ids.values())) if i is not None]
        if out is None:  # checks such as aten._assert_tensor_metadata
            return None
        if not tracked or not isinstance(target, torch._ops.OpOverload):
            return self.unsupported(node, args, ids) if tracked else None
        if target in _IDENTITY:
            return ids[0]
        if target in _MOVES:
            return self.move(node, args, kwargs, ids)
        if target is aten.linear.default:
            return self.linear(node, args, ids, out)
        if target is aten.addmm.default and isinstance(ids[2], _Ref):
            return self.linear(node, (args[1], args[2].t(), args[0]), (ids[1], ("T", ids[2]), ids[0]), out)
        if target in _MATMULS or target in (aten.addmm.default, aten.baddbmm.default):
            return self.matmul_op(node, args, ids, out)
        if target in _CONVS:
            return self.conv(node, _bind(target, args, kwargs), _bind(target, ids, kw_ids), out)
        if target in _BATCH_NORMS:
            return self.batch_norm(args, ids, out, node)
        if target in _NORMS:
            return self.norm(node, args, ids, out)
        if target is aten.embedding.default and isinstance(ids[0], _Ref):
            width = self.space(ids[0].name, 1, args[0].shape[1])
            self.mark(width, f"embedding width of {_module_of(node)} (token representation)")
            return _along(width, -1, out.shape)
        if target is aten.scaled_dot_product_attention.default:
            return self.attention(node, _bind(target, args, kwargs), _bind(target, ids, kw_ids), out)
        if target in _REDUCTIONS or target in _SAME_SHAPE_REDUCTIONS:
            return self.reduction(node, _bind(target, args, kwargs), ids, out)
        if target in _SPATIAL or target is aten.constant_pad_nd.default:
            return self.spatial(node, args, ids, out)
        if torch.Tag.pointwise in target.tags or target in _EXTRA_POINTWISE:
            return self.pointwise(node, args, ids, out)
        return self.unsupported(node, args, ids)

    def unsupported(self, node: Node, args: tuple, ids: tuple) -> IdsValue:
        reason = f"passes through {node.target} in {_module_of(node)}, which has no channel rule here"
        for real, value in zip(_flat(list(args)), _flat(list(ids)), strict=False):
            if (tracked := self.value(value, real)) is not None:
                self.mark(tracked, reason)
        return None

    def move(self, node: Node, args: tuple, kwargs: dict, ids: tuple) -> IdsValue:
        rest, kw = torch.utils._pytree.tree_map(lambda x: x.cpu() if isinstance(x, Tensor) else x, (args[1:], kwargs))
        if node.target in (aten.cat.default, aten.stack.default):
            first: Any = [
                self.value(i, t) if self.value(i, t) is not None else torch.full(t.shape, -1, dtype=torch.long)
                for t, i in zip(args[0], ids[0], strict=True)
            ]
        else:
            first = self.value(ids[0], args[0])
            if first is None or any(isinstance(i, (Tensor, _Ref)) for i in _flat(list(ids[1:]))):
                return self.unsupported(node, args, ids)
        result = node.target(first, *rest, **kw)  # type: ignore[operator]
        if node.target in _RESHAPES:
            self.split_heads(first, result)
        return [r.contiguous() for r in result] if isinstance(result, (list, tuple)) else result.contiguous()

    def split_heads(self, before: Tensor, after: Tensor) -> None:
        """A reshape that spreads one varying dimension over several: join the innermost (see docstring)."""

        def spans(shape: torch.Size) -> list[tuple[int, int]]:
            strides = [1] * len(shape)
            for dim in range(len(shape) - 2, -1, -1):
                strides[dim] = strides[dim + 1] * shape[dim + 1]
            return [(stride, stride * size) for stride, size in zip(strides, shape, strict=True)]

        out_spans = spans(after.shape)
        varying = [dim for dim in range(after.dim()) if not _constant(after, dim)]
        for dim, (low, high) in enumerate(spans(before.shape)):
            if _constant(before, dim):
                continue
            parts = [k for k in varying if out_spans[k][0] < high and low < out_spans[k][1]]
            if len(parts) > 1:
                self.join_along(after, parts[-1])

    def linear(self, node: Node, args: tuple, ids: tuple, out: Tensor) -> Tensor:
        """y = x W^T + b; HF Conv1D's addmm arrives here with its [in, out] weight marked ("T", ref)."""
        transposed = isinstance(ids[1], tuple)
        weight = ids[1][1] if transposed else ids[1]
        if not isinstance(weight, _Ref):
            return self.unsupported(node, args, ids)
        rows, cols = args[1].shape
        produced = self.space(weight.name, 1 if transposed else 0, rows)
        self.consume(self.value(ids[0], args[0]), -1, self.space(weight.name, 0 if transposed else 1, cols), node)
        if len(ids) > 2 and isinstance(ids[2], _Ref):
            self.pair(self.space(ids[2].name, 0, rows), produced)
        return _along(produced, -1, out.shape)

    def matmul_op(self, node: Node, args: tuple, ids: tuple, out: Tensor) -> Tensor | None:
        bias = None
        if node.target in (aten.addmm.default, aten.baddbmm.default):
            bias, args, ids = self.value(ids[0], args[0]), args[1:3], ids[1:3]
        a_real, b_real = args[0], args[1]
        if a_real.dim() < 2 or b_real.dim() < 2:
            return self.unsupported(node, args, ids)
        a, b = self.value(ids[0], a_real), self.value(ids[1], b_real)
        ka, kb = a, b
        if isinstance(ids[0], _Ref) and a_real.dim() == 2:
            a = _along(self.space(ids[0].name, 1, a_real.shape[1]), 1, a_real.shape)
            ka = _along(self.space(ids[0].name, 0, a_real.shape[0]), 0, a_real.shape)
        if isinstance(ids[1], _Ref) and b_real.dim() == 2:
            b = _along(self.space(ids[1].name, 0, b_real.shape[0]), 0, b_real.shape)
            kb = _along(self.space(ids[1].name, 1, b_real.shape[1]), 1, b_real.shape)
        result = self.matmul(a, b, ka, kb, out.shape, node)
        return self.combine([result, bias], out.shape)

    def conv(self, node: Node, bound: dict, bound_ids: dict, out: Tensor) -> Tensor | None:
        x, weight = bound["input"], bound["weight"]
        ids = (bound_ids["input"], bound_ids["weight"], bound_ids.get("bias"))
        if not isinstance(ids[1], _Ref) or bound.get("transposed", False):
            return self.unsupported(node, (x, weight), ids[:2])
        name, groups = ids[1].name, int(bound["groups"])
        channel = x.dim() - weight.dim() + 1
        produced = self.space(name, 0, weight.shape[0])
        x_ids = self.value(ids[0], x)
        if groups == 1:
            self.consume(x_ids, channel, self.space(name, 1, weight.shape[1]), node)
        elif x_ids is None:
            self.mark(produced, self.untracked_input(node))
        else:  # grouped/depthwise: a group's output channels read only that group's input channels
            per_group = x_ids.movedim(channel, -1).reshape(-1, groups, weight.shape[1])
            outputs = produced.reshape(1, groups, -1).expand(per_group.shape[0], -1, -1)
            rows = torch.cat([per_group, outputs], dim=-1)
            self.pair(rows[..., :1].expand_as(rows), rows)
            missing = (per_group < 0).any(-1).any(0)
            self.mark(produced.reshape(groups, -1)[missing], self.untracked_input(node))
        bias = ids[2]
        if isinstance(bias, _Ref):
            self.pair(self.space(bias.name, 0, weight.shape[0]), produced)
        return _along(produced, channel, out.shape)

    def batch_norm(self, args: tuple, ids: tuple, out: Any, node: Node) -> IdsValue:
        x = args[0]
        refs = [ref for ref in ids[1:5] if isinstance(ref, _Ref)]
        x_ids = self.value(ids[0], x)
        if refs:
            own = self.space(refs[0].name, 0, x.shape[1])
            for ref in refs[1:]:
                self.pair(self.space(ref.name, 0, x.shape[1]), own)
            self.consume(x_ids, 1, own, node)
            x_ids = _along(own, 1, x.shape)
        return [x_ids, None, None] if isinstance(out, (list, tuple)) else x_ids

    def norm(self, node: Node, args: tuple, ids: tuple, out: Any) -> IdsValue:
        kind = _NORMS[node.target]  # type: ignore[index]
        x = args[0]
        x_ids = self.value(ids[0], x)
        channel = 1 if kind == "GroupNorm" else -1
        reason = f"normalized by the {kind} {_module_of(node)}: its statistics mix the channels"
        params = [i for i in ids[1:] if isinstance(i, _Ref)]
        for ref in params:
            own = self.space(ref.name, 0, x.shape[channel])
            self.mark(own, reason)
            x_ids = self.combine([x_ids, _along(own, channel, x.shape)], x.shape)
        if x_ids is not None:
            self.mark(x_ids, reason)
        return [x_ids, None, None] if isinstance(out, (list, tuple)) else x_ids

    def attention(self, node: Node, bound: dict, bound_ids: dict, out: Tensor) -> Tensor | None:
        q_real, k_real = bound["query"], bound["key"]
        q, k, v = (self.value(bound_ids[n], bound[n]) for n in ("query", "key", "value"))
        if bound.get("enable_gqa") and q_real.shape[-3] != k_real.shape[-3]:
            repeat = q_real.shape[-3] // k_real.shape[-3]
            k, v = (None if t is None else t.repeat_interleave(repeat, dim=-3) for t in (k, v))
        if q is not None and bound.get("scale") is None and not self.atomic(q, -1):
            self.mark(q, f"the attention scale in {_module_of(node)} depends on the head width")
        scores_shape = (*q_real.shape[:-1], k_real.shape[-2])
        kt = None if k is None else k.transpose(-2, -1)
        scores = self.matmul(q, kt, q, kt, scores_shape, node)
        mask = bound.get("attn_mask")
        if scores is not None and isinstance(mask, Tensor):
            self.check_broadcast(scores, mask, node)
        return self.matmul(scores, v, scores, v, out.shape, node)

    def reduction(self, node: Node, bound: dict, ids: tuple, out: Any) -> IdsValue:
        x_ids = self.value(ids[0], bound["self"])
        if x_ids is None:
            return None
        dims = bound.get("dim")
        dims = list(range(x_ids.dim())) if dims is None or dims == [] else [dims] if isinstance(dims, int) else dims
        dims = sorted(d % max(x_ids.dim(), 1) for d in dims)
        if any(not _constant(x_ids, d) and not self.atomic(x_ids, d) for d in dims):
            self.mark(x_ids, f"mixed across channels by {node.target} in {_module_of(node, with_type=True)}")
            return None
        if node.target in _SAME_SHAPE_REDUCTIONS:
            return x_ids
        for dim in reversed(dims):
            x_ids = x_ids.narrow(dim, 0, 1) if bound.get("keepdim") else x_ids.select(dim, 0)
        x_ids = x_ids.contiguous()
        return [x_ids, None] if isinstance(out, (list, tuple)) else x_ids

    def spatial(self, node: Node, args: tuple, ids: tuple, out: Any) -> IdsValue:
        x_ids = self.value(ids[0], args[0])
        if x_ids is None:
            return None
        count = len(args[1]) // 2 if node.target is aten.constant_pad_nd.default else _SPATIAL[node.target]  # type: ignore[index]
        dims = range(x_ids.dim() - count, x_ids.dim())
        if not all(_constant(x_ids, d) for d in dims):
            return self.unsupported(node, args, ids)
        for dim in dims:
            x_ids = x_ids.narrow(dim, 0, 1)
        shape = out[0].shape if isinstance(out, (list, tuple)) else out.shape
        result = x_ids.expand(shape).contiguous()
        return [result, None] if isinstance(out, (list, tuple)) else result

    def pointwise(self, node: Node, args: tuple, ids: tuple, out: Tensor) -> Tensor | None:
        reals, values = _flat(list(args)), _flat(list(ids))
        tracked = [self.value(i, r) for r, i in zip(reals, values, strict=False)]
        result = self.combine([t for t in tracked if t is not None], out.shape)
        for real, ids_of in zip(reals, tracked, strict=False):
            if result is not None and ids_of is None and isinstance(real, Tensor) and real.numel() > 1:
                self.check_broadcast(result, real, node)
        return result

    def check_broadcast(self, ids: Tensor, other: Tensor, node: Node) -> None:
        """An untracked operand that varies along a channel dimension would need slicing too: unprunable."""
        other = other.reshape((1,) * (ids.dim() - other.dim()) + other.shape)
        for dim in range(ids.dim()):
            if other.shape[dim] > 1 and not _constant(other, dim) and not self.atomic(ids, dim):
                self.mark(ids, f"combined by {node.target} in {_module_of(node)} with a computed tensor that "
                               "varies along the channels")  # fmt: skip
                return

    # --- driver -----------------------------------------------------------------------------------------
    @staticmethod
    def _ids_of(arg: Any, ids: dict[Node, IdsValue]) -> IdsValue:
        return ids.get(arg) if isinstance(arg, Node) else None

    def run(self, program: torch.export.ExportedProgram, user_inputs: list[Any]) -> None:
        from torch.export.graph_signature import InputKind

        graph = program.graph_module.graph
        specs = {spec.arg.name: spec for spec in program.graph_signature.input_specs if hasattr(spec.arg, "name")}
        last_use: dict[Node, Node] = {}
        for node in graph.nodes:
            for used in node.all_input_nodes:
                last_use[used] = node
        real: dict[Node, Any] = {}
        ids: dict[Node, IdsValue] = {}
        inputs = iter(user_inputs)
        for node in graph.nodes:
            if node.op == "placeholder":
                spec = specs[node.name]
                if spec.kind == InputKind.USER_INPUT:
                    real[node], ids[node] = next(inputs), None
                    self.user_inputs.add(node)
                elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target in program.state_dict:
                    real[node] = program.state_dict[spec.target]
                    ids[node] = _Ref(self.canonical.get(spec.target, spec.target), spec.kind == InputKind.PARAMETER)
                elif spec.target in program.constants:
                    real[node] = program.constants[spec.target]
                    is_buffer = spec.kind == InputKind.BUFFER
                    ids[node] = _Ref(self.canonical.get(spec.target, spec.target), False) if is_buffer else None
                else:
                    raise TraceError(f"unsupported graph input {node.name} ({spec.kind.name})")
            elif node.op == "call_function":
                args, kwargs = map_arg((node.args, node.kwargs), lambda n: real[n])
                node_ids, kw_ids = map_aggregate((node.args, node.kwargs), lambda a: self._ids_of(a, ids))
                real[node] = node.target(*args, **kwargs)
                ids[node] = self.rule(node, args, kwargs, node_ids, kw_ids, real[node])
            elif node.op == "output":
                for value, leaf in zip(_flat(map_aggregate(node.args, lambda a: self._ids_of(a, ids))),
                                       _flat(map_arg(node.args, lambda n: real[n])), strict=True):  # fmt: skip
                    if (tracked := self.value(value, leaf)) is not None:
                        self.mark(tracked, "reaches the model output")
            else:
                raise TraceError(f"unsupported graph node {node.op} {node.target}")
            for used in node.all_input_nodes:
                if last_use.get(used) is node:
                    real.pop(used, None)
                    ids.pop(used, None)

    def atoms(self, shapes: Mapping[str, torch.Size]) -> tuple[list[ChannelGroup], dict[str, list[str]]]:
        """Atoms grouped by the (tensor, dimension) set they touch; reasons per unprunable group name."""
        keys = list(self.spaces)
        if not keys:
            return [], {}
        entry_ids = torch.cat([torch.arange(b, b + s) for b, s in self.spaces.values()])
        space_of = torch.cat([torch.full((s,), i) for i, (_, s) in enumerate(self.spaces.values())])
        position = torch.cat([torch.arange(s) for _, s in self.spaces.values()])
        root = self.find(entry_ids)
        order = torch.argsort((root * len(keys) + space_of) * (int(position.max()) + 1) + position)
        root, space_of, position = root[order], space_of[order], position[order]
        cells, counts = torch.unique_consecutive(root * len(keys) + space_of, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        signature: dict[int, list[tuple[int, int, int]]] = {}
        for cell, count, start in zip(cells.tolist(), counts.tolist(), starts.tolist(), strict=True):
            signature.setdefault(cell // len(keys), []).append((cell % len(keys), count, start))
        by_signature: dict[tuple[tuple[int, int], ...], list[int]] = {}
        for atom, cells_of in signature.items():
            by_signature.setdefault(tuple((s, c) for s, c, _ in cells_of), []).append(atom)
        reasons: dict[int, list[str]] = {}
        for marked, reason in self.marks:
            for atom in self.find(marked).unique().tolist():
                if reason not in reasons.setdefault(atom, []):
                    reasons[atom].append(reason)
        heads = set(self.find(torch.cat(self.head_ids)).tolist()) if self.head_ids else set()
        groups, why = [], {}
        for sig, atoms_of in by_signature.items():
            first = torch.tensor([signature[a][0][2] for a in atoms_of])
            atoms_of = [atoms_of[i] for i in torch.argsort(position[first]).tolist()]
            members = []
            for slot, (space, count) in enumerate(sig):
                begin = torch.tensor([signature[a][slot][2] for a in atoms_of])
                index = position[begin[:, None] + torch.arange(count)]
                name, dim = keys[space]
                members.append(Member(name, dim, index, shapes[name][dim]))
            kind = "heads" if any(a in heads for a in atoms_of) else "channels"
            name = repr(members[0])
            while name in why:
                name += "'"
            group = ChannelGroup(name, kind, tuple(members))
            groups.append(group)
            why[group.name] = [r for a in atoms_of for r in reasons.get(a, [])]
            why[group.name] = list(dict.fromkeys(why[group.name]))
        return groups, why


def _example_inputs(model: nn.Module, example_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The kwargs to trace with: Hugging Face caches are turned off (a returned kv cache is a model output)."""
    kwargs = dict(example_kwargs)
    if "use_cache" in inspect.signature(model.forward).parameters and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def analyze(model: nn.Module, example_kwargs: Mapping[str, Any], verify: bool = True) -> Analysis:
    """Every channel group of `model`, prunable or skipped with reasons, traced on `example_kwargs`.

    The model is traced in eval mode and left in the mode it came in. With `verify`, each group is also pruned
    by one unit for real (masked vs shrunk outputs on the example inputs must agree); groups that fail are
    skipped with the error. Keep the example batch small: ids are tensors the size of each activation.
    """
    kwargs = _example_inputs(model, example_kwargs)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        try:
            program = torch.export.export(model, (), kwargs, strict=False)
        except Exception as error:
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise TraceError(f"cannot trace {type(model).__name__} with torch.export: {detail}") from error
        first_name: dict[int, str] = {}
        canonical = {}
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        for name, tensor in named:
            canonical[name] = first_name.setdefault(id(tensor), name)
        tracer = _Tracer(canonical)
        leaves = torch.utils._pytree.tree_leaves(((), kwargs))
        if len(leaves) != len(program.graph_signature.user_inputs):
            raise TraceError(f"cannot match the {len(leaves)} example inputs of {type(model).__name__} to its graph")
        with torch.no_grad():
            tracer.run(program, leaves)
        shapes = {name: tensor.shape for name, tensor in named}
        found, reasons = tracer.atoms(shapes)
        from lightning_eff.pruning.structured_shrink import shrink_refusals, verify_groups

        groups, skipped = [], []
        for group in found:
            why = reasons[group.name] + shrink_refusals(model, group)
            if group.size < 2 and not why:
                why = [f"a single {group.kind[:-1]}: nothing to prune once one is kept"]
            if why:
                skipped.append(Skipped(group, tuple(why)))
            else:
                groups.append(group)
        if verify and groups:
            failures = verify_groups(model, groups, kwargs)
            skipped += [Skipped(g, (failures[g.name],)) for g in groups if g.name in failures]
            groups = [g for g in groups if g.name not in failures]
        return Analysis(groups, skipped, kwargs)
    finally:
        for module, training in modes.items():
            module.training = training


def channel_groups(model: nn.Module, example_kwargs: Mapping[str, Any], verify: bool = True) -> list[ChannelGroup]:
    """The prunable channel groups of `model` (see `analyze` for the skipped ones and why)."""
    return analyze(model, example_kwargs, verify).groups

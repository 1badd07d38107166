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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.pruning.channel_trace import TraceError, _Tracer

__all__ = ["Analysis", "ChannelGroup", "Member", "Skipped", "TraceError", "analyze", "channel_groups"]


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


def _atoms(self: _Tracer, shapes: Mapping[str, torch.Size]) -> tuple[list[ChannelGroup], dict[str, list[str]]]:
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
        found, reasons = _atoms(tracer, shapes)
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

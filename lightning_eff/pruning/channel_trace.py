"""The op rules: how each ATen op of an exported graph moves, pairs or marks channel ids (see `dependency`)."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor
from torch.fx.node import Node, map_aggregate, map_arg

from lightning_eff.pruning.channel_ids import (
    ChannelIds,
    IdsValue,
    _along,
    _bind,
    _constant,
    _flat,
    _module_of,
    _Ref,
)

aten = torch.ops.aten


class TraceError(RuntimeError):
    """The model cannot be turned into a graph (data-dependent control flow, unsupported inputs)."""


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


class _Tracer(ChannelIds):
    """Runs an exported graph on real inputs while propagating channel ids (see `dependency`)."""

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

"""Masks from scores, and applying them: the functional core of GradualPruning.

A mask here marks what is *pruned* (True = zero), has the parameter's shape or broadcasts to it (a
channel mask is [out, 1, ...], or [1, out] for a weight stored [in, out]: see `compute_masks`), and is
applied in place by multiplying with its complement: no forward hooks and no `weight_orig`, so a pruned
model's state_dict loads strictly into the plain model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping

import torch

from lightning_eff.pruning.scoring import channel_norms, magnitude, nm_group_cost

GRANULARITIES = ("unstructured", "channels", "n:m")
SCOPES = ("global", "layer")
Masks = dict[str, torch.Tensor]


def parse_pattern(pattern: str) -> tuple[int, int]:
    """`"2:4"` -> (2, 4): at least N zeros in every M consecutive weights along the input dimension."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if match is None:
        raise ValueError(f"pattern={pattern!r}: must look like N:M, e.g. 2:4")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern={pattern!r}: need 0 < N < M")
    return n, m


def _split(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut a flat tensor back into pieces shaped like the tensors of `like`, in order."""
    pieces, offset = {}, 0
    for name, tensor in like.items():
        pieces[name] = flat[offset : offset + tensor.numel()].reshape(tensor.shape)
        offset += tensor.numel()
    return pieces


def _lowest(scores: Mapping[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """Boolean masks of the `count` lowest scores over all tensors together (an exact count)."""
    flat = torch.cat([score.reshape(-1).float() for score in scores.values()])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    if count > 0:
        chosen[flat.topk(min(count, flat.numel()), largest=False, sorted=False).indices] = True
    return _split(chosen, scores)


Groups = list[tuple[list[str], int]]
"""Tensors ranked together, and how many of their lowest scores to choose: one group (global) or one per tensor."""


class Selector:
    """Counts and picks the lowest scores over whole tensors.

    This one sees whole tensors; `sharded_select.ShardedSelector` sees each rank's shard and makes the same
    choices with collectives, so the mask functions below run unchanged on FSDP2 shards.
    """

    def numel(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
        return {name: tensor.numel() for name, tensor in tensors.items()}

    def count(self, masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
        return {name: int(mask.sum()) for name, mask in masks.items()}

    def lowest(self, scores: Mapping[str, torch.Tensor], groups: Groups) -> dict[str, torch.Tensor]:
        chosen: dict[str, torch.Tensor] = {}
        for names, count in groups:
            chosen.update(_lowest({name: scores[name] for name in names}, count))
        return chosen


LOCAL = Selector()


def _by_scope(
    scores: Mapping[str, torch.Tensor], fraction: float, scope: str, selector: Selector = LOCAL
) -> dict[str, torch.Tensor]:
    """The lowest `fraction` of the scores: over all tensors at once (global) or of each tensor (layer)."""
    sizes = selector.numel(scores)
    return selector.lowest(scores, _groups(sizes, fraction, scope))


def _groups(sizes: Mapping[str, int], fraction: float, scope: str) -> Groups:
    if scope == "global":
        return [(list(sizes), round(fraction * sum(sizes.values())))]
    return [([name], round(fraction * size)) for name, size in sizes.items()]


class Magnitudes(Mapping[str, torch.Tensor]):
    """|w| of each weight, computed when read: ranking never holds a float copy of every weight at once."""

    def __init__(self, weights: Mapping[str, torch.Tensor]) -> None:
        self.weights = weights

    def __getitem__(self, name: str) -> torch.Tensor:
        return magnitude(self.weights[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)


def unstructured_masks(
    weights: Mapping[str, torch.Tensor], sparsity: float, scope: str, selector: Selector = LOCAL
) -> Masks:
    """Zero the smallest-magnitude weights, one threshold for all tensors (global) or per tensor (layer)."""
    return _by_scope(Magnitudes(weights), sparsity, scope, selector)


def channel_masks(weights: Mapping[str, torch.Tensor], sparsity: float, scope: str) -> Masks:
    """Zero whole output rows/filters with the lowest RMS; masks have shape [out, 1, ...].

    Every layer keeps its strongest channel, so the network stays connected.

    Global scope ranks rows of all layers together and stops at the row that brings the pruned share of
    weights closest to `sparsity` (rows of different layers hold different numbers of weights).
    """
    rows = {name: channel_norms(weight) for name, weight in weights.items()}
    for score in rows.values():
        score[score.argmax()] = float("inf")
    if scope == "layer":
        chosen = {
            name: _lowest({name: score}, min(round(sparsity * score.numel()), score.numel() - 1))[name]
            for name, score in rows.items()
        }
    else:
        sizes = torch.cat([torch.full((w.shape[0],), w[0].numel(), dtype=torch.float64) for w in weights.values()])
        scores = torch.cat(list(rows.values()))
        order = scores.argsort(stable=True)
        pruned_after = torch.cat([torch.zeros(1, dtype=torch.float64), sizes[order].cumsum(0)])
        prunable = int(torch.isfinite(scores).sum())
        count = int((pruned_after[: prunable + 1] - sparsity * float(sizes.sum())).abs().argmin())
        flat = torch.zeros(len(order), dtype=torch.bool)
        flat[order[:count]] = True
        chosen = _split(flat, rows)
    return {name: chosen[name].reshape(-1, *([1] * (weights[name].dim() - 1))) for name in weights}


def nm_masks(
    weights: Mapping[str, torch.Tensor], sparsity: float, n: int, m: int, scope: str, selector: Selector = LOCAL
) -> Masks:
    """N:M masks reached gradually.

    Up to sparsity N/M, the groups of M that cost least to make N:M become N:M (their N smallest weights
    zeroed), the rest stay dense. Beyond N/M every group is N:M and further weights are pruned by magnitude.
    """
    base = n / m
    costs = {name: nm_group_cost(weight, n, m) for name, weight in weights.items()}
    groups_chosen = _by_scope(costs, min(sparsity / base, 1.0), scope, selector)
    masks: Masks = {}
    for name, weight in weights.items():
        grouped = weight.detach().abs().reshape(weight.shape[0], math.prod(weight.shape[1:]) // m, m)
        smallest = grouped.topk(n, dim=2, largest=False).indices
        in_group = torch.zeros_like(grouped, dtype=torch.bool).scatter_(2, smallest, True)
        masks[name] = (in_group & groups_chosen[name].unsqueeze(2)).reshape(weight.shape)
    if sparsity > base:
        # Already-pruned weights rank last, so the extra share lands on surviving weights only.
        survivors = {name: magnitude(weights[name]).masked_fill(masks[name], float("inf")) for name in weights}
        share = (sparsity - base) / (1 - base)
        sizes, pruned = selector.numel(masks), selector.count(masks)
        kept = {name: sizes[name] - pruned[name] for name in masks}
        extra = selector.lowest(survivors, _groups(kept, share, scope))
        masks = {name: masks[name] | extra[name] for name in masks}
    return masks


Layout = tuple[int, int]
"""A weight's (output dim, input dim): (0, 1) for Linear and Conv, (1, 0) for Hugging Face's Conv1D."""


def _dims(tensor: torch.Tensor, layout: Layout) -> tuple[int, int]:
    output_dim, input_dim = (dim % tensor.dim() for dim in layout)
    return output_dim, input_dim


def to_layout(tensor: torch.Tensor, granularity: str, layout: Layout) -> torch.Tensor:
    """A view of `tensor` in the layout the mask functions expect.

    Output channels first; for ``n:m`` also the input dimension last, so that groups of M consecutive weights
    run along it (a Linear's [out, in] is unchanged). ``unstructured`` masks ignore the layout.
    """
    if granularity == "unstructured":
        return tensor
    output_dim, input_dim = _dims(tensor, layout)
    if granularity == "channels":
        return tensor.movedim(output_dim, 0)
    return tensor.movedim((output_dim, input_dim), (0, -1))


def from_layout(mask: torch.Tensor, granularity: str, layout: Layout) -> torch.Tensor:
    """Undo `to_layout` on a mask (a channel mask [out, 1, ...] becomes e.g. [1, out] for a Conv1D)."""
    if granularity == "unstructured":
        return mask
    output_dim, input_dim = _dims(mask, layout)
    if granularity == "channels":
        return mask.movedim(0, output_dim).contiguous()
    return mask.movedim((0, -1), (output_dim, input_dim)).contiguous()


def compute_masks(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    granularity: str,
    scope: str,
    pattern: tuple[int, int] | None = None,
    layouts: Mapping[str, Layout] | None = None,
    selector: Selector = LOCAL,
) -> Masks:
    """Masks that bring `weights` to `sparsity` at the given granularity (see module docstring).

    `layouts` gives a weight's (output dim, input dim) where it is not (0, 1), e.g. ``(1, 0)`` for Hugging
    Face's Conv1D, whose weight is [in, out]: channels then prune its columns and N:M groups run down its
    rows. Masks come back in each weight's own layout. `selector` counts and ranks across tensors: pass a
    `ShardedSelector` when `weights` are FSDP2 shards (channels need whole rows and are not offered there).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}: must be one of {', '.join(GRANULARITIES)}")
    if granularity == "n:m" and pattern is None:
        raise ValueError("granularity='n:m' needs a pattern such as '2:4'")
    layouts = layouts or {}
    views = {name: to_layout(weight, granularity, layouts.get(name, (0, 1))) for name, weight in weights.items()}
    if granularity == "unstructured":
        masks = unstructured_masks(views, sparsity, scope, selector)
    elif granularity == "channels":
        if selector is not LOCAL:
            raise ValueError("granularity='channels' ranks whole rows: it cannot run on shards")
        masks = channel_masks(views, sparsity, scope)
    else:
        assert pattern is not None
        masks = nm_masks(views, sparsity, *pattern, scope, selector)
    return {name: from_layout(mask, granularity, layouts.get(name, (0, 1))) for name, mask in masks.items()}


class MaskApplier:
    """Zeroes the pruned entries of many parameters after every optimizer step, in one fused call.

    ``w -= w * mask`` with the bool masks viewed as uint8 (`torch._foreach_addcmul_`): no copy of the masks, as
    fast as a multiply by precomputed fp32 keep-factors (which took as much memory as the weights) and 4x faster
    than `masked_fill_` here; exact, since ``w - w * 0 == w`` and ``w - w * 1 == 0``.
    """

    def __init__(self, parameters: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
        self.parameters = [parameters[name] for name in masks]
        self.masks: list[torch.Tensor] = []
        for name, mask in masks.items():
            parameter = parameters[name]
            if mask.device != parameter.device:
                raise RuntimeError(f"mask for {name} is on {mask.device}, the parameter on {parameter.device}")
            self.masks.append(mask.to(torch.bool).view(torch.uint8).expand_as(parameter))

    @torch.no_grad()
    def __call__(self) -> None:
        if self.parameters:
            torch._foreach_addcmul_(self.parameters, self.parameters, self.masks, value=-1)


def apply_masks(parameters: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero every pruned entry of `parameters` in place (one-off; the callback keeps a `MaskApplier`)."""
    MaskApplier(parameters, masks)()


def zero_fraction(tensors: Mapping[str, torch.Tensor] | list[torch.Tensor]) -> float:
    """The share of exactly-zero entries over all `tensors`: the sparsity a user would measure."""
    values = list(tensors.values()) if isinstance(tensors, Mapping) else tensors
    total = sum(t.numel() for t in values)
    zeros = sum(int((t == 0).sum()) for t in values)
    return zeros / total if total else 0.0

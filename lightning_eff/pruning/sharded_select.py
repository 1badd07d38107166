"""Exact lowest-k selection over FSDP2 shards, by a distributed radix select.

Global magnitude pruning needs the k-th smallest score over all weights, which under FSDP2 lie in pieces on
every rank. Gathering them would put the whole model on one rank; instead each rank histograms the bytes of its
scores' float32 bit patterns (for non-negative floats the bit pattern orders like the value), the histograms
are summed with one ``all_reduce`` per byte, and four rounds fix the threshold's four bytes exactly. Scores
below it are chosen; of those equal to it, exactly as many as the count still needs, taken in rank order.
The result is the set that a whole-tensor ``topk`` picks (identical wherever there is no tie at the threshold).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from lightning_eff.pruning.masks import Groups, Selector


class ShardedSelector(Selector):
    """`masks.Selector` for tensors that are this rank's shards; every rank must call each method together.

    Args:
        group: the process group the tensors are sharded over (FSDP2: the data-parallel mesh dimension's).
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    def _sum(self, values: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(values, group=self.group)
        return values

    def numel(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
        sizes = self._sum(torch.tensor([t.numel() for t in tensors.values()], dtype=torch.int64))
        return dict(zip(tensors, sizes.tolist(), strict=True))

    def count(self, masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
        counts = self._sum(torch.stack([m.sum().to(torch.int64).cpu() for m in masks.values()]))
        return dict(zip(masks, counts.tolist(), strict=True))

    def lowest(self, scores: Mapping[str, torch.Tensor], groups: Groups) -> dict[str, torch.Tensor]:
        # Scores are read one tensor at a time, as often as needed (`masks.Magnitudes` computes them on read), so
        # the selection's memory is one tensor's scores, not a float copy of every shard.
        threshold, still_needed = self._radix_select(scores, groups)
        chosen = {name: torch.zeros(shape, dtype=torch.bool) for name, shape in _shapes(scores).items()}
        ties = torch.zeros(len(groups), dtype=torch.int64)
        for g, (names, count) in enumerate(groups):
            if count <= 0:
                continue
            for name in names:
                bits = _bits(scores[name])
                chosen[name] = (bits < threshold[g]).reshape(chosen[name].shape)
                ties[g] += int((bits == threshold[g]).sum())
        # Of the scores equal to the threshold, the lower ranks' go first, then in tensor and element order.
        world = dist.get_world_size(self.group)
        every_rank = [torch.zeros_like(ties) for _ in range(world)]
        dist.all_gather(every_rank, ties, group=self.group)
        rank = dist.get_rank(self.group)
        before = torch.stack(every_rank[:rank]).sum(0) if rank else torch.zeros_like(ties)
        take = (still_needed - before).clamp(min=0).minimum(ties)
        for g, (names, count) in enumerate(groups):
            left = int(take[g]) if count > 0 else 0
            for name in names:
                if left <= 0:
                    break
                equal = (_bits(scores[name]) == threshold[g]).nonzero().reshape(-1)[:left]
                chosen[name].view(-1)[equal] = True
                left -= len(equal)
        return chosen

    def _radix_select(self, scores: Mapping[str, torch.Tensor], groups: Groups) -> tuple[list[int], torch.Tensor]:
        """Per group, the bit pattern of its k-th smallest score and how many scores equal to it are still needed."""
        prefix = [0] * len(groups)
        needed = torch.tensor([count for _, count in groups], dtype=torch.int64)
        for shift in (24, 16, 8, 0):
            histogram = torch.zeros(len(groups), 256, dtype=torch.int64)
            for g, (names, _) in enumerate(groups):
                for name in names:
                    pattern = _bits(scores[name])
                    if shift < 24:  # only the scores whose higher bytes match the threshold's so far
                        pattern = pattern[(pattern >> (shift + 8)) == (prefix[g] >> (shift + 8))]
                    histogram[g] += torch.bincount(((pattern >> shift) & 255).long(), minlength=256)
            cumulative = self._sum(histogram).cumsum(1)
            for g in range(len(groups)):
                if needed[g] <= 0:
                    continue
                total = int(cumulative[g, -1])
                if needed[g] > total:  # more than there are: take all (the threshold ends above every score)
                    needed[g] = total
                digit = int(torch.searchsorted(cumulative[g], needed[g]))
                digit = min(digit, 255)
                needed[g] -= int(cumulative[g, digit - 1]) if digit > 0 else 0
                prefix[g] |= digit << shift
        return prefix, needed


def _bits(score: torch.Tensor) -> torch.Tensor:
    """Flat int32 bit patterns of float32 scores, ordered like the scores (+inf and NaN last); a view, not a copy,
    of a contiguous float32 tensor. Scores are magnitudes or sums of them: non-negative, and never -0.0 (whose
    bit pattern is negative), since ``abs`` returns +0.0."""
    return score.detach().float().reshape(-1).contiguous().view(torch.int32)


def _shapes(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    """Each score tensor's shape, reading one at a time."""
    return {name: scores[name].shape for name in scores}

"""Per-rank batches of unequal size that together cover every sample of an epoch exactly once.

Every rank draws the same seeded permutation of the epoch, cuts it into global batches of the configured
size, and takes its own slice of each global batch according to the current plan. The number of batches
per epoch does not depend on the plan, so every rank runs the same number of steps (DDP would hang
otherwise), and a re-plan between batches changes only how the next global batches are cut.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import Sampler

from lightning_eff.balancing.planner import split_by_weight


@dataclass
class BatchPlan:
    """The split that the sampler reads before cutting each global batch; the balancer updates it.

    Args:
        batch_sizes: samples per rank in a full global batch (they sum to the global batch size).
        speeds: relative speed of each rank, used to split a global batch by cost or the last partial one.
    """

    batch_sizes: list[int]
    speeds: list[float] = field(default_factory=list)

    def shares(self) -> list[float]:
        total = sum(self.batch_sizes)
        return [size / total for size in self.batch_sizes]


def assign_by_cost(costs: Sequence[float], speeds: Sequence[float]) -> list[list[int]]:
    """Positions of `costs` per rank so that each rank's total cost / speed is as equal as possible.

    Longest-processing-time-first: the costliest sample goes to the rank that would finish it earliest.
    Every rank gets at least one sample when there are enough.
    """
    ranks = len(speeds)
    loads = [0.0] * ranks
    assigned: list[list[int]] = [[] for _ in range(ranks)]
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    for count, position in enumerate(order):
        remaining = len(order) - count
        empty = [r for r in range(ranks) if not assigned[r]]
        candidates = empty if empty and remaining <= len(empty) else range(ranks)
        rank = min(candidates, key=lambda r: ((loads[r] + costs[position]) / speeds[r], r))
        assigned[rank].append(position)
        loads[rank] += costs[position]
    return [sorted(positions) for positions in assigned]


class BalancedBatchSampler(Sampler[list[int]]):
    """Yields this rank's batches: its slice of each global batch under the current `plan`.

    Args:
        dataset_size: samples in the dataset.
        global_batch_size: samples per optimizer step over all ranks (what the user configured).
        rank: this process's rank; world_size: number of ranks.
        plan: the shared split; read anew for every global batch.
        seed: the permutation depends only on (seed, epoch), identical on every rank.
        shuffle: permute the epoch, or keep dataset order.
        cost_fn: if given, each global batch is assigned by `assign_by_cost` over `plan.speeds` instead of
            by counts, so that ranks finish at the same time when samples differ in cost.
    """

    def __init__(
        self,
        dataset_size: int,
        global_batch_size: int,
        rank: int,
        world_size: int,
        plan: BatchPlan,
        seed: int = 0,
        shuffle: bool = True,
        cost_fn: Callable[[int], float] | None = None,
    ) -> None:
        if dataset_size < world_size:
            raise ValueError(f"{dataset_size} samples cannot give each of {world_size} ranks a batch")
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.rank = rank
        self.world_size = world_size
        self.plan = plan
        self.seed = seed
        self.shuffle = shuffle
        self.cost_fn = cost_fn
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _bounds(self) -> list[int]:
        """Start positions of the epoch's global batches, and the end.

        A remainder too small to give every rank a sample joins the last full global batch, so no sample is
        dropped and no rank gets an empty batch.
        """
        full, remainder = divmod(self.dataset_size, self.global_batch_size)
        starts = [i * self.global_batch_size for i in range(full)]
        if remainder >= self.world_size or not starts:
            starts.append(full * self.global_batch_size)
        return [*starts, self.dataset_size]

    def __len__(self) -> int:
        return len(self._bounds()) - 1

    def global_size(self, batch_index: int) -> int:
        """Samples in the epoch's `batch_index`-th global batch, over all ranks (the same for every plan)."""
        bounds = self._bounds()
        return bounds[batch_index + 1] - bounds[batch_index]

    def _epoch_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.dataset_size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.dataset_size, generator=generator).tolist()

    def split(self, global_batch: list[int]) -> list[list[int]]:
        """Cut one global batch into per-rank batches under the current plan (every rank gets >= 1)."""
        speeds = self.plan.speeds or [1.0] * self.world_size
        if self.cost_fn is not None:
            positions = assign_by_cost([self.cost_fn(index) for index in global_batch], speeds)
            return [[global_batch[p] for p in rank_positions] for rank_positions in positions]
        if len(global_batch) == sum(self.plan.batch_sizes):
            sizes = self.plan.batch_sizes
        else:  # the epoch's last, partial global batch: the same proportions
            sizes = split_by_weight(len(global_batch), self.plan.batch_sizes, minimum=1)
        bounds = [0, *itertools.accumulate(sizes)]
        return [global_batch[bounds[r] : bounds[r + 1]] for r in range(self.world_size)]

    def __iter__(self) -> Iterator[list[int]]:
        order = self._epoch_order()
        bounds = self._bounds()
        skip, self.skip_batches = self.skip_batches, 0
        for start, end in itertools.islice(itertools.pairwise(bounds), skip, None):
            yield self.split(order[start:end])[self.rank]

"""Deterministic train/val/test splits shared by the reference DataModules."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def split_sizes(total: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """Sizes of (train, val, test) for `total` items; val and test get at least one item each."""
    val = max(1, round(total * val_fraction))
    test = max(1, round(total * test_fraction))
    train = total - val - test
    if train < 1:
        raise ValueError(f"{total} items leave nothing to train on with val={val_fraction}, test={test_fraction}")
    return train, val, test


def shuffled_indices(total: int, seed: int) -> torch.Tensor:
    """A permutation of range(total) that depends only on `seed` (not on the global RNG)."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))


class EpochSeededShuffle(Sampler[int]):
    """A shuffle that depends only on (seed, epoch), so a run resumed from a checkpoint sees the same order.

    Lightning calls `set_epoch` at the start of every epoch, as it does for `DistributedSampler` (which
    replaces this sampler under DDP and is epoch-seeded the same way).
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        return iter(shuffled_indices(self.size, self.seed + self.epoch).tolist())

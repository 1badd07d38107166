"""Deterministic train/val/test splits shared by the reference DataModules."""

from __future__ import annotations

import torch


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

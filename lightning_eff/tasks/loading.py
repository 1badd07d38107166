"""Loading for the reference DataModules: deterministic splits, seeded shuffles, and mid-epoch resume."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_eff.resume import batches_done_this_epoch


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


class ResumableDataLoader(DataLoader):
    """A DataLoader whose first pass skips `skip_batches`: a run resumed from a mid-epoch checkpoint (a SLURM
    requeue) continues the epoch where it stopped instead of training on its first batches twice.

    `skip_batches` is an init argument kept as an attribute, so Lightning's DDP re-instantiation (which
    injects a DistributedSampler) carries it over.
    """

    def __init__(self, *args: Any, skip_batches: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self.skip_batches = self.skip_batches, 0
        return itertools.islice(super().__iter__(), skip, None)

    def state_dict(self) -> dict[str, Any]:
        """Empty: the position comes from Lightning's own batch progress (`batches_done_this_epoch`).

        Having the method tells Lightning this loader resumes mid-epoch correctly.
        """
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore; see `state_dict`."""


class SplitDataModule(L.LightningDataModule):
    """Loaders shared by the reference DataModules: a resumable, (seed, epoch)-shuffled training loader and
    plain validation and test loaders. Subclasses fill `train_set`, `val_set` and `test_set` in `setup`."""

    collate_fn: Any = None

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        # The training shuffle follows the run's seed (`seed_everything`), epoch by epoch.
        self.shuffle_seed = torch.initial_seed() % 2**31
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        assert dataset is not None, "call setup() first"
        if not shuffle:
            return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers)
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSeededShuffle(len(dataset), seed=self.shuffle_seed),  # type: ignore[arg-type]
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            skip_batches=batches_done_this_epoch(self.trainer),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

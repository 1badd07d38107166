"""Byte-level language modelling on the English prose every CPython install carries (`pydoc_data.topics`)."""

from __future__ import annotations

from pydoc_data.topics import topics

import torch
from torch.utils.data import Dataset

from lightning_eff.tasks.loading import SplitDataModule, split_sizes

VOCAB_SIZE = 256


def corpus_bytes() -> torch.Tensor:
    """Python's help topics joined in a fixed order, as a uint8 tensor (about 0.47 MB)."""
    text = "\n\n".join(topics[name] for name in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


class ByteWindows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Non-overlapping windows of `seq_len` bytes and the same window shifted by one as the target."""

    def __init__(self, data: torch.Tensor, seq_len: int) -> None:
        if len(data) < seq_len + 1:
            raise ValueError(f"{len(data)} bytes are too few for one window of seq_len={seq_len}")
        self.data = data
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.seq_len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.seq_len
        window = self.data[start : start + self.seq_len + 1].long()
        return window[:-1], window[1:]


class VariableLengthWindows(ByteWindows):
    """Windows whose length is drawn per index from [min_len, seq_len]: real text, unequal cost per sample."""

    def __init__(self, data: torch.Tensor, seq_len: int, min_len: int, seed: int = 0) -> None:
        super().__init__(data, seq_len)
        generator = torch.Generator().manual_seed(seed)
        self.lengths = torch.randint(min_len, seq_len + 1, (len(self),), generator=generator).tolist()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, targets = super().__getitem__(index)
        length = self.lengths[index]
        return tokens[:length], targets[:length]


def pad_batch(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch to its longest sample; padded targets are -100, which cross-entropy ignores."""
    longest = max(len(tokens) for tokens, _ in batch)
    tokens = torch.zeros(len(batch), longest, dtype=torch.long)
    targets = torch.full((len(batch), longest), -100, dtype=torch.long)
    for row, (sample, target) in enumerate(batch):
        tokens[row, : len(sample)] = sample
        targets[row, : len(target)] = target
    return tokens, targets


class TextDataModule(SplitDataModule):
    """The corpus split into contiguous train/val/test stretches, so no window leaks across splits.

    Args:
        seq_len: bytes per training sample (the model's context length must be at least this).
        batch_size: windows per batch on each process.
        max_bytes: use only the first `max_bytes` of the corpus (quick runs and tests); None for all.
        min_seq_len: if set, training samples have random lengths in [min_seq_len, seq_len] and batches are
            padded (the variable-length task that `CostBalancer` balances); None for fixed length.
    """

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_bytes: int | None = None,
        min_seq_len: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        self.seq_len = seq_len
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.max_bytes = max_bytes
        self.min_seq_len = min_seq_len
        self.collate_fn = pad_batch if min_seq_len is not None else None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data = corpus_bytes()
        if self.max_bytes is not None:
            data = data[: self.max_bytes]
        n_train, n_val, _ = split_sizes(len(data), self.val_fraction, self.test_fraction)
        if self.min_seq_len is None:
            self.train_set = ByteWindows(data[:n_train], self.seq_len)
        else:
            self.train_set = VariableLengthWindows(data[:n_train], self.seq_len, self.min_seq_len)
        self.val_set = ByteWindows(data[n_train : n_train + n_val], self.seq_len)
        self.test_set = ByteWindows(data[n_train + n_val :], self.seq_len)

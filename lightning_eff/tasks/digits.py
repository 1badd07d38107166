"""scikit-learn's bundled 8x8 handwritten digits: a DataModule, an MLP and a small CNN."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torchmetrics
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

from lightning_eff.tasks.loading import SplitDataModule, shuffled_indices, split_sizes

NUM_CLASSES = 10


class DigitsDataModule(SplitDataModule):
    """The 1,797 digits as (1, 8, 8) float images in [0, 1], split deterministically by `split_seed`.

    Args:
        batch_size: samples per batch on each process.
        val_fraction: share of the images held out for validation.
        test_fraction: share of the images held out for the final test.
        split_seed: seed of the split, independent of the training seed so runs compare on the same test set.
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        order = shuffled_indices(len(labels), self.split_seed)
        n_train, n_val, _ = split_sizes(len(labels), self.val_fraction, self.test_fraction)
        parts = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
        self.train_set, self.val_set, self.test_set = (TensorDataset(images[p], labels[p]) for p in parts)


class DigitsClassifier(L.LightningModule):
    """Cross-entropy training and accuracy metrics for the digits models; subclasses build `self.net`."""

    net: nn.Module

    def __init__(self, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.lr = lr
        self.weight_decay = weight_decay
        self.train_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=NUM_CLASSES)
        self.val_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=NUM_CLASSES)
        self.test_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=NUM_CLASSES)
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def _step(self, batch: Sequence[torch.Tensor], stage: str, accuracy: torchmetrics.Metric) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = nn.functional.cross_entropy(logits, labels)
        accuracy(logits, labels)
        # Training logs the step's loss, unsynchronized: no extra collective in the step being measured.
        training = stage == "train"
        self.log(
            f"{stage}_loss",
            loss,
            prog_bar=True,
            on_step=training,
            on_epoch=not training,
            sync_dist=not training,
        )
        self.log(f"{stage}_acc", accuracy, prog_bar=not training, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_accuracy)

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val", self.val_accuracy)

    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test", self.test_accuracy)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class DigitsMLP(DigitsClassifier):
    """A Linear-ReLU stack over the 64 flattened pixels: small, fast, all Linear (what pruning and QAT target).

    Args:
        hidden_sizes: widths of the hidden layers.
        dropout: dropout after each hidden activation.
    """

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (256, 256),
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Flatten()]
        width = 64
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, NUM_CLASSES))
        self.net = nn.Sequential(*layers)


class DigitsCNN(DigitsClassifier):
    """Conv-BN-ReLU blocks, global average pooling and a Linear head.

    Args:
        channels: output channels of each convolution block.
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32),
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = 1
        for out in channels:
            layers += [nn.Conv2d(width, out, kernel_size=3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            width = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, NUM_CLASSES)]
        self.net = nn.Sequential(*layers)

"""A user's own LightningModule and DataModule, as the README's "your own classes" example names them.

Tests put `tests/own_classes_pkg` on PYTHONPATH, as a user's package would be installed or on the path.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class MyData(L.LightningDataModule):
    """Points labelled by a fixed random linear teacher: learnable in a few dozen steps."""

    def __init__(self, batch_size: int = 32, samples: int = 768, features: int = 16, classes: int = 4) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(samples, features, generator=generator)
        labels = (inputs @ torch.randn(features, classes, generator=generator)).argmax(dim=1)
        third = samples // 3
        self.splits = [TensorDataset(inputs[i * third : (i + 1) * third], labels[i * third : (i + 1) * third])
                       for i in range(3)]  # fmt: skip
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits[0], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits[1], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits[2], batch_size=self.batch_size)


class MyModule(L.LightningModule):
    """A two-layer classifier with its own constructor arguments (none of the reference models' keys)."""

    def __init__(self, hidden_size: int = 64, features: int = 16, classes: int = 4, lr: float = 0.01) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden_size), nn.ReLU(), nn.Linear(hidden_size, classes))
        self.lr = lr

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        inputs, labels = batch
        logits = self(inputs)
        loss = F.cross_entropy(logits, labels)
        self.log(f"{stage}_loss", loss, prog_bar=stage == "train")
        if stage != "train":
            self.log(f"{stage}_acc", (logits.argmax(dim=1) == labels).float().mean())
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

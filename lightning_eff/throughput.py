"""Measures training throughput for the end-of-run report."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.data import extract_batch_size
from typing_extensions import override


class ThroughputMeter(L.Callback):
    """Counts training samples and the time spent in training steps (forward, backward, optimizer step).

    Data loading and validation are left out, so the figure compares the cost of the step itself across
    runs. `samples` and `step_seconds` are summed over all ranks at the end of fit; `samples_per_second`
    is the global rate.
    """

    def __init__(self) -> None:
        self.samples = 0
        self.step_seconds = 0.0
        self.fit_seconds = 0.0
        self._batch_started = 0.0
        self._fit_started = 0.0

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_started = time.perf_counter()

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_started = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.step_seconds += time.perf_counter() - self._batch_started
        self.samples += extract_batch_size(batch)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_seconds = time.perf_counter() - self._fit_started
        totals = torch.tensor([float(self.samples), self.step_seconds], device=pl_module.device)
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        self.samples = int(totals[0].item())
        # Ranks step in lockstep, so the mean of their step time is the wall time of the training steps.
        self.step_seconds = float(totals[1].item()) / trainer.world_size

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.step_seconds if self.step_seconds > 0 else 0.0

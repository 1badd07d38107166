"""One line of progress per epoch where no progress bar is shown (logs, CI, SLURM output files)."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override


class EpochProgressLog(L.Callback):
    """Prints epoch, optimizer step, elapsed time and the epoch's logged metrics at the end of each epoch."""

    def __init__(self) -> None:
        self._started = time.perf_counter()

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if not key.endswith("_step")}
        shown = " ".join(f"{key}={value:.4g}" for key, value in sorted(metrics.items()))
        elapsed = time.perf_counter() - self._started
        rank_zero_info(f"epoch {trainer.current_epoch} step {trainer.global_step} ({elapsed:.1f}s) {shown}")

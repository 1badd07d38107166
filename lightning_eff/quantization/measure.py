"""What a conversion bought: bytes, CPU inference time and the task's own test metrics, before and after."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn
from torchmetrics import Metric


def inference_seconds(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], repeats: int = 15) -> float:
    """Median wall time of one forward of `model` (already in eval mode: an exported one has no `eval()`)."""
    with torch.inference_mode():
        for _ in range(3):
            model(*args, **kwargs)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            model(*args, **kwargs)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def _without_metric_sync(module: L.LightningModule) -> L.LightningModule:
    """A copy whose torchmetrics do not all-gather: it is evaluated by one process while others may be idle."""
    module = copy.deepcopy(module)
    module._metric_attributes = None  # Lightning's id -> name cache of logged torchmetrics: stale in a copy
    for child in module.modules():
        if isinstance(child, Metric):
            child.sync_on_compute = False
    return module


def evaluate_test_set(
    module: L.LightningModule, datamodule: L.LightningDataModule, limit_batches: int | float = 1.0
) -> dict[str, float]:
    """The module's own `test_step` metrics over the test set (or `limit_batches` of it), in this process alone.

    A separate single-device Trainer with no callbacks and no logger, so it can run on rank 0 of a
    finished DDP job without a collective, and the caller's Trainer and callbacks are left as they were.
    """
    evaluator = L.Trainer(
        strategy=SingleDeviceStrategy(device=torch.device("cpu")),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[],
        limit_test_batches=limit_batches,
    )
    results = evaluator.test(_without_metric_sync(module).cpu(), datamodule=datamodule, verbose=False)
    return {key: float(value) for key, value in results[0].items()} if results else {}

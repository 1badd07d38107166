"""EfficientStrategyHooks: what the DDP and FSDP2 strategies share, the balancer's hooks and the compression
metrics and report.

A balancer needs the same six hooks whatever shards or replicates the model: the training loader (its sampler
cut by the plan), the batch reaching the device, the start of each step (measure, re-plan), `training_step`
and `backward` (timed; the loss weighted by this rank's sample count) and the optimizer step (timed). The
weighting is in the loss, so it precedes any gradient communication: DDP's allreduce and FSDP2's
reduce-scatter both average over ranks, and ``sum(b_i * g_i) / sum(b_i)`` needs the weight before that mean.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.trainer.states import RunningStage
from torch.optim import Optimizer
from typing_extensions import override

from lightning_eff.balancing import balanced_training
from lightning_eff.balancing.balanced_training import BalancedTraining
from lightning_eff.balancing.balancers import CostBalancer, ThroughputBalancer, require_balancer
from lightning_eff.compression.communication import CompressedCommunication
from lightning_eff.compression.stats import CompressionStats
from lightning_eff.report import ReportSection
from lightning_eff.validation import ConfigError, check


def resolve_balancer(value: ThroughputBalancer | CostBalancer | str | None) -> ThroughputBalancer | None:
    """The balancer a strategy's ``balancer=`` argument names (``"throughput"``: a default one), or None."""
    if isinstance(value, type):  # the class itself, e.g. balancer=ThroughputBalancer
        raise ConfigError("balancer", value.__name__, f"is a class; pass an instance, e.g. {value.__name__}()")
    allowed = value is None or value == "throughput" or isinstance(value, (ThroughputBalancer, CostBalancer))
    rule = "must be a ThroughputBalancer, a CostBalancer, throughput (a default one) or None"
    check(allowed, "balancer", value, rule)
    return require_balancer(ThroughputBalancer() if value == "throughput" else value)


class EfficientStrategyHooks(ParallelStrategy):
    """The balancer's hooks, and compression's metrics and report section; a subclass sets `balancer` and
    `communication` in its ``__init__``, calls `start_balancing` once the process group is up and hands the
    compressor to its own kind of communication. Placed before Lightning's strategy in the bases, so every hook
    ends in Lightning's own.
    """

    balancer: ThroughputBalancer | None = None
    balancing: BalancedTraining | None = None  # built once the device is known
    communication: CompressedCommunication | None = None

    def start_balancing(self) -> None:
        """Build this run's `BalancedTraining` (after the process group and the device are set up)."""
        if self.balancer is not None:
            self.balancing = BalancedTraining(self.balancer, cpu_device=self.root_device.type == "cpu")

    @property
    def compression_stats(self) -> CompressionStats:
        """Bytes dense vs sent and seconds, per step and in total (empty without compression)."""
        return self.communication.stats if self.communication is not None else CompressionStats()

    @property
    def balance_stats(self) -> dict[str, list[float]]:
        """Per-rank share of the global batch, speed (samples/s of forward and backward), fixed seconds per
        step (hooks, zero_grad, optimizer step) and idle fraction."""
        return self.balancer.stats() if self.balancer is not None else {}

    @property
    def _balancing_now(self) -> BalancedTraining | None:
        return self.balancing if self.balancing is not None and self.balancing.active else None

    def timed_parameters(self) -> Iterable[torch.Tensor]:
        """Parameters whose gradient-ready moment ends backward's own work (see `StepTimer.backward`)."""
        return self.lightning_module.parameters() if self.lightning_module is not None else []

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        if self.balancer is not None:
            checkpoint[balanced_training.CHECKPOINT_KEY] = self.balancer.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if self.balancer is not None and balanced_training.CHECKPOINT_KEY in checkpoint:
            self.balancer.load_state_dict(checkpoint[balanced_training.CHECKPOINT_KEY])
        return checkpoint

    @override
    def process_dataloader(self, dataloader: object) -> object:
        dataloader = super().process_dataloader(dataloader)
        trainer = self._trainer()
        if self.balancing is None or trainer is None or trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        return self.balancing.balanced_loader(dataloader, trainer, self.global_rank, self.world_size)

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        trainer = self._trainer()
        if (balancing := self._balancing_now) is not None and trainer is not None and trainer.training:
            balancing.timer.batch_ready()  # after the per-step sigterm broadcast and the fetch: own work from here
        return super().batch_to_device(batch, device, dataloader_idx)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if (trainer := self._trainer()) is None:
            return
        if self.balancing is not None:
            self.balancing.on_step_start(trainer, self.root_device)  # measure the last step, re-plan when due
        if self.communication is not None:
            self.communication.log_metrics(trainer)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if (balancing := self._balancing_now) is None:
            return super().training_step(*args, **kwargs)
        samples = balancing.note_batch(args, kwargs, self.world_size)
        with balancing.timer.training_step(samples):
            return super().training_step(*args, **kwargs)

    @override
    def backward(self, closure_loss: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        if (balancing := self._balancing_now) is None or self.lightning_module is None:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        with balancing.timer.backward(self.timed_parameters()):
            return super().backward(balancing.weighted(closure_loss), optimizer, *args, **kwargs)

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        if (balancing := self._balancing_now) is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        with balancing.timer.optimizer_step():
            return super().optimizer_step(optimizer, closure, model, **kwargs)

    @override
    def teardown(self) -> None:
        if self.balancing is not None:
            self.balancing.timer.close()
        super().teardown()

    def report_section(self, trainer: L.Trainer, run_dir: Path) -> list[ReportSection]:
        """`communication` (bytes dense vs sent, compression time) and `balance` (shares, speeds, plot)."""
        sections = [
            self.communication.report_section() if self.communication is not None else None,
            self.balancing.report_section(run_dir) if self.balancing is not None else None,
        ]
        return [section for section in sections if section is not None]

    def _trainer(self) -> L.Trainer | None:
        return self.lightning_module.trainer if self.lightning_module is not None else None

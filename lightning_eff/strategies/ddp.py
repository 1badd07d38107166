"""EfficientDDPStrategy: Lightning's DDP that hands gradient compression and load balancing to their packages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import RunningStage
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_eff.balancing import balanced_training
from lightning_eff.balancing.balanced_training import BalancedTraining
from lightning_eff.balancing.balancers import CostBalancer, ThroughputBalancer, require_balancer
from lightning_eff.compression import Compressor, communication
from lightning_eff.compression.communication import CompressedCommunication, resolve_compressor
from lightning_eff.compression.stats import CompressionStats
from lightning_eff.distributed import destroy_process_group_at_exit
from lightning_eff.report import ReportSection
from lightning_eff.validation import ConfigError, check


class EfficientDDPStrategy(DDPStrategy):
    """DDP with gradient compression and load balancing, on CPU (gloo) as on GPU (NCCL).

    Lightning's `DDPStrategy` registers comm hooks only on CUDA and never checkpoints their state; this strategy
    registers the compressor's hook on every device and checkpoints each rank's state
    (`compression.communication`). With a balancer, each rank's share of the global batch follows its measured
    speed and each rank's loss is weighted by its sample count (`balancing.balanced_training`). Each override
    below says which of the two it hands the hook to.

    Args:
        compression: a `Compressor` (``PowerSGD(rank=4)``), a registered name (``"powersgd"``), or None
            for plain DDP.
        balancer: a `ThroughputBalancer` or `CostBalancer` (``"throughput"`` for a default one), or None for
            equal shares.
        **kwargs: everything `DDPStrategy` takes (``process_group_backend``, ``find_unused_parameters``, ...).

    Example::

        trainer = L.Trainer(
            accelerator="cpu", devices=2,
            strategy=EfficientDDPStrategy(compression=PowerSGD(rank=4), balancer=ThroughputBalancer()),
        )
    """

    strategy_name = "ddp_efficient"

    def __init__(
        self,
        compression: Compressor | str | None = None,
        balancer: ThroughputBalancer | CostBalancer | str | None = None,
        **kwargs: Any,
    ) -> None:
        for key, value in (("compression", compression), ("balancer", balancer)):
            if isinstance(value, type):  # the class itself, e.g. compression=PowerSGD
                raise ConfigError(key, value.__name__, f"is a class; pass an instance, e.g. {value.__name__}()")
        balancers = (ThroughputBalancer, CostBalancer)
        check(balancer is None or balancer == "throughput" or isinstance(balancer, balancers), "balancer", balancer,
              "must be a ThroughputBalancer, a CostBalancer, throughput (a default one) or None")  # fmt: skip
        if compression is not None and kwargs.get("ddp_comm_hook") is not None:
            raise ConfigError("compression", compression, "cannot be combined with ddp_comm_hook; choose one")
        super().__init__(**kwargs)
        self.compressor = resolve_compressor(compression)
        self.balancer = require_balancer(ThroughputBalancer() if balancer == "throughput" else balancer)
        self.communication = CompressedCommunication(self.compressor) if self.compressor is not None else None
        self.balancing: BalancedTraining | None = None  # built in setup, once the device is known

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

    @override
    def setup_distributed(self) -> None:
        super().setup_distributed()
        destroy_process_group_at_exit()  # Lightning does this for NCCL only; gloo runs can abort at exit without it
        if self.balancer is not None:
            self.balancing = BalancedTraining(self.balancer, cpu_device=self.root_device.type == "cpu")

    @override
    def _register_ddp_hooks(self) -> None:
        if self.communication is None:
            super()._register_ddp_hooks()  # plain DDP keeps torch's overlapped allreduce
            return
        assert isinstance(self.model, DistributedDataParallel)
        self.communication.register(self.model, sync_timing=self.root_device.type == "cuda")

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        if self.communication is not None and (states := self.communication.gather_state(self.world_size)):
            checkpoint[communication.CHECKPOINT_KEY] = states
        if self.balancer is not None:
            checkpoint[balanced_training.CHECKPOINT_KEY] = self.balancer.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if self.balancer is not None and balanced_training.CHECKPOINT_KEY in checkpoint:
            self.balancer.load_state_dict(checkpoint[balanced_training.CHECKPOINT_KEY])
        if self.communication is not None and communication.CHECKPOINT_KEY in checkpoint:
            states = checkpoint[communication.CHECKPOINT_KEY]
            self.communication.restore_state(states, self.global_rank, self.world_size)
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
        with balancing.timer.backward(self.lightning_module.parameters()):
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

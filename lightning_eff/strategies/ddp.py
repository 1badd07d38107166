"""EfficientDDPStrategy: Lightning's DDP that hands gradient compression and load balancing to their packages."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_eff.balancing.balancers import CostBalancer, ThroughputBalancer
from lightning_eff.compression import Compressor, communication
from lightning_eff.compression.communication import (
    LocalSGDCommunication,
    make_communication,
    resolve_compressor,
)
from lightning_eff.distributed import destroy_process_group_at_exit
from lightning_eff.strategies.hooks import EfficientStrategyHooks, resolve_balancer
from lightning_eff.validation import ConfigError, check_bool


class EfficientDDPStrategy(EfficientStrategyHooks, DDPStrategy):
    """DDP with gradient compression and load balancing, on CPU (gloo) as on GPU (NCCL).

    Lightning's `DDPStrategy` registers comm hooks only on CUDA and never checkpoints their state; this strategy
    registers the compressor's hook on every device and checkpoints each rank's state
    (`compression.communication`). With a balancer, each rank's share of the global batch follows its measured
    speed and each rank's loss is weighted by its sample count (`balancing.balanced_training`). Each override
    below says which of the two it hands the hook to.

    ``compression=LocalSGD(period, warmup_steps)`` (post-local SGD) is no comm hook alone: after warm-up the
    parameters are averaged right after every `period`-th optimizer step (`optimizer_step`, so never during the
    sanity check or validation), once more at the end of training, and every rank's own parameters and optimizer
    state are checkpointed (`save_checkpoint`). It needs one optimizer. With a balancer, shares and loss weights
    stay as above: warm-up steps are exactly the global-batch update, and after it each rank steps on its own
    weighted loss (with plain SGD, the average of the ranks' first local steps is the global-batch step).

    Args:
        compression: a `Compressor` (``PowerSGD(rank=4)``), a registered name (``"powersgd"``), or None
            for plain DDP.
        balancer: a `ThroughputBalancer` or `CostBalancer` (``"throughput"`` for a default one), or None for
            equal shares.
        compression_overlap: overlap the compressor's collectives with the backward pass (Dense, FP16, BF16,
            PowerSGD; `CompressionHook`): faster on slow links, but results are no longer bit-reproducible on
            the CPU under load, nor resumes bit-exact. Off by default.
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
        compression_overlap: bool = False,
        **kwargs: Any,
    ) -> None:
        if compression is not None and kwargs.get("ddp_comm_hook") is not None:
            raise ConfigError("compression", compression, "cannot be combined with ddp_comm_hook; choose one")
        self.compressor = resolve_compressor(compression)
        self.balancer = resolve_balancer(balancer)
        super().__init__(**kwargs)
        check_bool("compression_overlap", compression_overlap)
        self.communication = (
            make_communication(self.compressor, overlap=compression_overlap) if self.compressor is not None else None
        )

    @override
    def setup_distributed(self) -> None:
        super().setup_distributed()
        destroy_process_group_at_exit()  # Lightning does this for NCCL only; gloo runs can abort at exit without it
        self.start_balancing()

    @property
    def local_sgd(self) -> LocalSGDCommunication | None:
        """The local SGD run, if ``compression`` is a `LocalSGD`."""
        return self.communication if isinstance(self.communication, LocalSGDCommunication) else None

    @override
    def setup(self, trainer: L.Trainer) -> None:
        super().setup(trainer)
        if self.local_sgd is not None and trainer.state.fn == TrainerFn.FITTING and len(self.optimizers) != 1:
            raise ConfigError(
                "compression",
                "local_sgd",
                f"needs exactly one optimizer (its averager counts optimizer steps); this module has "
                f"{len(self.optimizers)}",
            )

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        result = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.local_sgd is not None:
            self.local_sgd.after_optimizer_step(optimizer)  # local SGD: average the parameters when due
        return result

    @override
    def on_train_end(self) -> None:
        if self.local_sgd is not None and self.optimizers:
            self.local_sgd.average_at_end(self.optimizers[0])  # the tested and exported model is the consensus
        super().on_train_end()

    @override
    def _register_ddp_hooks(self) -> None:
        if self.communication is None:
            super()._register_ddp_hooks()  # plain DDP keeps torch's overlapped allreduce
            return
        assert isinstance(self.model, DistributedDataParallel)
        waiting = self.balancing.timer.waiting if self.balancing is not None else None  # not the balancer's work
        self.communication.register(self.model, sync_timing=self.root_device.type == "cuda", waiting=waiting)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        if self.communication is not None and (states := self.communication.gather_state(self.world_size)):
            checkpoint[communication.CHECKPOINT_KEY] = states
        if self.local_sgd is not None:
            self.local_sgd.gather_replicas(checkpoint, self.world_size)  # ranks differ between averagings
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if self.communication is not None and communication.CHECKPOINT_KEY in checkpoint:
            states = checkpoint[communication.CHECKPOINT_KEY]
            self.communication.restore_state(states, self.global_rank, self.world_size)
        if self.local_sgd is not None:
            self.local_sgd.restore_replica(checkpoint, self.global_rank, self.world_size)
        return checkpoint

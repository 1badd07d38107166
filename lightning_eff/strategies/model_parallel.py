"""EfficientModelParallelStrategy: Lightning's FSDP2 strategy with load balancing and bf16/fp16 gradient reduction."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.optim import Optimizer
from typing_extensions import override

from lightning_eff.balancing.balancers import CostBalancer, ThroughputBalancer
from lightning_eff.balancing.sharded_timing import time_sharded_collectives
from lightning_eff.compression import Compressor, LocalSGD
from lightning_eff.compression.communication import resolve_compressor
from lightning_eff.compression.sharded import ShardedCommunication, fsdp_modules
from lightning_eff.distributed import destroy_process_group_at_exit
from lightning_eff.sharding import reshard
from lightning_eff.strategies.hooks import EfficientStrategyHooks, resolve_balancer
from lightning_eff.validation import ConfigError, check


class EfficientModelParallelStrategy(EfficientStrategyHooks, ModelParallelStrategy):
    """FSDP2 (`fully_shard` in the module's `configure_model`) with load balancing and compressed reduction.

    With a balancer, each rank's share of the global batch follows its measured speed, as under
    `EfficientDDPStrategy`: the loss is weighted by ``b_i * world_size / sum(b)`` before backward, and FSDP2's
    reduce-scatter averages over ranks as DDP's allreduce does (its default gradient divide factor is the number
    of ranks; do not change it with ``set_gradient_divide_factor``), so the sharded update is the one a single
    process would make on the whole global batch. FSDP2's all-gathers and reduce-scatters run inside forward and
    backward, so they are timed as waiting (`balancing.sharded_timing`).

    Compression is what FSDP2's reduce-scatter allows: ``bf16`` or ``fp16`` on the wire (`CastReduceScatter`, half
    the bytes, the same stats as under DDP). PowerSGD, TopK, Int8 and Auto are refused at construction: they need
    whole gradients and full-size error feedback on every rank (see `compression.sharded`); LocalSGD too: it
    averages whole parameter replicas, which FSDP2 shards.

    Unlike Lightning's `ModelParallelStrategy`, every process is a data-parallel rank by default
    (``data_parallel_size="auto"`` with ``tensor_parallel_size=1``): Lightning's defaults would make the
    processes of one node tensor-parallel, and a module that only calls `fully_shard` would train each rank on
    its own.

    Args:
        compression: ``"bf16"``, ``"fp16"``, `BF16()`/`FP16()`, or None.
        balancer: a `ThroughputBalancer` or `CostBalancer` (``"throughput"`` for a default one), or None.
        data_parallel_size: ranks that shard the model (``"auto"``: all processes / tensor_parallel_size).
        tensor_parallel_size: ranks per tensor-parallel group; balancing needs 1.
        **kwargs: everything else `ModelParallelStrategy` takes (``save_distributed_checkpoint``, ...).

    Example::

        trainer = L.Trainer(
            accelerator="cpu", devices=2,
            strategy=EfficientModelParallelStrategy(compression="bf16", balancer=ThroughputBalancer()),
        )
    """

    strategy_name = "fsdp2"
    communication: ShardedCommunication | None

    def __init__(
        self,
        compression: Compressor | str | None = None,
        balancer: ThroughputBalancer | CostBalancer | str | None = None,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = 1,
        **kwargs: Any,
    ) -> None:
        compressor = resolve_compressor(compression)
        if isinstance(compressor, LocalSGD):
            raise ConfigError(
                "compression",
                compressor.name,
                "does not apply to FSDP2 (local SGD keeps a whole replica of the parameters on every rank and lets "
                "them drift apart between averagings; FSDP2 shards them); use bf16, fp16 or none, or DDP",
            )
        self.balancer = resolve_balancer(balancer)
        self.communication = ShardedCommunication(compressor) if compressor is not None else None
        if self.balancer is not None:
            check(tensor_parallel_size == 1, "tensor_parallel_size", tensor_parallel_size,
                  "must be 1 with a balancer: tensor-parallel ranks share one batch")  # fmt: skip
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs)

    @property
    def compressor(self) -> Compressor | None:
        return self.communication.compressor if self.communication is not None else None

    @override
    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto" and isinstance(self._tensor_parallel_size, int):
            self._data_parallel_size = self.num_processes * self.num_nodes // self._tensor_parallel_size
        super().setup_environment()
        destroy_process_group_at_exit()  # Lightning does this for NCCL only; gloo runs can abort at exit without it
        self.start_balancing()

    @override
    def setup(self, trainer: L.Trainer) -> None:
        super().setup(trainer)
        if self.communication is None and self.balancing is None:
            return
        assert self.model is not None
        modules = fsdp_modules(self.model)
        if self.communication is not None:
            self.communication.register_sharded(self.model)
        if self.balancing is not None:
            if not modules:
                raise ConfigError(
                    "balancer",
                    type(self.balancer).__name__,
                    "found no module sharded by fully_shard in configure_model",
                )
            reduce_scatter = self.communication.reduce_scatter if self.communication is not None else None
            time_sharded_collectives(modules, self.balancing.timer, reduce_scatter)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # Lightning's model summary runs a forward in on_fit_start, before a resumed run loads its checkpoint; FSDP2
        # leaves the root unit gathered after a forward without backward, and loading a sharded state dict into
        # its plain tensors fails (mixed Tensor and DTensor). Resharding first makes resume work with the summary.
        if self.model is not None:
            reshard(self.model)
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    @override
    def timed_parameters(self) -> Iterable[torch.Tensor]:
        return []  # FSDP2 writes sharded gradients itself: no gradient-ready hook fires; backward minus waiting

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        result = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.communication is not None:
            self.communication.end_step()
        return result

"""EfficientDDPStrategy: Lightning's DDP with gradient compression that works on gloo and NCCL and resumes exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_eff.compression import COMPRESSORS, CompressionHook, CompressionStats, Compressor
from lightning_eff.report import ReportSection
from lightning_eff.validation import ConfigError, check_choice

CHECKPOINT_KEY = "lightning_eff_compression"


def _compressor(compression: Compressor | str | None) -> Compressor | None:
    if compression is None or isinstance(compression, Compressor):
        return compression
    check_choice("compression", compression, tuple(COMPRESSORS))
    return COMPRESSORS[compression]()


class EfficientDDPStrategy(DDPStrategy):
    """DDP whose gradient allreduce goes through a compressor, on CPU (gloo) as on GPU (NCCL).

    Lightning's `DDPStrategy` registers comm hooks only on CUDA and never checkpoints their state. This
    strategy registers the compressor's hook on every device and saves each rank's compressor state (error
    feedback differs per rank) in the checkpoint, handing each rank its own back on resume.

    Args:
        compression: a `Compressor` (``PowerSGD(rank=4)``), a registered name (``"powersgd"``), or None
            for plain DDP.
        **kwargs: everything `DDPStrategy` takes (``process_group_backend``, ``find_unused_parameters``, ...).

    Example::

        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=EfficientDDPStrategy(compression=PowerSGD(rank=4)))
    """

    strategy_name = "ddp_efficient"

    def __init__(self, compression: Compressor | str | None = None, **kwargs: Any) -> None:
        if compression is not None and kwargs.get("ddp_comm_hook") is not None:
            raise ConfigError("compression", compression, "cannot be combined with ddp_comm_hook; choose one")
        super().__init__(**kwargs)
        self.compressor = _compressor(compression)
        self.compression_stats = CompressionStats()
        self._hook: CompressionHook | None = None
        self._restored_state: dict[str, Any] | None = None
        self._logged_step = -1

    @override
    def _register_ddp_hooks(self) -> None:
        if self.compressor is None:
            super()._register_ddp_hooks()
            return
        assert isinstance(self.model, DistributedDataParallel)
        self._hook = CompressionHook(
            self.compressor,
            self.compression_stats,
            module=self.model.module,
            sync_timing=self.root_device.type == "cuda",
        )
        if self._restored_state is not None:
            self._hook.load_state_dict(self._restored_state)
            self._restored_state = None
        self.model.register_comm_hook(state=None, hook=self._hook)

    # --- checkpointing: every rank's state, in rank 0's file ------------------------------------------

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        if self._hook is not None:
            states: list[Any] = [None] * self.world_size
            if dist.is_available() and dist.is_initialized():
                dist.all_gather_object(states, self._hook.state_dict())
            else:
                states = [self._hook.state_dict()]
            checkpoint[CHECKPOINT_KEY] = states
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        states = checkpoint.get(CHECKPOINT_KEY)
        if states is None or self.compressor is None:
            return checkpoint
        if len(states) != self.world_size:
            rank_zero_warn(
                f"the checkpoint holds compression state for {len(states)} ranks, this run has {self.world_size}: "
                "error feedback starts from zero"
            )
            return checkpoint
        own = states[self.global_rank]
        if self._hook is not None:
            self._hook.load_state_dict(own)
        else:
            self._restored_state = own
        return checkpoint

    # --- what a user sees -------------------------------------------------------------------------------

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if self._hook is None or trainer is None or not trainer.is_global_zero:
            return
        step = trainer.global_step
        every = getattr(trainer, "log_every_n_steps", 50)  # set by Lightning at init, not declared
        if step == self._logged_step or step % every or self.compression_stats.steps == 0:
            return
        self._logged_step = step
        last = self.compression_stats.last_step
        metrics = {
            "compression/ratio": last.ratio,
            "compression/bytes_sent": float(last.bytes_sent),
            "compression/bytes_dense": float(last.bytes_dense),
            "compression/compress_seconds": last.compress_seconds,
            "compression/communicate_seconds": last.communicate_seconds,
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def report_section(self, trainer: L.Trainer, run_dir: Path) -> ReportSection | None:
        """Bytes a dense allreduce would have sent, bytes sent, and the time compression took."""
        if self._hook is None:
            return None
        total, steps = self.compression_stats.total, max(self.compression_stats.steps, 1)
        summary: dict[str, Any] = {
            "compressor": repr(self.compressor),
            "synchronizing_steps": self.compression_stats.steps,
            "bytes_dense_per_step": total.bytes_dense / steps,
            "bytes_sent_per_step": total.bytes_sent / steps,
            "compression_ratio": total.ratio,
            "bytes_saved_total": total.bytes_dense - total.bytes_sent,
            "compress_seconds_per_step": total.compress_seconds / steps,
            "communicate_seconds_per_step": total.communicate_seconds / steps,
            "nonfinite_buckets": total.nonfinite_buckets,
        }
        return ReportSection(name="communication", summary=summary)


def register_strategies(registry: Any = StrategyRegistry) -> None:
    """Register `ddp_fp16`, `ddp_bf16`, `ddp_powersgd`, `ddp_topk`, `ddp_int8`, `ddp_auto` with Lightning.

    Each name builds a fresh compressor per Trainer (compressors hold per-run state).
    """
    for name in ("fp16", "bf16", "powersgd", "topk", "int8", "auto"):
        if f"ddp_{name}" not in registry:
            registry.register(
                f"ddp_{name}",
                EfficientDDPStrategy,
                description=f"DDP with {name} gradient compression (lightning_eff)",
                compression=name,
            )

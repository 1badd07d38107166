"""EfficientDDPStrategy: Lightning's DDP with gradient compression that works on gloo and NCCL and resumes exactly."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_eff.balancing import BalancedBatchSampler, sample_weight
from lightning_eff.balancing.balancers import CostBalancer, ThroughputBalancer, require_balancer
from lightning_eff.balancing.plot import plot_balance
from lightning_eff.compression import COMPRESSORS, CompressionHook, CompressionStats, Compressor
from lightning_eff.distributed import destroy_process_group_at_exit
from lightning_eff.report import ReportSection
from lightning_eff.tasks.loading import batches_done_this_epoch
from lightning_eff.validation import ConfigError, check_choice

CHECKPOINT_KEY = "lightning_eff_compression"
BALANCER_KEY = "lightning_eff_balancing"


def _compressor(compression: Compressor | str | None) -> Compressor | None:
    if compression is None or isinstance(compression, Compressor):
        return compression
    check_choice("compression", compression, tuple(COMPRESSORS))
    return COMPRESSORS[compression]()


class EfficientDDPStrategy(DDPStrategy):
    """DDP with gradient compression and load balancing, on CPU (gloo) as on GPU (NCCL).

    Lightning's `DDPStrategy` registers comm hooks only on CUDA and never checkpoints their state. This
    strategy registers the compressor's hook on every device and saves each rank's compressor state (error
    feedback differs per rank) in the checkpoint, handing each rank its own back on resume.

    With a balancer, each rank's share of the global batch follows its measured speed: the training
    DataLoader's sampler is replaced (not stacked on Lightning's DistributedSampler) by one that cuts every
    global batch by the current plan, and each rank's loss is weighted by its sample count before backward
    (so before compression and DDP's mean), so the update equals one process training on the whole global batch.
    Each step the balancer is told this rank's own work, none of it waiting in a collective: forward, backward up
    to this rank's last gradient (DDP's allreduce wait comes after it), and the fixed part: the hooks between
    the batch reaching the device and training_step, zero_grad and the optimizer step, and on CPU the CPU time
    gloo's threads spend after the last gradient (see `_balance_after_step`). Not timed: the stretch from the
    end of the optimizer step to the next batch, which holds Lightning's per-step sigterm broadcast (a
    collective) and the data fetch, and everything an accelerator does asynchronously to the host.

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
        if compression is not None and kwargs.get("ddp_comm_hook") is not None:
            raise ConfigError("compression", compression, "cannot be combined with ddp_comm_hook; choose one")
        super().__init__(**kwargs)
        self.compressor = _compressor(compression)
        self.balancer = require_balancer(ThroughputBalancer() if balancer == "throughput" else balancer)
        self._sampler: BalancedBatchSampler | None = None
        self._loss_weight = 1.0
        self._step_samples = 0
        self._step_busy_seconds = 0.0  # forward and backward: grows with the batch
        self._step_fixed_seconds = 0.0  # hooks, zero_grad, optimizer step: does not
        self._batch_ready: float | None = None  # when the training batch reached batch_to_device
        self._collective_seconds = 0.0  # spent in the balancer's re-plan since then: waiting, not work
        self._closure_seconds = 0.0  # forward and backward wall time inside the running optimizer step
        self._grad_ready = 0.0  # when this rank's latest gradient was accumulated
        self._grad_ready_cpu = (0.0, 0.0)  # and this thread's and this process's CPU time then
        self._step_busy_cpu = 0.0  # this thread's CPU time in forward and backward (CPU devices)
        self._step_tail_cpu = 0.0  # this process's CPU time after the last gradient: gloo's own work
        self._grad_hooks: list[RemovableHandle] = []
        self._in_training_step = False
        self._nested = (0.0, 0.0)  # wall and thread CPU of backward and optimizer steps run inside training_step
        self._step_seen = -1
        self._step_started = 0.0  # wall clock at the start of the running optimizer step
        self.compression_stats = CompressionStats()
        self._hook: CompressionHook | None = None
        self._restored_state: dict[str, Any] | None = None
        self._logged_step = -1

    @override
    def setup_distributed(self) -> None:
        super().setup_distributed()
        destroy_process_group_at_exit()  # Lightning does this for NCCL only; gloo runs can abort at exit without it

    @override
    def _register_ddp_hooks(self) -> None:
        if self.compressor is None:
            super()._register_ddp_hooks()  # plain DDP keeps torch's overlapped allreduce
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
        if self.balancer is not None:
            checkpoint[BALANCER_KEY] = self.balancer.state_dict()  # agreed on by all ranks: one copy
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if self.balancer is not None and BALANCER_KEY in checkpoint:
            self.balancer.load_state_dict(checkpoint[BALANCER_KEY])
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

    # --- load balancing ---------------------------------------------------------------------------------

    @override
    def process_dataloader(self, dataloader: object) -> object:
        dataloader = super().process_dataloader(dataloader)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if self.balancer is None or trainer is None or trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        if not isinstance(dataloader, DataLoader) or dataloader.batch_size is None:
            raise ConfigError("balancer", type(self.balancer).__name__, "needs a train DataLoader with a batch_size")
        global_batch = dataloader.batch_size * self.world_size
        plan = self.balancer.setup(global_batch, self.world_size)
        cost = self.balancer.cost
        sampler = BalancedBatchSampler(
            dataset_size=len(dataloader.dataset),  # type: ignore[arg-type]
            global_batch_size=global_batch,
            rank=self.global_rank,
            world_size=self.world_size,
            plan=plan,
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
            cost_fn=cost.cost_of(dataloader.dataset) if cost is not None else None,
        )
        sampler.skip_batches = batches_done_this_epoch(trainer)
        self._sampler = sampler
        return DataLoader(
            dataloader.dataset,
            batch_sampler=sampler,
            collate_fn=dataloader.collate_fn,
            num_workers=dataloader.num_workers,
            pin_memory=dataloader.pin_memory,
        )

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if self._sampler is not None and trainer is not None and trainer.training:
            # after Lightning's per-step sigterm broadcast and the data fetch: the hooks from here to
            # training_step are this rank's own work
            self._batch_ready, self._collective_seconds = time.perf_counter(), 0.0
        return super().batch_to_device(batch, device, dataloader_idx)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._sampler is None:
            return super().training_step(*args, **kwargs)
        # Forward holds no collective, so a rank waiting for a slow peer does not look slow in it. With manual
        # optimization, backward and the optimizer step run inside training_step and are measured on their own.
        started, started_cpu = time.perf_counter(), time.thread_time()
        if self._batch_ready is not None:
            self._step_fixed_seconds += max(started - self._batch_ready - self._collective_seconds, 0.0)
            self._batch_ready = None
        self._in_training_step, self._nested = True, (0.0, 0.0)
        try:
            output = super().training_step(*args, **kwargs)
        finally:
            self._in_training_step = False
        elapsed = time.perf_counter() - started
        self._step_busy_seconds += elapsed - self._nested[0]
        self._step_busy_cpu += time.thread_time() - started_cpu - self._nested[1]
        self._closure_seconds += elapsed
        batch, batch_index = args[0], int(args[1]) if len(args) > 1 else int(kwargs.get("batch_idx", 0))
        samples = extract_batch_size(batch)
        self._step_samples += samples
        self._loss_weight = sample_weight(samples, self._sampler.global_size(batch_index), self.world_size)
        return output

    @override
    def backward(self, closure_loss: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        if self._sampler is None:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        if self._loss_weight != 1.0:
            closure_loss = closure_loss * self._loss_weight  # before DDP's mean and any compression hook
        self._watch_gradients()
        started = self._grad_ready = time.perf_counter()
        started_cpu = time.thread_time()
        output = super().backward(closure_loss, optimizer, *args, **kwargs)
        ended, ended_cpu = time.perf_counter(), time.process_time()
        # Backward's compute ends when this rank's last gradient is accumulated; after that DDP waits for the
        # allreduce of the last buckets, which on a fast rank is mostly waiting for the slow one.
        if self._grad_ready > started:
            self._step_busy_seconds += self._grad_ready - started
            self._step_busy_cpu += self._grad_ready_cpu[0] - started_cpu
            self._step_tail_cpu += ended_cpu - self._grad_ready_cpu[1]
        else:
            self._step_busy_seconds += ended - started
        self._closure_seconds += ended - started
        self._note_nested(started, started_cpu)
        return output

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        if self._sampler is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        started, started_cpu, self._closure_seconds = time.perf_counter(), time.thread_time(), 0.0
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        # What is not forward or backward: zero_grad, clipping, the parameter update. The closure's
        # collectives (DDP's allreduce) are inside backward, so they are not counted here.
        self._step_fixed_seconds += max(time.perf_counter() - started - self._closure_seconds, 0.0)
        self._note_nested(started, started_cpu)
        return output

    def _note_nested(self, started: float, started_cpu: float) -> None:
        """Inside training_step (manual optimization), keep this call's time out of training_step's own."""
        if self._in_training_step:
            wall, cpu = self._nested
            self._nested = (wall + time.perf_counter() - started, cpu + time.thread_time() - started_cpu)

    def _watch_gradients(self) -> None:
        """Note when each parameter's gradient is accumulated (once per run; removed in teardown)."""
        if self._grad_hooks or self.lightning_module is None:
            return

        def ready(_: torch.Tensor) -> None:
            self._grad_ready = time.perf_counter()
            self._grad_ready_cpu = (time.thread_time(), time.process_time())  # the autograd thread, on CPU

        self._grad_hooks = [
            parameter.register_post_accumulate_grad_hook(ready)
            for parameter in self.lightning_module.parameters()
            if parameter.requires_grad
        ]

    @override
    def teardown(self) -> None:
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = []
        super().teardown()

    def _balance_after_step(self, trainer: L.Trainer, step_seconds: float) -> None:
        """Record the finished step's own work and re-plan when due.

        On CPU, gloo's threads do the allreduce's work on the rank's own cores; what they still do after the last
        gradient (on a rank that is not waiting for a peer, the tail of the allreduce) is fixed work that a
        wall-clock timer cannot tell from waiting, but CPU time can: a blocked wait uses none. It is converted to
        wall time at this rank's pace (forward and backward wall time per CPU second of the training thread:
        about 2 on a rank held to half a core), so a slowed rank pays it slowly too.
        """
        assert self.balancer is not None
        fixed = self._step_fixed_seconds
        if self.root_device.type == "cpu" and self._step_busy_cpu > 0:
            fixed += self._step_tail_cpu * self._step_busy_seconds / self._step_busy_cpu
        self.balancer.record(self._step_samples, max(self._step_busy_seconds, 1e-9), fixed, step_seconds)
        self._step_samples, self._step_busy_seconds, self._step_fixed_seconds = 0, 0.0, 0.0
        self._step_busy_cpu, self._step_tail_cpu = 0.0, 0.0
        started = time.perf_counter()
        replanned = self.balancer.maybe_replan(trainer.global_step, self.root_device)
        self._collective_seconds += time.perf_counter() - started  # an all_gather: not this step's work
        if replanned and trainer.is_global_zero:
            stats = self.balancer.stats()
            metrics = {f"balancing/share/rank{r}": share for r, share in enumerate(stats["share"])}
            metrics |= {f"balancing/speed/rank{r}": speed for r, speed in enumerate(stats["speed"])}
            metrics |= {f"balancing/fixed_seconds/rank{r}": fixed for r, fixed in enumerate(stats["fixed_seconds"])}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    @property
    def balance_stats(self) -> dict[str, list[float]]:
        """Per-rank share of the global batch, speed (samples/s of forward and backward), fixed seconds per
        step (hooks, zero_grad, optimizer step) and idle fraction."""
        return self.balancer.stats() if self.balancer is not None else {}

    # --- what a user sees -------------------------------------------------------------------------------

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None:
            return
        step = trainer.global_step
        if self.balancer is not None and step != self._step_seen:
            now = time.perf_counter()
            if self._step_seen >= 0:
                self._balance_after_step(trainer, now - self._step_started)
            self._step_seen, self._step_started = step, now
        if self._hook is None or not trainer.is_global_zero:
            return
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

    def report_section(self, trainer: L.Trainer, run_dir: Path) -> list[ReportSection]:
        """`communication` (bytes dense vs sent, compression time) and `balance` (shares, speeds, plot)."""
        sections = [self._communication_section(), self._balance_section(run_dir)]
        return [section for section in sections if section is not None]

    def _communication_section(self) -> ReportSection | None:
        if self._hook is None or self.compressor is None:
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

    def _balance_section(self, run_dir: Path) -> ReportSection | None:
        if self.balancer is None:
            return None
        stats = self.balancer.stats()
        figure = plot_balance(self.balancer.history, run_dir / "balance.png")
        return ReportSection(
            name="balance",
            summary={"replans": len(self.balancer.history), "global_batch": sum(self.balancer.plan.batch_sizes)},
            rows=[
                {
                    "rank": rank,
                    "batch_size": self.balancer.plan.batch_sizes[rank],
                    "share": stats["share"][rank],
                    "speed_samples_per_s": stats["speed"][rank] if stats["speed"] else float("nan"),
                    "fixed_seconds_per_step": stats["fixed_seconds"][rank] if stats["fixed_seconds"] else float("nan"),
                    "idle_fraction": stats["idle_fraction"][rank] if stats["idle_fraction"] else float("nan"),
                }
                for rank in range(len(self.balancer.plan.batch_sizes))
            ],
            figures=[figure.name] if figure is not None else [],
        )


def register_strategies(registry: Any = StrategyRegistry) -> None:
    """Register `ddp_fp16`, `ddp_bf16`, `ddp_powersgd`, `ddp_topk`, `ddp_int8`, `ddp_auto` and `ddp_balanced`.

    Each name builds a fresh compressor or balancer per Trainer (they hold per-run state).
    """
    if "ddp_balanced" not in registry:
        registry.register(
            "ddp_balanced",
            EfficientDDPStrategy,
            description="DDP with per-rank batch shares from measured speed (lightning_eff)",
            balancer="throughput",
        )
    for name in ("fp16", "bf16", "powersgd", "topk", "int8", "auto"):
        if f"ddp_{name}" not in registry:
            registry.register(
                f"ddp_{name}",
                EfficientDDPStrategy,
                description=f"DDP with {name} gradient compression (lightning_eff)",
                compression=name,
            )

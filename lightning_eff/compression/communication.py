"""CompressedCommunication: what `EfficientDDPStrategy` does with a compressor, one method per strategy hook.

It registers the compressor's comm hook on the DDP model (on gloo as on NCCL: Lightning's `DDPStrategy` does so
on CUDA only), checkpoints every rank's compressor state in rank 0's file (error feedback differs per rank) and
hands each rank its own back on resume, logs what each step sent and reports the run's totals.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_eff.compression import COMPRESSION_CHOICES, Compressor
from lightning_eff.compression.hooks import CompressionHook
from lightning_eff.compression.local_sgd import LocalSGD, LocalSGDRun
from lightning_eff.compression.stats import CompressionStats
from lightning_eff.report import ReportSection
from lightning_eff.validation import ConfigError, check_choice

CHECKPOINT_KEY = "lightning_eff_compression"  # a list: each rank's compressor state, in rank order
REPLICAS_KEY = "lightning_eff_local_sgd_replicas"  # a list: each rank's model and optimizer state, in rank order


def resolve_compressor(value: Compressor | str | None) -> Compressor | None:
    """A compressor, or a new one of a registered name (``"powersgd"``); None stays None."""
    if value is None or isinstance(value, Compressor):
        return value
    if isinstance(value, type):  # the class itself, e.g. compression=PowerSGD
        raise ConfigError("compression", value.__name__, f"is a class; pass an instance, e.g. {value.__name__}()")
    check_choice("compression", value, tuple(COMPRESSION_CHOICES))
    return COMPRESSION_CHOICES[value]()


def gather_from_every_rank(state: Any, world_size: int) -> list[Any]:
    """Every rank's `state`, in rank order (a collective: every rank calls it); ``[state]`` without a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: list[Any] = [None] * world_size
    dist.all_gather_object(states, state)
    return states


class CompressedCommunication:
    """A compressor's comm hook for one DDP run, its per-rank checkpoint state, its metrics and report section."""

    def __init__(self, compressor: Compressor, overlap: bool = False) -> None:
        self.compressor = compressor
        self.overlap = overlap  # CompressionHook(overlap=...): faster on slow links, not bit-reproducible
        self.stats = CompressionStats()
        self.hook: CompressionHook | None = None
        self._restored_state: dict[str, Any] | None = None  # loaded before the hook exists
        self._logged_step = -1
        self._warmup_checked = False
        self._start_logged = False

    @property
    def registered(self) -> bool:
        """Whether the compressor is in place (its hook registered), so there is traffic to log and report."""
        return self.hook is not None

    def register(
        self,
        model: DistributedDataParallel,
        sync_timing: bool,
        waiting: Callable[[], AbstractContextManager[object]] | None = None,
    ) -> None:
        """Register the hook on `model`, with this rank's restored state if a checkpoint was loaded first;
        `waiting`: see `CompressionHook`."""
        self.hook = CompressionHook(
            self.compressor,
            self.stats,
            module=model.module,
            sync_timing=sync_timing,
            overlap=self.overlap,
            waiting=waiting,
        )
        if self._restored_state is not None:
            self.hook.load_state_dict(self._restored_state)
            self._restored_state = None
        model.register_comm_hook(state=None, hook=self.hook)

    def gather_state(self, world_size: int) -> list[Any] | None:
        """Every rank's hook state, in rank order (a collective: every rank calls it); None before the hook."""
        return None if self.hook is None else gather_from_every_rank(self.hook.state_dict(), world_size)

    def restore_state(self, states: list[Any], rank: int, world_size: int) -> None:
        """Take this rank's state from a checkpoint's list; a list for another world size starts from zero."""
        if len(states) != world_size:
            rank_zero_warn(
                f"the checkpoint holds compression state for {len(states)} ranks, this run has {world_size}: "
                "error feedback starts from zero"
            )
            return
        if self.hook is not None:
            self.hook.load_state_dict(states[rank])
        else:
            self._restored_state = states[rank]

    def check_warmup(self, planned_steps: float) -> None:
        """Warn when the compressor's dense warm-up covers every step this run plans (it would never compress).

        The warm-up stays absolute (PowerSGD's ``start_step``, 100 by default, as torch's hook): a step count
        relative to the run would change what a resumed or extended run does. Torch suggests about 10% of the
        run's steps; the warning says so with this run's numbers.
        """
        start = self.compressor.compress_from
        argument = getattr(self.compressor, "warmup_argument", "start_step")  # LocalSGD's is warmup_steps
        if 0 < planned_steps < float("inf") and start >= planned_steps:
            rank_zero_warn(
                f"compression: {self.compressor!r} sends every step dense until step {start}, but this run plans "
                f"{int(planned_steps)} optimizer steps, so it will never compress; lower {argument} (e.g. "
                f"{max(2, int(planned_steps) // 10)}, 10% of the run, as torch suggests) or train longer"
            )

    def log_metrics(self, trainer: L.Trainer) -> None:
        """The last step's bytes and seconds as `compression/*`, every `log_every_n_steps` (global rank 0), and
        once, ``compression/started_at_step``: the first step that sent fewer bytes than dense."""
        step = trainer.global_step
        every = getattr(trainer, "log_every_n_steps", 50)  # set by Lightning at init, not declared
        if not self._warmup_checked:
            self._warmup_checked = True
            self.check_warmup(trainer.estimated_stepping_batches)
        if not self.registered or not trainer.is_global_zero:
            return
        if self.stats.first_compressed_step is not None and not self._start_logged:
            self._start_logged = True
            for logger in trainer.loggers:
                logger.log_metrics({"compression/started_at_step": float(self.stats.first_compressed_step)}, step=step)
        if step == self._logged_step or step % every or self.stats.steps == 0:
            return
        self._logged_step = step
        last = self.stats.last_step
        metrics = {
            "compression/ratio": last.ratio,
            "compression/total_ratio": self.stats.total.ratio,  # the run so far: local SGD's steps alternate
            "compression/bytes_sent": float(last.bytes_sent),
            "compression/bytes_dense": float(last.bytes_dense),
            "compression/compress_seconds": last.compress_seconds,
            "compression/communicate_seconds": last.communicate_seconds,
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def report_section(self) -> ReportSection | None:
        """`communication`: bytes a dense allreduce would have sent vs bytes sent, and the time it took."""
        if not self.registered:
            return None
        total, steps = self.stats.total, max(self.stats.steps, 1)
        summary: dict[str, Any] = {
            "compressor": repr(self.compressor),
            "synchronizing_steps": self.stats.steps,
            "compressed_from_step": self.stats.first_compressed_step,  # None: every step went dense
            "bytes_dense_per_step": total.bytes_dense / steps,
            "bytes_sent_per_step": total.bytes_sent / steps,
            "compression_ratio": total.ratio,
            "bytes_saved_total": total.bytes_dense - total.bytes_sent,
            "compress_seconds_per_step": total.compress_seconds / steps,
            "communicate_seconds_per_step": total.communicate_seconds / steps,
            "nonfinite_buckets": total.nonfinite_buckets,
        }
        return ReportSection(name="communication", summary=summary)


def make_communication(compressor: Compressor, overlap: bool = False) -> CompressedCommunication:
    """What `EfficientDDPStrategy` runs for `compressor`: `LocalSGDCommunication` for `LocalSGD`, else a comm hook
    (overlapped with the backward pass when `overlap`)."""
    if isinstance(compressor, LocalSGD):
        return LocalSGDCommunication(compressor)
    return CompressedCommunication(compressor, overlap=overlap)


class LocalSGDCommunication(CompressedCommunication):
    """`LocalSGD` in a DDP run: torch's post-local SGD hook and averager (`LocalSGDRun`), their step counters in
    the checkpoint, and every rank's own parameters and optimizer state beside them.

    Between averagings the ranks' parameters and optimizer states differ, and Lightning saves rank 0's only; so
    every rank's copy goes into rank 0's file (`REPLICAS_KEY`: world_size times the model and optimizer state)
    and each rank loads its own on resume, which continues exactly where the run stopped. Lightning restores the
    model before wrapping it in DDP, whose constructor then broadcasts rank 0's parameters; so `register` (after
    the wrap) loads this rank's parameters again.
    """

    def __init__(self, compressor: LocalSGD) -> None:
        super().__init__(compressor)
        self.local_sgd = compressor
        self.run: LocalSGDRun | None = None
        self._replica: dict[str, Any] | None = None  # this rank's parameters from a checkpoint, until the DDP wrap

    @property
    def registered(self) -> bool:
        return self.run is not None

    def register(
        self,
        model: DistributedDataParallel,
        sync_timing: bool,
        waiting: Callable[[], AbstractContextManager[object]] | None = None,
    ) -> None:
        """Register torch's post-local SGD hook (counted) on `model` and build the averager. `waiting` is unused:
        torch's hook returns its allreduce's future, so backward never blocks in it."""
        self.run = LocalSGDRun(self.local_sgd, self.stats)
        if self._replica is not None:  # DDP's constructor broadcast rank 0's parameters over this rank's own
            model.module.load_state_dict(self._replica, strict=getattr(model.module, "strict_loading", True))
            self._replica = None
        if self._restored_state is not None:
            self.run.load_state_dict(self._restored_state)
            self._restored_state = None
        model.register_comm_hook(state=self.run.state, hook=self.run.hook)

    def gather_state(self, world_size: int) -> list[Any] | None:
        return None if self.run is None else gather_from_every_rank(self.run.state_dict(), world_size)

    def restore_state(self, states: list[Any], rank: int, world_size: int) -> None:
        state = states[rank] if len(states) == world_size else states[0]  # the counters agree across ranks
        if self.run is not None:
            self.run.load_state_dict(state)
        else:
            self._restored_state = state

    def after_optimizer_step(self, optimizer: Optimizer) -> None:
        """Average the parameters when due (every rank, right after its optimizer step)."""
        if self.run is not None:
            self.run.after_optimizer_step(optimizer)

    def average_at_end(self, optimizer: Optimizer) -> None:
        """Average once more at the end of training, so the model tested and saved is the ranks' consensus."""
        if self.run is not None:
            self.run.average_now(optimizer)

    def gather_replicas(self, checkpoint: dict[str, Any], world_size: int) -> None:
        """Put every rank's model and optimizer state into `checkpoint` (a collective: every rank calls it)."""
        own = move_data_to_device(
            {"state_dict": checkpoint.get("state_dict"), "optimizer_states": checkpoint.get("optimizer_states")},
            torch.device("cpu"),
        )
        replicas: list[Any] = [None] * world_size
        if dist.is_available() and dist.is_initialized():
            dist.all_gather_object(replicas, own)
        else:
            replicas = [own]
        checkpoint[REPLICAS_KEY] = replicas

    def restore_replica(self, checkpoint: dict[str, Any], rank: int, world_size: int) -> None:
        """Make `checkpoint`'s model and optimizer state this rank's own, before Lightning loads them."""
        replicas = checkpoint.get(REPLICAS_KEY)
        if replicas is None:
            return
        if len(replicas) != world_size:
            rank_zero_warn(
                f"the checkpoint holds local SGD replicas for {len(replicas)} ranks, this run has {world_size}: "
                "every rank starts from rank 0's parameters and optimizer state"
            )
            return
        for key in ("state_dict", "optimizer_states"):
            if replicas[rank][key] is not None:
                checkpoint[key] = replicas[rank][key]
        self._replica = replicas[rank]["state_dict"] if self.run is None else None

    def report_section(self) -> ReportSection | None:
        """The `communication` section plus local SGD's own figures: when it started and how often it averaged."""
        section = super().report_section()
        if section is None or self.run is None:
            return section
        warmup, period = self.local_sgd.warmup_steps, self.local_sgd.period
        averages = max(0, -(-(self.run.step - warmup) // period))
        section.summary.update(
            local_sgd_from_step=self.stats.first_compressed_step,  # None: warm-up covered the run
            period=period,
            parameter_averages=averages,
            averaged_at_end=self.run.averaged_last_step,
        )
        return section

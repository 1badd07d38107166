"""BalancedTraining: what `EfficientDDPStrategy` does with a balancer, one method per strategy hook.

It swaps the training loader's sampler for one that cuts every global batch by the current plan (replacing
Lightning's DistributedSampler, not stacking on it), weights each rank's loss by its sample count before
backward (so before compression and DDP's mean: the update equals one process training on the whole global
batch), times each step (`StepTimer`) and hands the measurements to the balancer, which re-plans when due.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.data import extract_batch_size
from torch.utils.data import DataLoader

from lightning_eff.balancing.balancers import ThroughputBalancer
from lightning_eff.balancing.plot import plot_balance
from lightning_eff.balancing.sampler import BalancedBatchSampler
from lightning_eff.balancing.step_timer import StepTimer
from lightning_eff.balancing.weighting import sample_weight
from lightning_eff.report import ReportSection
from lightning_eff.resume import batches_done_this_epoch
from lightning_eff.validation import ConfigError

CHECKPOINT_KEY = "lightning_eff_balancing"  # the balancer's plan and estimates, agreed on by all ranks: one copy


class BalancedTraining:
    """Per-rank batch shares from measured speed, for one run of a DDP strategy.

    Args:
        balancer: plans the shares from the measurements.
        cpu_device: the ranks compute on the CPU (gloo's work is then measured in CPU time, see `StepTimer`).
    """

    def __init__(self, balancer: ThroughputBalancer, cpu_device: bool) -> None:
        self.balancer = balancer
        self.timer = StepTimer(cpu_device)
        self.sampler: BalancedBatchSampler | None = None
        self.loss_weight = 1.0

    @property
    def active(self) -> bool:
        """Whether a training loader has been balanced (until then every hook passes through)."""
        return self.sampler is not None

    def balanced_loader(self, dataloader: object, trainer: L.Trainer, rank: int, world_size: int) -> DataLoader:
        """The training loader rebuilt around a `BalancedBatchSampler`, resuming mid-epoch where fit stopped."""
        if not isinstance(dataloader, DataLoader) or dataloader.batch_size is None:
            raise ConfigError("balancer", type(self.balancer).__name__, "needs a train DataLoader with a batch_size")
        global_batch = dataloader.batch_size * world_size
        cost = self.balancer.cost
        self.sampler = BalancedBatchSampler(
            dataset_size=len(dataloader.dataset),  # type: ignore[arg-type]
            global_batch_size=global_batch,
            rank=rank,
            world_size=world_size,
            plan=self.balancer.setup(global_batch, world_size),
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
            cost_fn=cost.cost_of(dataloader.dataset) if cost is not None else None,
        )
        self.sampler.skip_batches = batches_done_this_epoch(trainer)
        return DataLoader(
            dataloader.dataset,
            batch_sampler=self.sampler,
            collate_fn=dataloader.collate_fn,
            num_workers=dataloader.num_workers,
            pin_memory=dataloader.pin_memory,
        )

    def note_batch(self, args: tuple[Any, ...], kwargs: dict[str, Any], world_size: int) -> int:
        """Set the loss weight for training_step's batch; returns its sample count."""
        assert self.sampler is not None
        batch, batch_index = args[0], int(args[1]) if len(args) > 1 else int(kwargs.get("batch_idx", 0))
        samples = extract_batch_size(batch)
        self.loss_weight = sample_weight(samples, self.sampler.global_size(batch_index), world_size)
        return samples

    def weighted(self, loss: Any) -> Any:
        """This rank's loss scaled by its share of the global batch, before DDP's mean and any compression hook."""
        return loss * self.loss_weight if self.loss_weight != 1.0 else loss

    def on_step_start(self, trainer: L.Trainer, device: torch.device) -> None:
        """Hand the finished step's measurement to the balancer and re-plan when due (a collective)."""
        measurement = self.timer.finish_step(trainer.global_step)
        if measurement is None:
            return
        self.balancer.record(
            measurement.samples, measurement.busy_seconds, measurement.fixed_seconds, measurement.step_seconds
        )
        with self.timer.collective():
            replanned = self.balancer.maybe_replan(trainer.global_step, device)
        if replanned and trainer.is_global_zero:
            log_balance(trainer, self.balancer.stats())

    def report_section(self, run_dir: Path) -> ReportSection:
        """`balance`: the plan, each rank's share, speed, fixed seconds and idle fraction, and `balance.png`."""
        stats = self.balancer.stats()
        sizes = self.balancer.plan.batch_sizes
        figure = plot_balance(self.balancer.history, run_dir / "balance.png")

        def per_rank(key: str, rank: int) -> float:
            return stats[key][rank] if stats[key] else float("nan")

        return ReportSection(
            name="balance",
            summary={"replans": len(self.balancer.history), "global_batch": sum(sizes)},
            rows=[
                {
                    "rank": rank,
                    "batch_size": sizes[rank],
                    "share": stats["share"][rank],
                    "speed_samples_per_s": per_rank("speed", rank),
                    "fixed_seconds_per_step": per_rank("fixed_seconds", rank),
                    "idle_fraction": per_rank("idle_fraction", rank),
                }
                for rank in range(len(sizes))
            ],
            figures=[figure.name] if figure is not None else [],
        )


def log_balance(trainer: L.Trainer, stats: dict[str, list[float]]) -> None:
    """Each rank's share, speed and fixed seconds to every logger, as `balancing/<what>/rank<r>`."""
    metrics = {
        f"balancing/{what}/rank{rank}": value
        for what in ("share", "speed", "fixed_seconds")
        for rank, value in enumerate(stats[what])
    }
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)

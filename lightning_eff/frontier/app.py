"""What the `lightning-eff` app calls in a frontier sweep: the trial's callback, and the objectives it returns."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from lightning_eff.frontier.callback import FrontierTrial
from lightning_eff.frontier.objectives import read_objectives
from lightning_eff.frontier.trial import current_trial


def in_frontier_sweep(cfg: DictConfig) -> bool:
    """Whether this run is a job of `hydra/sweeper=frontier` (whose config adds the `frontier` node)."""
    return cfg.get("frontier") is not None


def frontier_callbacks(cfg: DictConfig, run_dir: Path) -> list[L.Callback]:
    """`FrontierTrial` for a frontier sweep's job (early stopping through the study, the exported bytes); else none.

    With ``frontier.early_stopping=false`` every trial runs to the end (the grid baseline of the benchmark).
    """
    if not in_frontier_sweep(cfg):
        return []
    settings = cfg.frontier
    return [
        FrontierTrial(
            current_trial(cfg) if settings.early_stopping else None,
            monitor=settings.monitor,
            direction=settings.monitor_direction,
            min_delta=settings.min_delta,
            warmup_steps=settings.warmup_steps,
            run_dir=run_dir,
        )
    ]


def objectives_for_sweep(cfg: DictConfig, run_dir: Path) -> list[float] | None:
    """The task function's return value: quality, model bytes, step time for the Optuna sweeper; None otherwise."""
    if not in_frontier_sweep(cfg) or not (run_dir / "report.json").is_file():
        return None
    return read_objectives(run_dir, cfg.frontier.quality).as_list()

"""What the `lightning-eff` app calls in a frontier sweep: the trial's callback, and the objectives it returns."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lightning_eff.checkpoints import atomic_write_text
from lightning_eff.frontier.callback import FrontierTrial
from lightning_eff.frontier.objectives import read_objectives
from lightning_eff.frontier.repeats import JOB_ATTR, REPEAT_NAME, decides_alone, find_repeat
from lightning_eff.frontier.trial import current_trial
from lightning_eff.validation import check_bool, check_choice


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
    check_choice("frontier.quality_direction", settings.quality_direction, ("minimize", "maximize"))
    check_bool("frontier.early_stopping", settings.early_stopping)
    check_bool("frontier.skip_repeats", settings.get("skip_repeats", True))
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


def answer_repeat(cfg: DictConfig, run_dir: Path) -> list[float] | None:
    """For a job that repeats a finished trial's configuration: that trial's objectives, without training.

    A repeat of a trial stopped early is stopped the same way (`optuna.TrialPruned`); anything else returns None
    and the job trains. Either way the job records its directory in the study (`repeats.JOB_ATTR`). See
    `repeats` for why, and for which jobs do not check (``frontier.skip_repeats=false`` turns it off).
    """
    if not in_frontier_sweep(cfg) or not cfg.frontier.get("skip_repeats", True):
        return None
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and decides_alone()):
        return None  # a rank that Lightning started for this job, or one of several SLURM tasks
    handle = current_trial(cfg)
    if handle is None:
        return None
    handle.set_attr(JOB_ATTR, run_dir.name)
    repeat = find_repeat(handle)
    if repeat is None:
        return None
    record = {"repeat_of_trial": repeat.trial, "job": repeat.job, "values": repeat.values, "stopped": repeat.stopped}
    atomic_write_text(run_dir / REPEAT_NAME, json.dumps(record) + "\n")
    where = f" (job {repeat.job})" if repeat.job is not None else ""
    if repeat.values is None:
        import optuna

        raise optuna.TrialPruned(
            f"frontier: trial {handle.number} repeats trial {repeat.trial}{where}, which was stopped early; "
            "stopped the same way without training"
        )
    print(f"frontier: trial {handle.number} repeats trial {repeat.trial}{where}; its objectives {repeat.values} "
          "are reused without training")  # fmt: skip
    return repeat.values

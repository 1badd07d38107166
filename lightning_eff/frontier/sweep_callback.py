"""The Hydra callback of `hydra/sweeper=frontier`: the sweep directory before the study, the report after it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lightning_eff.frontier.report import write_frontier


class FrontierSweep(Callback):
    """Creates the sweep directory (the SQLite study lives there, and Optuna opens it before any job has run)
    and, when the sweep ends, prints and writes the frontier report (`report.write_frontier`)."""

    def __init__(self) -> None:
        # Optuna's RDB storage imports alembic, whose plugin setup logs a line per plugin at INFO under Hydra's
        # logging config: a screenful before the first trial.
        logging.getLogger("alembic").setLevel(logging.WARNING)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        _, text = write_frontier(sweep_dir, config.frontier.quality, config.frontier.quality_direction)
        print(text)

"""`FrontierTrial`: the app's side of a frontier sweep (early stopping, and the exported model's bytes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_eff.checkpoints import atomic_write_text
from lightning_eff.frontier.repeats import STOPPED_ATTR
from lightning_eff.frontier.stopping import Progress, dominating_trial
from lightning_eff.frontier.trial import TrialHandle
from lightning_eff.pruning.sparse_format import packed_state_bytes, save_sparse
from lightning_eff.quantization import QuantizationAwareTraining
from lightning_eff.quantization.convert import convert
from lightning_eff.report import ReportSection
from lightning_eff.sharding import is_sharded
from lightning_eff.validation import ConfigError, check, check_choice, check_int, check_number

EXPORT_NAME = "model.sparse.pt"
STOPPED_NAME = "frontier_stopped.json"


def export_state(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
    """The weights a frontier trial ships: the converted low-bit model after QAT, else the trained float one.

    Mid-run (no converted model yet) a QAT run is converted on a copy, so the bytes seen while training are
    those its export would have. Pruned zeros count as `sparse_format` stores them (bitmap plus values).
    """
    qat = next((c for c in trainer.callbacks if isinstance(c, QuantizationAwareTraining)), None)  # type: ignore[attr-defined]
    if qat is not None and qat.quantized_model is not None:
        model: torch.nn.Module = qat.quantized_model
    elif qat is not None and not is_sharded(pl_module):
        model = convert(pl_module)
    else:
        model = pl_module
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


class FrontierTrial(L.Callback):
    """Stops a dominated trial early and reports the size on disk of the model the trial would ship.

    At every validation (after the sanity check) rank 0 records the trial's step, validation metric and
    current model bytes in the sweep's Optuna storage, and stops the trial (raising `optuna.TrialPruned` on
    every rank) when another trial was better at the same step with no more bytes (`stopping.py`). Without a
    trial (a run outside a sweep, or a sweeper without storage) it only reports. At the end it writes
    `model.sparse.pt` (`sparse_format`: the converted model after QAT, bitmap-packed where pruned) into the run
    directory and reports its bytes in a `frontier` section, the sweep's size objective.

    Args:
        trial: the Optuna trial of this job (`trial.current_trial`), or None.
        monitor: the validation metric to compare (``val_loss``).
        direction: ``minimize`` or ``maximize`` for `monitor`.
        min_delta: how much better (relative) another trial must be to stop this one.
        warmup_steps: no stopping before this optimizer step.
        run_dir: where the stop is recorded (`frontier_stopped.json`) for the frontier report.
    """

    def __init__(
        self,
        trial: TrialHandle | None,
        monitor: str = "val_loss",
        direction: str = "minimize",
        min_delta: float = 0.01,
        warmup_steps: int = 0,
        run_dir: Path | None = None,
    ) -> None:
        check_choice("frontier.monitor_direction", direction, ("minimize", "maximize"))
        check_number("frontier.min_delta", min_delta, "must be a number >= 0", lambda delta: delta >= 0)
        check_int("frontier.warmup_steps", warmup_steps, 0)
        check(isinstance(monitor, str) and monitor != "", "frontier.monitor", monitor, "must name a logged metric")
        self.trial = trial
        self.monitor = monitor
        self.direction = direction
        self.min_delta = min_delta
        self.warmup_steps = warmup_steps
        self.run_dir = run_dir
        self.history: list[Progress] = []

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.trial is None:
            return
        stopped_by: int | None = None
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                names = ", ".join(sorted(trainer.callback_metrics))
                raise ConfigError("frontier.monitor", self.monitor, f"not logged at validation; logged: {names}")
            model_bytes = float(packed_state_bytes(export_state(trainer, pl_module)))
            progress = Progress(trainer.global_step, float(value), model_bytes)
            self.history.append(progress)
            self.trial.record(progress)
            if progress.step >= self.warmup_steps:
                stopped_by = dominating_trial(progress, self.trial.others(), self.direction, self.min_delta)
            if stopped_by is not None:
                record = {"step": progress.step, self.monitor: progress.quality, "dominated_by_trial": stopped_by}
                self.trial.set_attr(STOPPED_ATTR, record)  # a later repeat of this configuration stops too
                if self.run_dir is not None:
                    atomic_write_text(self.run_dir / STOPPED_NAME, json.dumps(record) + "\n")
        stopped_by = trainer.strategy.broadcast(stopped_by, src=0)
        if stopped_by is not None:
            if not trainer.is_global_zero:
                # This rank's process exists for this trial only: it ends quietly, since a failed rank makes
                # Lightning's launcher on rank 0 kill that process, which may be the sweep's. Rank 0 tells the sweeper.
                raise SystemExit(0)
            import optuna

            message = (
                f"frontier: trial {self.trial.number} stopped at step {trainer.global_step}: trial {stopped_by} "
                f"had a better {self.monitor} at that step with no more model bytes"
            )
            rank_zero_info(message)
            raise optuna.TrialPruned(message)

    def report_section(self, trainer: L.Trainer, run_dir: Path) -> ReportSection:
        """Writes the exported model and reports its bytes on disk: the sweep's size objective."""
        path = save_sparse(export_state(trainer, trainer.lightning_module), run_dir / EXPORT_NAME)
        summary: dict[str, Any] = {
            "model_bytes_on_disk": path.stat().st_size,
            "export": EXPORT_NAME,
            "trial": None if self.trial is None else self.trial.number,
            "monitor": self.monitor,
        }
        rows = [{"step": p.step, self.monitor: p.quality, "model_bytes": p.model_bytes} for p in self.history]
        return ReportSection(name="frontier", summary=summary, rows=rows)

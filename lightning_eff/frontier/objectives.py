"""The three objectives of a frontier sweep, read from one run's `report.json`.

Quality is a figure of the report's `run` section (``test_loss`` by default), model bytes are the size on disk
of the exported model that `FrontierTrial` writes (its `frontier` section), and step time is the training
time per optimizer step of one process. Reading them from the report, not from live objects, means the
sweeper, the frontier report and `lightning-eff-frontier` all agree on what a trial scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_eff.validation import ConfigError


@dataclass(frozen=True)
class Objectives:
    """What one finished trial scored."""

    quality: float
    model_bytes: float
    step_seconds: float

    def as_list(self) -> list[float]:
        """In the order of the sweeper's `direction` list: quality, bytes, step time."""
        return [self.quality, self.model_bytes, self.step_seconds]


def objectives_from_report(report: dict[str, Any], quality: str) -> Objectives:
    """The objectives in a parsed `report.json`; `quality` names a figure of its `run` section."""
    run = report["run"]["summary"]
    if quality not in run:
        figures = ", ".join(sorted(key for key, value in run.items() if isinstance(value, (int, float))))
        raise ConfigError("frontier.quality", quality, f"not in the report's run section; it has {figures}")
    model_bytes = report.get("frontier", {}).get("summary", {}).get("model_bytes_on_disk")
    if model_bytes is None:  # a run without FrontierTrial (a plain multirun): the float weights
        model_bytes = run["model_size_bytes"]
    steps = max(int(run["global_step"]), 1) * max(int(run["world_size"]), 1)
    return Objectives(
        quality=float(run[quality]),
        model_bytes=float(model_bytes),
        step_seconds=float(run["train_step_seconds"]) / steps,
    )


def read_objectives(run_dir: Path, quality: str) -> Objectives:
    """The objectives of the run whose report is `run_dir/report.json`."""
    report = json.loads((run_dir / "report.json").read_text())
    return objectives_from_report(report, quality)

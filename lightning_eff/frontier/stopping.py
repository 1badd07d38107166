"""When to stop a frontier trial early: another trial was better at the same step with no more bytes.

Optuna's pruners rank trials by one value, and Optuna refuses `Trial.report` in a multi-objective study. A rule
on quality alone would stop exactly the small models a frontier is for, since they score worse. So a trial is
stopped when, at the same optimizer step, some other trial had a better validation metric (by more than
`min_delta`, relative) and its model took no more bytes: the trial is dominated on the objectives that can be
seen mid-run, and pruning schedules that share a step count keep that order to the end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """One trial at one validation: its optimizer step, validation metric and current model bytes."""

    step: int
    quality: float
    model_bytes: float


def dominating_trial(
    progress: Progress,
    others: Mapping[int, Sequence[Progress]],
    direction: str,
    min_delta: float,
) -> int | None:
    """The number of a trial that beat `progress` at its step (better quality, no more bytes), or None.

    Args:
        progress: this trial's latest validation.
        others: every other trial's validations, by trial number.
        direction: ``minimize`` (a loss) or ``maximize`` (an accuracy) for the quality.
        min_delta: how much better, relative to this trial's value, the other must be (noise margin).
    """
    margin = abs(progress.quality) * min_delta
    for number, history in others.items():
        for other in history:
            if other.step != progress.step or other.model_bytes > progress.model_bytes:
                continue
            gain = progress.quality - other.quality if direction == "minimize" else other.quality - progress.quality
            if gain > margin:
                return number
    return None

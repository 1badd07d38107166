"""Repeated configurations in a frontier sweep: answered from the earlier trial, not trained again.

Optuna's samplers draw from a small categorical space (5 sparsities x 2 granularities x 5 schemes) with
replacement, so a 20-trial sweep draws some configurations twice or more; training is deterministic (seeded), so
a repeat would spend a whole trial to learn what the study already knows. Before training, a job compares its
sampled parameters with every finished trial of the study: a repeat of a complete trial returns that trial's
objectives, and a repeat of a trial stopped early is stopped the same way (it would follow the same curve and
meet the same better trial). Failed trials are not repeats: they may have failed for reasons that are gone.

Only a job that decides alone checks: one process, or rank 0 before it starts the others (Lightning's DDP
launcher). A job that SLURM (or torchrun) starts as several tasks at once trains even when it repeats a
trial, since its tasks would first have to agree on the answer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from lightning_eff.frontier.trial import TRIAL_KEY, TrialHandle

REPEAT_NAME = "frontier_repeat.json"  # in a repeat's job directory: which trial it repeats, and that one's results
STOPPED_ATTR = "frontier_stopped"  # user attribute of a trial FrontierTrial stopped: {"step", "dominated_by_trial"}
JOB_ATTR = "frontier_job"  # user attribute: the trial's job directory name, to say where its results are


@dataclass(frozen=True)
class Repeat:
    """The earlier trial this one repeats, and how that trial ended."""

    trial: int
    job: str | None
    values: list[float] | None  # its objectives when it completed
    stopped: dict[str, Any] | None  # its stop record when it was stopped early


def decides_alone() -> bool:
    """Whether this process can answer for the whole job (no other task of it is running yet)."""
    started_by_launcher = any(name in os.environ for name in ("LOCAL_RANK", "RANK"))
    tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    return not started_by_launcher and tasks <= 1


def find_repeat(handle: TrialHandle) -> Repeat | None:
    """The earliest finished trial of the study with this trial's parameters, if it completed or was stopped."""
    import optuna

    storage, study_id, trial_id = handle._open()
    own = _configuration(storage.get_trial(trial_id).params)
    for trial in storage.get_all_trials(study_id, deepcopy=False):
        if trial.number == handle.number or _configuration(trial.params) != own:
            continue
        job = trial.user_attrs.get(JOB_ATTR)
        if trial.state == optuna.trial.TrialState.COMPLETE:
            return Repeat(trial.number, job, list(trial.values), None)
        if STOPPED_ATTR in trial.user_attrs:
            return Repeat(trial.number, job, None, dict(trial.user_attrs[STOPPED_ATTR]))
    return None


def _configuration(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled parameters without its own number (which `pass_trial_number` adds to every trial)."""
    return {name: value for name, value in params.items() if name != TRIAL_KEY}

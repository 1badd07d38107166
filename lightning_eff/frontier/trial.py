"""The Optuna trial a job of a frontier sweep belongs to, found through the shared storage.

hydra-optuna-sweeper passes a trial only its sampled parameters as overrides, and under the submitit/SLURM
launchers the job is another process (another machine) than the sweeper, so the job cannot be handed the trial
object. Instead the sweeper's `custom_search_space` hook (`pass_trial_number`) adds ``frontier.trial=<number>``
to the overrides, and the job opens the study by the sweeper's own `storage` and `study_name`
(``hydra.sweeper.*``, part of every job's config). Intermediate results go to the storage, where every other
job can read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lightning_eff.frontier.stopping import Progress

TRIAL_KEY = "frontier.trial"
HISTORY_ATTR = "frontier_progress"


def pass_trial_number(config: DictConfig, trial: Any) -> None:
    """hydra-optuna-sweeper's `custom_search_space` hook: adds ``frontier.trial=<number>`` to the trial's overrides.

    A one-value integer range is never sampled (Optuna returns the value as it is), so samplers are unaffected.
    """
    trial.suggest_int(TRIAL_KEY, trial.number, trial.number)


@dataclass(frozen=True)
class TrialHandle:
    """Where one trial lives: the storage URL, the study's name and the trial's number."""

    storage: str
    study_name: str
    number: int

    def _open(self) -> tuple[Any, int, int]:
        import optuna

        storage = optuna.storages.get_storage(self.storage)
        study_id = storage.get_study_id_from_name(self.study_name)
        return storage, study_id, storage.get_trial_id_from_study_id_trial_number(study_id, self.number)

    def record(self, progress: Progress) -> None:
        """Store one validation: as the trial's intermediate value (shown by Optuna's tools) and in its history."""
        storage, _, trial_id = self._open()
        storage.set_trial_intermediate_value(trial_id, progress.step, progress.quality)
        history = storage.get_trial(trial_id).user_attrs.get(HISTORY_ATTR, [])
        history.append([progress.step, progress.quality, progress.model_bytes])
        storage.set_trial_user_attr(trial_id, HISTORY_ATTR, history)

    def set_attr(self, name: str, value: Any) -> None:
        """Store a JSON-able `value` as the trial's user attribute `name` (read by other jobs and Optuna's tools)."""
        storage, _, trial_id = self._open()
        storage.set_trial_user_attr(trial_id, name, value)

    def others(self) -> dict[int, list[Progress]]:
        """Every other trial's recorded validations, by trial number."""
        storage, study_id, _ = self._open()
        return {
            trial.number: [Progress(int(s), float(q), float(b)) for s, q, b in trial.user_attrs.get(HISTORY_ATTR, [])]
            for trial in storage.get_all_trials(study_id, deepcopy=False)
            if trial.number != self.number
        }


def current_trial(cfg: DictConfig) -> TrialHandle | None:
    """This job's trial, when it runs in a frontier sweep whose sweeper has a storage; else None."""
    number = OmegaConf.select(cfg, TRIAL_KEY)
    if number is None or not HydraConfig.initialized():
        return None
    sweeper = HydraConfig.get().sweeper
    storage, study_name = sweeper.get("storage"), sweeper.get("study_name")
    if not storage or not study_name:
        return None
    return TrialHandle(storage=str(storage), study_name=str(study_name), number=int(number))

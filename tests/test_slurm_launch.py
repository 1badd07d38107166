"""The SLURM launch check and requeue ownership, from SLURM's environment variables (no cluster needed)."""

from __future__ import annotations

import pytest
from lightning.pytorch.plugins.environments import SLURMEnvironment

from lightning_eff.hydra_config import default_run_dir
from lightning_eff.slurm import SlurmRequeue, check_slurm_launch, slurm_plugins
from lightning_eff.validation import ConfigError

STEP = {"SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "train", "SLURM_STEP_ID": "0", "SLURM_NNODES": "1"}


def test_outside_slurm_nothing_is_checked_or_added() -> None:
    check_slurm_launch(devices=8, num_nodes=3, env={})
    assert slurm_plugins(env={}) == ([], [])


def test_matching_layout_passes() -> None:
    check_slurm_launch(2, 1, {**STEP, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"})
    check_slurm_launch(4, 3, {**STEP, "SLURM_NTASKS": "12", "SLURM_NTASKS_PER_NODE": "4(x3)", "SLURM_NNODES": "3"})


@pytest.mark.parametrize(
    ("devices", "nodes", "extra", "message"),
    [
        (1, 1, {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"},
         "trainer.devices=1: must equal SLURM's --ntasks-per-node=2 (or submit with --ntasks-per-node=1)"),
        (2, 1, {"SLURM_NTASKS": "2"}, "trainer.devices=2: SLURM's --ntasks-per-node is not set"),
        (1, 1, {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2"},
         "trainer.num_nodes=1: must equal SLURM's --nodes=2 (or submit with --nodes=1)"),
    ],
)  # fmt: skip
def test_mismatch_is_refused_with_what_to_set(devices: int, nodes: int, extra: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_slurm_launch(devices, nodes, {**STEP, **extra})
    assert str(caught.value).startswith(message)


def test_several_tasks_without_srun_are_refused() -> None:
    env = {k: v for k, v in STEP.items() if k != "SLURM_STEP_ID"} | {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"}
    with pytest.raises(ConfigError, match="not started by srun"):
        check_slurm_launch(2, 1, env)


def test_exactly_one_requeue_owner() -> None:
    plain = {**STEP, "SLURM_NTASKS": "1"}
    plugins, callbacks = slurm_plugins(plain)
    assert [type(c) for c in callbacks] == [SlurmRequeue]
    assert isinstance(plugins[0], SLURMEnvironment) and not plugins[0].auto_requeue
    plugins, callbacks = slurm_plugins({**plain, "SUBMITIT_EXECUTOR": "slurm"})
    assert callbacks == [] and not plugins[0].auto_requeue  # submitit requeues; Lightning does not


def test_default_run_dir_is_stable_within_a_slurm_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    assert default_run_dir() == "outputs/slurm-1234"
    monkeypatch.delenv("SLURM_JOB_ID")
    assert default_run_dir().startswith("outputs/20")

"""Running under SLURM: refuse a launch that would hang, and own requeueing so every plugin's state resumes.

Lightning's own requeue handler writes the checkpoint inside the signal handler, wherever each rank happens
to be: ranks can be at different points (one inside an allreduce), and the checkpoint can land mid-step.
`SlurmRequeue` only notes the signal; at the next batch boundary all ranks agree, write the checkpoint
together and rank 0 requeues the job, so the resumed run continues exactly where this one stopped.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Mapping
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_eff.sigterm import any_rank
from lightning_eff.validation import ConfigError


def under_slurm(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is a SLURM task that Lightning will treat as one rank (its own detection rule)."""
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def under_submitit(env: Mapping[str, str] = os.environ) -> bool:
    """Whether submitit launched this job (then submitit owns requeueing, see `slurm_plugins`)."""
    return env.get("SUBMITIT_EXECUTOR") == "slurm"


def _first_count(value: str) -> int:
    """SLURM writes per-node counts as `2` or `2(x3)`; the first number is this node's."""
    match = re.match(r"\d+", value)
    return int(match.group()) if match else 0


def check_slurm_launch(devices: Any, num_nodes: int, env: Mapping[str, str] = os.environ) -> None:
    """Refuse a SLURM launch whose task layout does not match the trainer, before process-group init hangs."""
    if not under_slurm(env):
        return
    tasks = int(env["SLURM_NTASKS"])
    per_node = env.get("SLURM_NTASKS_PER_NODE")
    if tasks > 1 and "SLURM_STEP_ID" not in env:
        raise ConfigError("SLURM_NTASKS", tasks, "the job has several tasks but this process was not started by srun")
    if per_node is None:
        raise ConfigError(
            "trainer.devices", devices, "SLURM's --ntasks-per-node is not set; submit with --ntasks-per-node=<devices>"
        )
    tasks_per_node = _first_count(per_node)
    if devices != tasks_per_node:
        rule = f"must equal SLURM's --ntasks-per-node={tasks_per_node} (or submit with --ntasks-per-node={devices})"
        raise ConfigError("trainer.devices", devices, rule)
    nodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
    if num_nodes != nodes:
        raise ConfigError(
            "trainer.num_nodes", num_nodes, f"must equal SLURM's --nodes={nodes} (or submit with --nodes={num_nodes})"
        )


class JobRequeued(Exception):
    """Raised on every rank right after the requeue checkpoint, so nothing is trained or written after it.

    Whoever called `Trainer.fit` catches it and calls `requeue_job` on global rank 0.
    """


class SlurmRequeue(L.Callback):
    """On SLURM's warning signal, checkpoint at the next batch boundary on every rank and requeue the job.

    Submit with ``--signal=SIGUSR1@90 --requeue`` and a stable run directory: the requeued job finds the
    `hpc_ckpt_N.ckpt` there (Lightning resumes from it on its own under SLURM, and `resume=auto` picks it).

    Args:
        signum: the signal SLURM sends before the time limit (``--signal``).
    """

    def __init__(self, signum: int = signal.SIGUSR1) -> None:
        self.signum = signum
        self._signalled = False
        self._previous: Any = None

    def _note_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signalled = True

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._previous = signal.signal(self.signum, self._note_signal)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not any_rank(self._signalled, pl_module.device):
            return
        path = _CheckpointConnector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        rank_zero_info(f"SLURM signal {self.signum}: saved {path} at step {trainer.global_step}")
        # Requeueing makes SLURM kill the job at once; `requeue_job` runs after the Trainer has torn down.
        raise JobRequeued(f"checkpointed at step {trainer.global_step}")


def requeue_job(env: Mapping[str, str] = os.environ) -> None:
    """Ask SLURM to requeue this job (`scontrol requeue`); call once, on global rank 0."""
    array_job = env.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array_job}_{env['SLURM_ARRAY_TASK_ID']}" if array_job else env["SLURM_JOB_ID"]
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        rank_zero_warn(f"scontrol requeue {job_id} failed: {result.stderr.strip()}")
    else:
        rank_zero_info(f"requeued SLURM job {job_id}")


def slurm_plugins(env: Mapping[str, str] = os.environ) -> tuple[list[Any], list[L.Callback]]:
    """Trainer plugins and callbacks for this launch, with exactly one owner of requeueing.

    Under submitit, submitit requeues (its `max_num_timeout`), and the app resumes from the newest checkpoint;
    under plain sbatch/srun, `SlurmRequeue` does. Lightning's own auto-requeue is off in both cases.
    """
    if not under_slurm(env):
        return [], []
    plugins: list[Any] = [SLURMEnvironment(auto_requeue=False)]
    return plugins, ([] if under_submitit(env) else [SlurmRequeue()])

"""Multi-process jobs inside a sweep (`lightning-eff -m ... trainer=ddp_cpu`): each rank runs its job, not the sweep.

Lightning starts ranks 1.. of a Hydra app by running the same command line again (`_hydra_subprocess_cmd`:
``sys.argv`` plus ``hydra.run.dir``, ``hydra.job.name``, ``hydra.output_subdir``). Inside a multirun job that
command line is the whole sweep (``-m`` and every sweep argument), so rank 1 would start a second sweep: with
the Optuna sweeper it asks the study for new trials and trains those instead. The job therefore leaves its own
overrides and output directory in the environment, which the ranks inherit, and a rank started that way runs
exactly them as a single run in the job's directory.
"""

from __future__ import annotations

import json
import os

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

JOB_ENV = "LIGHTNING_EFF_SWEEP_JOB"
LIGHTNING_ADDS = ("hydra.job.name=", "hydra.output_subdir=")
REPLACED = ("hydra.mode=", "hydra.run.dir=", *LIGHTNING_ADDS)


def remember_sweep_job() -> None:
    """In a multirun job, put its overrides and output directory where the ranks Lightning starts will find them."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        hydra_config = HydraConfig.get()
        # the sweep's own settings (hydra/sweeper=frontier adds the frontier node) but not its mode, nor what
        # rank_argv sets itself
        hydra_overrides = [o for o in hydra_config.overrides.hydra if not o.startswith(REPLACED)]
        overrides = [*hydra_overrides, *hydra_config.overrides.task]
        job = {"overrides": overrides, "output_dir": hydra_config.runtime.output_dir}
        os.environ[JOB_ENV] = json.dumps(job)


def rank_argv(argv: list[str]) -> list[str]:
    """`argv`, or for a rank that Lightning started inside a sweep's job: that job as a single run."""
    job = os.environ.get(JOB_ENV)
    if job is None or not {"-m", "--multirun"} & set(argv[1:]):
        return argv
    settings = json.loads(job)
    added = [arg for arg in argv[1:] if arg.startswith(LIGHTNING_ADDS)]
    return [argv[0], *settings["overrides"], f"hydra.run.dir={settings['output_dir']}", *added]


def end_sweep_job() -> None:
    """After a multirun job: close its process group, so the next job in this process (the basic launcher runs
    them one after another in the sweeper's process) starts its ranks afresh instead of reusing dead peers."""
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return
    if dist.is_initialized():
        dist.destroy_process_group()
    # Lightning's launcher left these in this process's environment for its ranks; with LOCAL_RANK still set the
    # next job would take its processes as started by someone else and wait for a rank 1 nobody starts.
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(name, None)

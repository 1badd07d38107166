"""Leave torch.distributed cleanly at exit, so a finished gloo run does not abort in the interpreter's teardown.

A gloo worker thread drops its last collective's tensors just after the caller's `wait()` returned, and the
drop takes the GIL when Python already let go of those tensors. If the main thread reaches interpreter
finalization first (a short script after `trainer.fit`, a loaded 2-core machine), the worker exits inside a
noexcept destructor and `std::terminate` kills a run that had succeeded: exit status 134, "terminate called
without an active exception" (pytorch/pytorch#190489, open). Lightning destroys the group at exit only for NCCL.

`destroy_process_group_at_exit` registers one handler that, while the interpreter is fully alive, releases the
GIL for a moment (a waiting worker takes it and finishes) and then destroys the process group.
"""

from __future__ import annotations

import atexit
import signal
import subprocess
import time

import lightning as L
import torch.distributed as dist
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

# Long enough for a descheduled worker on a loaded machine to run once; paid once per process, at exit.
GIL_HANDOVER_SECONDS = 0.2

_registered = False


def destroy_process_group_at_exit() -> None:
    """Register (once per process) the exit handler that lets gloo's workers finish and destroys the group."""
    global _registered
    if not _registered:
        atexit.register(release_process_group)
        _registered = True


def release_process_group() -> None:
    """Let pending collective workers drop their tensors, then destroy the default process group, if any."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    time.sleep(GIL_HANDOVER_SECONDS)
    dist.destroy_process_group()


def dead_ranks(trainer: L.Trainer, wait_seconds: float = 2.0) -> list[str]:
    """The local ranks this process launched that have exited with an error, e.g. ``rank 1 (pid 4242): killed
    by SIGKILL``; empty where Lightning did not launch the ranks itself (srun, torchrun) or none died.

    A peer's death reaches this rank as a gloo or NCCL error that names no rank; Lightning's own child-process
    observer names it only on its next poll (every 5 s), often after the main process has already failed.
    """
    launcher = trainer.strategy.launcher
    if not isinstance(launcher, _SubprocessScriptLauncher) or not launcher.procs:
        return []
    deadline = time.monotonic() + wait_seconds  # a rank that just died may not have been reaped yet
    while any(proc.poll() is None for proc in launcher.procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [
        f"rank {local_rank} (pid {proc.pid}): {_exit_reason(proc)}"
        for local_rank, proc in enumerate(launcher.procs, start=1)
        if proc.returncode
    ]


def _exit_reason(proc: subprocess.Popen) -> str:
    if proc.returncode < 0:
        return f"killed by {signal.Signals(-proc.returncode).name}"
    return f"exited with status {proc.returncode}"

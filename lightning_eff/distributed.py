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
import time

import torch.distributed as dist

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

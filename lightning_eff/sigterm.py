"""SIGTERM under DDP: every rank stops at the same step, and no collective runs inside a signal handler.

Lightning 2.6 handles SIGTERM on each rank by forwarding it to the processes it launched and then, inside the
signal handler, broadcasting a flag from rank 0 (its PR #20825). A signal handler runs wherever the main thread
was interrupted, say in the middle of a forward, so that broadcast pairs with whatever collective the other ranks
issue next (DDP's bucket allreduce, a compressor's scale exchange) and the job can hang until it is killed: seen
in `benchmarks/headline.py`, where rank 0 got SIGTERM and rank 1 never reached its handler. And each rank raises
`SIGTERMException` at the end of the step in which *it* saw the signal, so ranks that see it in different steps
wait for each other forever (Lightning issue #20806).

`SynchronizedSigterm` replaces that handler with one that only notes the signal (and forwards it to the launched
processes, as Lightning does). At the end of every training batch the ranks agree, with one all-reduce of a
single number, whether any of them has been signalled; if so each sets Lightning's own flag, so all raise
`SIGTERMException` at that same step's end. The same pattern as `SlurmRequeue` for SLURM's warning signal.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is set on any rank: one all-reduce of one number (a collective: call it on every rank)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)  # ranks may get a signal in different steps
    return bool(value.item())


class SynchronizedSigterm(L.Callback):
    """Stop every rank at the same step on SIGTERM, with no collective inside the signal handler.

    The app adds it to every run; add it to your own Trainer when you run DDP or FSDP2 on more than one process.
    With one process it changes nothing but who sets Lightning's flag. It takes over from `on_train_start`
    (Lightning sets its handler after `on_fit_start`): a SIGTERM during the sanity check still meets Lightning's.
    """

    def __init__(self) -> None:
        self._signalled = False
        self._previous: Any = None  # the handler this one replaced (Lightning's), restored at teardown
        self._users_handler: Any = None  # the handler set before fit, if any
        self._trainer: L.Trainer | None = None  # set while this handler is installed

    def _note_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self._signalled and self._trainer is not None:
            launcher = self._trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)  # the ranks this process started (rank 0 of a local launch), once
        self._signalled = True
        if callable(self._users_handler):
            self._users_handler(signum, frame)  # one that was set before fit, as Lightning also calls it

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before Lightning sets its own handler (it does so after this hook, and before on_train_start)
        self._users_handler = signal.getsignal(signal.SIGTERM)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; Lightning's stays
        self._trainer = trainer
        self._signalled = False
        self._previous = signal.signal(signal.SIGTERM, self._note_signal)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._trainer is not None:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._trainer, self._previous = None, None

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._trainer is None or not any_rank(self._signalled, pl_module.device):
            return
        if not trainer.received_sigterm:
            rank_zero_info(f"SIGTERM: every rank stops after step {trainer.global_step}")
        # Lightning's flag: its loop raises SIGTERMException at this step's end, on every rank alike
        trainer._signal_connector.received_sigterm = True

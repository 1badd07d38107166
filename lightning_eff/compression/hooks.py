"""The DDP communication hook built from a compressor: step counting, stats, the non-finite warning, the future.

No `from __future__ import annotations` here: DDP's `register_comm_hook` compares the hook's annotations with
`dist.GradBucket` and `torch.futures.Future[torch.Tensor]` as objects, and strings would fail that check.
"""

import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_eff.compression.base import Compressor
from lightning_eff.compression.stats import CompressionStats, Traffic
from lightning_eff.compression.transport import BucketLayout, Collectives


class NonFiniteGradientWarning(UserWarning):
    """A gradient bucket held inf/NaN on some rank, so it was sent uncompressed (filter it with this class)."""


class CompressionHook:
    """A DDP comm hook that averages every gradient bucket with `compressor` and counts what that saved.

    DDP calls it once per bucket per synchronizing backward (never inside `no_sync`), so `step` counts optimizer
    steps under gradient accumulation.

    Overlap (`overlap=True`; off by default): for a compressor with an asynchronous form (`Dense`, `FP16`, `BF16`,
    `PowerSGD`) the hook starts the bucket and returns its future, so the backward pass goes on while the bucket
    travels; later stages (PowerSGD's orthogonalization and Q) run where the previous collective completes.
    Buckets run one after another: a bucket starts once the previous one is done. Every rank then issues the
    same collectives in the same order (DDP calls the hook in bucket order), which gloo needs: torch's
    `powerSGD_hook` starts each stage from whichever collective finished first, an order that can differ
    between ranks. The last bucket's call waits until every bucket is done (the backward pass has nothing left
    to compute then), closes the step's stats and warns about non-finite buckets there, so nothing is in flight
    when DDP, or the training step, issues a collective of its own. Other compressors run synchronously inside
    the hook, as with `overlap=False`. It is off by default because it costs bit-reproducibility on the CPU: the
    later stages' matrix products then run on gloo's threads beside the backward pass, where (likely) the thread
    split of a product, and so the order of its sums, follows the load. Measured: three concurrent runs
    of the same seeded PowerSGD job ended with different weights with overlap on, identical ones with it off, and
    a killed-and-resumed run no longer matched the uninterrupted one. Turn it on where speed on a slow link
    matters more than bit-exact runs and resumes (`EfficientDDPStrategy(compression_overlap=True)`).

    Compressor state is keyed by parameter name. Pass the wrapped `module` so names are the module's own; without
    it, parameters are numbered in the order the hook first sees them, which is stable across a resume only if the
    hook is registered before the first backward (a fresh DDP model starts with the same layout every run).

    Args:
        compressor: how each bucket is averaged.
        stats: where bytes and seconds are counted (a new `CompressionStats` if None).
        module: the module DDP wraps (``ddp_model.module``), for parameter names.
        sync_timing: synchronize CUDA around collectives so `stats` seconds are real (costs overlap).
        overlap: return the compressor's future rather than waiting for it inside the hook (see above).
        waiting: what each synchronous collective runs inside (`Collectives`); the balancer passes its timer's,
            so a fast rank's wait for a slow one inside backward is not measured as its own work.

    Example::

        hook = CompressionHook(PowerSGD(rank=4), module=model)
        ddp_model = DistributedDataParallel(model)
        ddp_model.register_comm_hook(state=None, hook=hook)  # state: the process group, None for the default
        ...
        checkpoint["compression"] = hook.state_dict()  # per rank: residuals differ between ranks
    """

    def __init__(
        self,
        compressor: Compressor,
        stats: CompressionStats | None = None,
        module: torch.nn.Module | None = None,
        sync_timing: bool = False,
        overlap: bool = False,
        waiting: Callable[[], AbstractContextManager[object]] | None = None,
    ) -> None:
        self.compressor = compressor
        self.waiting = waiting
        self.stats = stats if stats is not None else CompressionStats()
        self.sync_timing = sync_timing
        self.overlap = overlap
        self.step = 0
        # DDP reads these of every hook (for its logs and a check that targets torch's bf16 hook).
        self.__name__ = self.__qualname__ = f"CompressionHook({compressor.name})"
        self._names: dict[int, str] = {}
        self._parameters: list[Tensor] = []  # keeps the ids in `_names` from being reused
        if module is not None:
            for name, parameter in module.named_parameters():
                self._name(parameter, name)
        self._previous: torch.futures.Future[Tensor] | None = None  # this step's last bucket so far

    def __call__(self, state: dist.ProcessGroup | None, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        buffer = bucket.buffer()
        comm = Collectives(state, sync_timing=self.sync_timing, device=buffer.device, waiting=self.waiting)
        layout, step, compressor = self._layout(bucket), self.step, self.compressor
        averaged: torch.futures.Future[Tensor]
        if self.overlap:
            previous = self._previous if self._previous is not None else comm.completed(buffer)
            averaged = comm.then(previous, lambda _: compressor.allreduce_mean_async(buffer, layout, comm, step))
        else:
            averaged = comm.completed(comm.run(compressor.allreduce_mean, buffer, layout, comm, step))
        done = comm.then(averaged, lambda result: comm.completed(self._record(buffer, result, comm)))
        if not bucket.is_last():
            self._previous = done
            return done
        self._previous = None
        done.wait()  # buckets run in order, so every bucket of this step is done
        self._end_step()
        return done

    def _record(self, buffer: Tensor, result: Tensor, comm: Collectives) -> Tensor:
        """The average into DDP's buffer, and the bucket's traffic into the step's stats."""
        if result is not buffer:
            buffer.copy_(result)
        comm.synchronize(buffer)
        traffic = Traffic(
            bytes_dense=buffer.numel() * buffer.element_size(),
            bytes_sent=comm.bytes_sent,
            compress_seconds=comm.compute_seconds,
            communicate_seconds=comm.seconds,
            nonfinite_buckets=int(comm.nonfinite),
        )
        self.stats.record_bucket(traffic)
        return buffer

    def _end_step(self) -> None:
        """Warn once if a bucket of this step went dense for inf/NaN, close the step's stats, count the step."""
        if self.stats.current.nonfinite_buckets:
            warnings.warn(
                f"step {self.step}: a gradient bucket holds inf/NaN on some rank; it was sent uncompressed and "
                f"{self.compressor.name}'s state was left unchanged",
                NonFiniteGradientWarning,
                stacklevel=3,
            )
        self.stats.end_step()
        self.step += 1

    def _name(self, parameter: Tensor, name: str | None = None) -> str:
        key = id(parameter)
        if key not in self._names:
            self._names[key] = name if name is not None else f"param{len(self._names)}"
            self._parameters.append(parameter)
        return self._names[key]

    def _layout(self, bucket: dist.GradBucket) -> BucketLayout:
        parameters = bucket.parameters()
        layout = BucketLayout(tuple(self._name(p) for p in parameters), tuple(p.shape for p in parameters))
        if sum(layout.numels) != bucket.buffer().numel():
            raise RuntimeError("DDP bucket buffer is not the concatenation of its parameters' gradients")
        return layout

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: the step, the compressor's state (per rank) and the stats."""
        return {"step": self.step, "compressor": self.compressor.state_dict(), "stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.compressor.load_state_dict(state["compressor"])
        self.stats.load_state_dict(state["stats"])

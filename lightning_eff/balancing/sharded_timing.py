"""FSDP2's collectives timed as waiting, so the balancer measures only a rank's own work under sharding.

Under DDP the allreduce runs after backward's compute and `StepTimer` stops at the last gradient. FSDP2 puts a
collective inside every block: an all-gather before its forward (and again before its backward) and a
reduce-scatter after its backward, and a fast rank waits in each for the slow one. These wrappers
(`FSDPModule.set_custom_all_gather` / `set_custom_reduce_scatter`) run the collective to completion inside
`StepTimer.waiting`, which leaves its time out of the busy seconds. On CUDA the collective is only enqueued
here, so the time is the launch, not the wait.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

from lightning_eff.balancing.step_timer import StepTimer


def _empty(size: Sequence[int | torch.SymInt], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(size, dtype=dtype, device=device)


class TimedAllGather(AllGather):
    """FSDP2's all-gather (parameters before forward and backward), its time reported as waiting."""

    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype, device: torch.device) -> Tensor:
        return _empty(size, dtype, device)

    def __call__(
        self, output_tensor: Tensor, input_tensor: Tensor, group: dist.ProcessGroup, async_op: bool = False
    ) -> dist.Work | None:
        with self.timer.waiting():
            dist.all_gather_single(output_tensor, input_tensor, group=group)
        return None


class TimedReduceScatter(ReduceScatter):
    """FSDP2's reduce-scatter (gradients after backward), run by `inner` (None: plain), timed as waiting."""

    def __init__(self, timer: StepTimer, inner: ReduceScatter | None = None) -> None:
        self.timer = timer
        self.inner = inner

    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype, device: torch.device) -> Tensor:
        return (
            _empty(size, dtype, device) if self.inner is None else self.inner.allocate(size, dtype=dtype, device=device)
        )

    def __call__(
        self,
        output_tensor: Tensor,
        input_tensor: Tensor,
        group: dist.ProcessGroup,
        op: dist.ReduceOp | dist.ReduceOp.RedOpType,
        async_op: bool = False,
    ) -> dist.Work | None:
        with self.timer.waiting():
            if self.inner is None:
                dist.reduce_scatter_single(output=output_tensor, input=input_tensor, group=group, op=op)
            elif (work := self.inner(output_tensor, input_tensor, group, op)) is not None:
                work.wait()
        return None


def time_sharded_collectives(
    modules: Sequence[FSDPModule], timer: StepTimer, reduce_scatter: ReduceScatter | None
) -> None:
    """Give every FSDP2 module timed collectives; `reduce_scatter` (a compressor's) is kept inside the timing."""

    all_gather, timed_reduce_scatter = TimedAllGather(timer), TimedReduceScatter(timer, reduce_scatter)
    for module in modules:
        assert isinstance(module, FSDPModule)
        module.set_custom_all_gather(all_gather)
        module.set_custom_reduce_scatter(timed_reduce_scatter)

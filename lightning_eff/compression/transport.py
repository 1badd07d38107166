"""What a compressor works with: a bucket's layout, the collectives it may use, and the state it keeps per parameter.

A compressor talks to other ranks only through `Collectives`, so bytes and seconds are counted in one place.
Each collective has a synchronous form (`all_reduce`) and, for compressors that overlap with the backward pass,
an asynchronous one (`all_reduce_async`) whose future the next stage follows with `Collectives.then`.

Per-rank state (error-feedback residuals, PowerSGD's Q) is keyed by parameter name, not by bucket index, and every
scheme works per parameter: DDP rebuilds its buckets after the first step of every run, a resumed one included, so
the same bucket index then holds other parameters in another order.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

# `all_gather_single` replaces `all_gather_into_tensor` (deprecated in recent torch); older torch has only the latter.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True)
class BucketLayout:
    """Where each parameter's gradient lies in a bucket's flat buffer, and the name that keys its state.

    Compressors work per parameter, never per bucket, so their results do not depend on how DDP grouped the
    parameters (it regroups them after the first step of every run, resumed runs included).

    Args:
        names: one stable name per parameter, in buffer order.
        shapes: the parameters' shapes, in buffer order; the buffer is their concatenation.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def numels(self) -> list[int]:
        return [math.prod(shape) for shape in self.shapes]

    def split(self, flat: Tensor) -> list[Tensor]:
        """Views of `flat` (a buffer-shaped tensor), one per parameter, in the parameter's shape."""
        return [piece.view(shape) for piece, shape in zip(flat.split(self.numels), self.shapes, strict=True)]


def synchronize(tensor: Tensor) -> None:
    """Wait until `tensor`'s device has finished its queued work (CUDA only; elsewhere work is already done)."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


class Collectives:
    """The collectives a compressor may use on one bucket, counting the bytes and seconds that stats report.

    `bytes_sent` is the payload this rank contributes (numel x element size), the measure `bytes_dense` uses for
    a dense allreduce. An allgather delivers world_size payloads to every rank where a ring allreduce moves about
    two, so top-k's real saving shrinks as the world grows. Without an initialized process group the collectives
    are the identity (world size 1), so compressors run, and are tested, in a single process.

    Seconds: `seconds` is time in collectives: a synchronous one's duration, an asynchronous one's wall time from
    its start to its completion (other work, the backward pass included, runs meanwhile). `compute_seconds` is
    wall time spent running the compressor's own code (the hook's call and every `then` stage), less the
    synchronous collectives inside it. Bytes are counted when a collective starts, in both forms alike.

    Args:
        group: the process group (None: the default group).
        sync_timing: synchronize the device around each collective, so seconds on CUDA are real, not launch times.
        device: the device of the bucket, which the asynchronous forms' futures name when it is CUDA.
        waiting: a context manager factory each synchronous collective runs inside (the balancer's
            `StepTimer.waiting`): inside backward, a fast rank blocks there for a slow one, which is not its work.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        sync_timing: bool = False,
        device: torch.device | None = None,
        waiting: Callable[[], AbstractContextManager[object]] | None = None,
    ) -> None:
        self.group = group
        self.waiting = waiting
        self.devices: list[int | str | torch.device] | None = (
            [device] if device is not None and device.type == "cuda" else None
        )
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.sync_timing = sync_timing
        self.bytes_sent = 0
        self.seconds = 0.0
        self.compute_seconds = 0.0
        self.nonfinite = False
        self._blocked = 0.0  # seconds in synchronous collectives, subtracted from `compute_seconds`

    def all_reduce(self, tensor: Tensor, op: Any = dist.ReduceOp.SUM) -> Tensor:
        """Reduce `tensor` in place across ranks (SUM unless `op` says otherwise) and return it."""
        with self._counted(tensor):
            if self.distributed:
                dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def all_reduce_async(self, tensor: Tensor, op: Any = dist.ReduceOp.SUM) -> torch.futures.Future[Tensor]:
        """Start reducing `tensor` in place; the future holds `tensor` once every rank's part is in."""
        self.synchronize(tensor)
        start = time.perf_counter()
        self.bytes_sent += tensor.numel() * tensor.element_size()
        if not self.distributed:
            self.seconds += time.perf_counter() - start
            return self.completed(tensor)
        work = dist.all_reduce(tensor, op=op, group=self.group, async_op=True)
        assert work is not None  # async_op=True always returns the work

        def finished(future: torch.futures.Future[Any]) -> Tensor:
            future.wait()  # raises the collective's error, if any
            self.synchronize(tensor)
            self.seconds += time.perf_counter() - start
            return tensor

        return work.get_future().then(finished)

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Every rank's 1-D `tensor` (same size on every rank), stacked: shape (world_size, numel)."""
        out = tensor.new_empty(self.world_size * tensor.numel())
        with self._counted(tensor):
            if self.distributed:
                _all_gather_flat(out, tensor, group=self.group)
            else:
                out.copy_(tensor)
        return out.view(self.world_size, -1)

    def mean(self, tensor: Tensor) -> Tensor:
        """The dense average, in place; dividing first keeps low-precision sums from overflowing."""
        return self.all_reduce(tensor.div_(self.world_size))

    def mean_async(self, tensor: Tensor) -> torch.futures.Future[Tensor]:
        """`mean`, started: the future holds the average."""
        return self.all_reduce_async(tensor.div_(self.world_size))

    def all_finite(self, tensor: Tensor) -> bool:
        """Whether `tensor` is finite on every rank, so that all ranks take the same branch."""
        return self.all_reduce(_nonfinite_flag(tensor), dist.ReduceOp.MAX).item() == 0

    def all_finite_async(self, tensor: Tensor) -> torch.futures.Future[bool]:
        """`all_finite`, started: the same 4-byte flag, its MAX read back once it arrives."""
        flag = self.all_reduce_async(_nonfinite_flag(tensor), dist.ReduceOp.MAX)
        return self.then(flag, lambda bad: self.completed(bad.item() == 0))

    def completed(self, value: T) -> torch.futures.Future[T]:
        """A future already holding `value`."""
        future: torch.futures.Future[T] = torch.futures.Future(devices=self.devices)
        future.set_result(value)
        return future

    def run(self, stage: Callable[..., T], *args: Any) -> T:
        """`stage(*args)`, its wall time less its synchronous collectives added to `compute_seconds`."""
        start, blocked = time.perf_counter(), self._blocked
        try:
            return stage(*args)
        finally:
            self.compute_seconds += time.perf_counter() - start - (self._blocked - blocked)

    def then(
        self, future: torch.futures.Future[T], stage: Callable[[T], torch.futures.Future[U]]
    ) -> torch.futures.Future[U]:
        """The future of `stage(value)` once `future` has its value; `stage` returns the next future.

        The stage runs where `future` completes (a gloo worker thread, or at once for NCCL, whose futures are
        complete when launched) and is timed by `run`. An error in `future` or `stage` ends in the result.
        """
        result: torch.futures.Future[U] = torch.futures.Future(devices=self.devices)

        def forward(inner: torch.futures.Future[U]) -> None:
            try:
                result.set_result(inner.wait())
            except Exception as error:  # handed on to whoever waits on `result`
                result.set_exception(error)  # type: ignore[arg-type]  # torch types it as the value

        def start(outer: torch.futures.Future[T]) -> None:
            try:
                self.run(stage, outer.wait()).add_done_callback(forward)
            except Exception as error:  # handed on to whoever waits on `result`
                result.set_exception(error)  # type: ignore[arg-type]  # torch types it as the value

        future.add_done_callback(start)
        return result

    def synchronize(self, tensor: Tensor) -> None:
        """`synchronize(tensor)` if `sync_timing` is set, else nothing."""
        if self.sync_timing:
            synchronize(tensor)

    @contextmanager
    def _counted(self, tensor: Tensor) -> Iterator[None]:
        self.synchronize(tensor)
        start = time.perf_counter()
        with self.waiting() if self.waiting is not None else nullcontext():
            yield
            self.synchronize(tensor)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self._blocked += seconds
        self.bytes_sent += tensor.numel() * tensor.element_size()


def _nonfinite_flag(tensor: Tensor) -> Tensor:
    """1.0 (float32, one element) if `tensor` holds inf/NaN, else 0.0: what `all_finite` reduces with MAX.

    Read from the sum, which any inf/NaN makes non-finite: one reduction without a mask (1.3 ms instead of 22 for
    the 7.3M gradients of the benchmarks' GPT on one CPU thread). A finite tensor whose float32 sum overflows
    (elements near 1e34) is flagged too, and goes dense: the safe side.
    """
    return (~torch.isfinite(tensor.sum(dtype=torch.float32))).to(torch.float32).reshape(1)


class PerParameterState:
    """Tensors this rank keeps per parameter name (residuals, Q), saved on CPU and moved back lazily."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}

    def get(self, name: str, device: torch.device, dtype: torch.dtype, shape: Sequence[int]) -> Tensor | None:
        tensor = self.tensors.get(name)
        if tensor is None:
            return None
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"saved compression state for {name!r} has shape {tuple(tensor.shape)}, the gradient has "
                f"{tuple(shape)}: the model changed since the state was saved"
            )
        if tensor.device != device or tensor.dtype != dtype:
            tensor = self.tensors[name] = tensor.to(device, dtype)
        return tensor

    def put(self, name: str, tensor: Tensor) -> None:
        self.tensors[name] = tensor

    def state_dict(self) -> dict[str, Tensor]:
        return {name: t.detach().to("cpu", copy=True) for name, t in self.tensors.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.tensors = dict(state)


def shared_seed(*parts: object) -> int:
    """A seed that every rank derives alike from the same parts, with no generator state to save."""
    return zlib.crc32(":".join(map(str, parts)).encode())

"""Gradient compressors: each one performs the whole averaging of one DDP gradient bucket across ranks.

A compressor is handed the bucket's flat buffer, its `BucketLayout` (which parameter lies where) and a
`Collectives` object (the only way it talks to other ranks, so bytes and seconds are counted in one place), and
returns the average over ranks, identical on every rank. Collectives are synchronous: simple, and it works on gloo,
where torch's chained-future PowerSGD deadlocks.

Per-rank state (error-feedback residuals, PowerSGD's Q) is keyed by parameter name, not by bucket index, and every
scheme works per parameter: DDP rebuilds its buckets after the first step of every run, a resumed one included, so
the same bucket index then holds other parameters in another order.
"""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from lightning_eff.validation import check, check_int

log = logging.getLogger(__name__)

# `all_gather_single` replaces `all_gather_into_tensor` (deprecated in recent torch); older torch has only the latter.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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


class Collectives:
    """The collectives a compressor may use on one bucket, counting the bytes and seconds that stats report.

    `bytes_sent` is the payload this rank contributes (numel x element size), the measure `bytes_dense` uses for
    a dense allreduce. An allgather delivers world_size payloads to every rank where a ring allreduce moves about
    two, so top-k's real saving shrinks as the world grows. Without an initialized process group the collectives
    are the identity (world size 1), so compressors run, and are tested, in a single process.

    Args:
        group: the process group (None: the default group).
        sync_timing: synchronize the device around each collective, so seconds on CUDA are real, not launch times.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, sync_timing: bool = False) -> None:
        self.group = group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.sync_timing = sync_timing
        self.bytes_sent = 0
        self.seconds = 0.0
        self.nonfinite = False

    def all_reduce(self, tensor: Tensor, op: Any = dist.ReduceOp.SUM) -> Tensor:
        """Reduce `tensor` in place across ranks (SUM unless `op` says otherwise) and return it."""
        with self._counted(tensor):
            if self.distributed:
                dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

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

    def all_finite(self, tensor: Tensor) -> bool:
        """Whether `tensor` is finite on every rank, so that all ranks take the same branch."""
        bad = (~torch.isfinite(tensor)).any().to(torch.float32).reshape(1)
        return self.all_reduce(bad, dist.ReduceOp.MAX).item() == 0

    def synchronize(self, tensor: Tensor) -> None:
        if self.sync_timing and tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)

    @contextmanager
    def _counted(self, tensor: Tensor) -> Iterator[None]:
        self.synchronize(tensor)
        start = time.perf_counter()
        yield
        self.synchronize(tensor)
        self.seconds += time.perf_counter() - start
        self.bytes_sent += tensor.numel() * tensor.element_size()


class _PerParameter:
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


def _seed(*parts: object) -> int:
    """A seed that every rank derives alike from the same parts, with no generator state to save."""
    return zlib.crc32(":".join(map(str, parts)).encode())


def _check_bool(key: str, value: Any) -> None:
    check(isinstance(value, bool), key, value, "must be true or false")


class Compressor(ABC):
    """One way of averaging a gradient bucket across ranks; subclasses send fewer bytes than a dense allreduce.

    Subclasses implement `compressed_mean`; `allreduce_mean` wraps it with the non-finite guard.
    """

    name: ClassVar[str]

    @property
    def compress_from(self) -> int:
        """The first step at which this compressor compresses (earlier steps go dense)."""
        return 0

    def needs_finite_input(self, step: int) -> bool:
        """Whether inf/NaN at this step would corrupt its state or its arithmetic (then the bucket goes dense)."""
        return True

    def allreduce_mean(self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int) -> Tensor:
        """The average of `buffer` over ranks (same shape and dtype), identical on every rank; may reuse `buffer`.

        A bucket with inf/NaN on any rank is sent dense and leaves the state alone: one bad step (say an fp16
        overflow that a GradScaler will skip) must not poison error feedback for the rest of the run.
        `comm.nonfinite` tells the caller that happened.
        """
        if self.needs_finite_input(step) and not comm.all_finite(buffer):
            comm.nonfinite = True
            return comm.mean(buffer)
        return self.compressed_mean(buffer, layout, comm, step)

    @abstractmethod
    def compressed_mean(self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int) -> Tensor:
        """The averaged bucket, for a finite `buffer`."""

    def state_dict(self) -> dict[str, Any]:
        """This rank's state (tensors on CPU); ranks differ, so each rank's must be saved."""
        return {"name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"compression state was saved by {state.get('name')!r}, this compressor is {self.name!r}")


@dataclass(eq=False)
class Dense(Compressor):
    """Plain allreduce mean: the reference that compressors are measured against, and `Auto`'s fallback."""

    name: ClassVar[str] = "dense"

    def needs_finite_input(self, step: int) -> bool:
        return False

    def compressed_mean(self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int) -> Tensor:
        return comm.mean(buffer)


class _Cast(Compressor):
    """Allreduce in a narrower float type. Stateless, and inf/NaN pass through as in a dense allreduce."""

    dtype: ClassVar[torch.dtype]

    def needs_finite_input(self, step: int) -> bool:
        return False

    def compressed_mean(self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int) -> Tensor:
        if buffer.element_size() <= torch.finfo(self.dtype).bits // 8:
            return comm.mean(buffer)
        narrow = buffer.div_(comm.world_size).to(self.dtype)
        return buffer.copy_(comm.all_reduce(narrow))


@dataclass(eq=False)
class FP16(_Cast):
    """Allreduce in float16: half the bytes. Values beyond +-65504 x world size overflow to inf, as in torch's hook."""

    name: ClassVar[str] = "fp16"
    dtype: ClassVar[torch.dtype] = torch.float16


@dataclass(eq=False)
class BF16(_Cast):
    """Allreduce in bfloat16: half the bytes, float32's range. Works on gloo/CPU, which torch's bf16 hook refuses."""

    name: ClassVar[str] = "bf16"
    dtype: ClassVar[torch.dtype] = torch.bfloat16


class _ErrorFeedback(Compressor):
    """A compressor that can carry what it did not send into the next step (residual = input - contributed)."""

    error_feedback: bool
    residuals: _PerParameter

    def _with_residuals(self, buffer: Tensor, layout: BucketLayout) -> Tensor:
        """A float32 copy of `buffer` plus this rank's residuals."""
        corrected = buffer.to(torch.float32, copy=True)
        if self.error_feedback:
            for name, view in zip(layout.names, layout.split(corrected), strict=True):
                residual = self.residuals.get(name, view.device, view.dtype, view.shape)
                if residual is not None:
                    view.add_(residual)
        return corrected

    def _keep_residuals(self, residual: Tensor, layout: BucketLayout) -> None:
        if self.error_feedback:
            for name, view in zip(layout.names, layout.split(residual), strict=True):
                self.residuals.put(name, view)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "residuals": self.residuals.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.residuals.load_state_dict(state["residuals"])


@dataclass(eq=False)
class Int8(_ErrorFeedback):
    """Allreduce in int8 with stochastic rounding: about a quarter of the bytes, unbiased, summed by the allreduce.

    Every 1024 elements of a parameter share a scale, agreed across ranks by a MAX allreduce of |x| (0.4% extra
    bytes). Each rank rounds into +-floor(127 / world_size) levels so the int8 SUM cannot overflow; precision
    therefore falls as the world grows (63 levels for 2 ranks, 15 for 8), and more than 127 ranks are refused.
    Scales and noise are per parameter, so the result does not depend on how DDP happens to bucket parameters
    (which differs between the first step of a run, resumed or not, and later steps).

    Args:
        error_feedback: add what rounding lost to the next step's gradient.
        seed: base of the rounding noise, derived per parameter, step and rank (nothing to save, resumes exactly).
    """

    name: ClassVar[str] = "int8"
    chunk_size: ClassVar[int] = 1024
    error_feedback: bool = True
    seed: int = 0
    residuals: _PerParameter = field(default_factory=_PerParameter, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_bool("error_feedback", self.error_feedback)
        check_int("seed", self.seed, 0)

    def compressed_mean(self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int) -> Tensor:
        levels = 127 // comm.world_size
        if levels < 1:
            raise RuntimeError(f"Int8 compression sums int8 and supports at most 127 processes, not {comm.world_size}")
        corrected = self._with_residuals(buffer, layout)
        pieces = corrected.split(layout.numels)
        chunk = self.chunk_size
        scales = torch.cat(
            [F.pad(piece, (0, -piece.numel() % chunk)).view(-1, chunk).abs().amax(1) for piece in pieces]
        )
        step_sizes = (comm.all_reduce(scales, dist.ReduceOp.MAX) / levels).clamp_min(torch.finfo(torch.float32).tiny)
        per_element = torch.cat(
            [
                sizes.repeat_interleave(chunk)[: piece.numel()]
                for sizes, piece in zip(step_sizes.split([-(-n // chunk) for n in layout.numels]), pieces, strict=True)
            ]
        )
        noise = torch.empty_like(corrected)
        for name, piece in zip(layout.names, noise.split(layout.numels), strict=True):
            generator = torch.Generator(noise.device).manual_seed(_seed(self.seed, name, step, comm.rank))
            torch.rand(piece.shape, generator=generator, device=noise.device, out=piece)
        quantized = torch.floor(corrected / per_element + noise).clamp_(-levels, levels)
        self._keep_residuals(corrected.sub_(quantized * per_element), layout)
        summed = comm.all_reduce(quantized.to(torch.int8)).to(torch.float32)
        return buffer.copy_(summed.mul_(per_element).div_(comm.world_size))


@dataclass(eq=False)
class TopK(_ErrorFeedback):
    """Send only the largest-magnitude `ratio` of each parameter's gradient, as (value, index) pairs.

    Indices differ per rank, so this is an allgather (values in the buffer's dtype and int32 indices in one
    collective), not an allreduce: bytes per rank are 2 x ratio of dense for float32, but every rank receives
    world_size such payloads. Selection is per parameter (at least one element each), so it does not depend on how
    DDP groups parameters into buckets.

    Args:
        ratio: share of each gradient's elements sent, in (0, 1].
        error_feedback: keep what was not sent and add it to the next step (without it top-k rarely converges).
    """

    name: ClassVar[str] = "topk"
    ratio: float = 0.01
    error_feedback: bool = True
    residuals: _PerParameter = field(default_factory=_PerParameter, init=False, repr=False)

    def __post_init__(self) -> None:
        is_number = isinstance(self.ratio, (int, float)) and not isinstance(self.ratio, bool)
        check(is_number and 0 < self.ratio <= 1, "ratio", self.ratio, "must be in (0, 1]")
        _check_bool("error_feedback", self.error_feedback)

    def compressed_mean(self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int) -> Tensor:
        corrected = self._with_residuals(buffer, layout).to(buffer.dtype)
        offsets = [0, *itertools.accumulate(layout.numels)]
        index = torch.cat(
            [
                piece.abs().topk(max(1, math.ceil(self.ratio * piece.numel())), sorted=False).indices + offset
                for piece, offset in zip(corrected.split(layout.numels), offsets, strict=False)
            ]
        )
        index_dtype = torch.int32 if corrected.numel() < 2**31 else torch.int64
        values = corrected[index]
        payload = torch.cat([values.view(torch.uint8), index.to(index_dtype).view(torch.uint8)])
        value_bytes = values.numel() * values.element_size()
        total = torch.zeros_like(corrected)
        # One rank at a time: indices are unique within a rank, so the order of the sum is fixed, even on CUDA.
        for row in comm.all_gather(payload):
            total.index_add_(0, row[value_bytes:].view(index_dtype).long(), row[:value_bytes].view(corrected.dtype))
        corrected[index] = 0
        self._keep_residuals(corrected.to(torch.float32), layout)
        return buffer.copy_(total.div_(comm.world_size))


@dataclass(eq=False)
class PowerSGD(Compressor):
    """Rank-`rank` approximation of each gradient matrix by power iteration (Vogels et al., 2019).

    Each gradient of dim >= 2 is a (rows, cols) matrix M; where rank x (rows + cols) < rows x cols, P = M Q is
    allreduced (together with the bucket's other, dense, elements), orthonormalized (QR, float32), Q = M^T P is
    allreduced, and the average is approximated by P Q^T / world_size. Steps before `start_step` are dense.
    Synchronous collectives: unlike torch's `powerSGD_hook`, it does not deadlock on gloo.

    Args:
        rank: rank of the approximation; bytes per matrix are rank x (rows + cols).
        start_step: first compressed step; >= 2 with error feedback (torch's rule: the first steps run dense).
        error_feedback: carry M - P Q^T into the next step.
        warm_start: reuse last step's Q (one power iteration per step refines it); else a fresh random Q.
        seed: seed of the random initial Q, identical on every rank.
    """

    name: ClassVar[str] = "powersgd"
    rank: int = 4
    start_step: int = 100
    error_feedback: bool = True
    warm_start: bool = True
    seed: int = 0
    residuals: _PerParameter = field(default_factory=_PerParameter, init=False, repr=False)
    qs: _PerParameter = field(default_factory=_PerParameter, init=False, repr=False)

    def __post_init__(self) -> None:
        check_int("rank", self.rank, 1)
        check_int("start_step", self.start_step, 0)
        _check_bool("error_feedback", self.error_feedback)
        _check_bool("warm_start", self.warm_start)
        check_int("seed", self.seed, 0)
        check(
            self.start_step >= 2 or not self.error_feedback,
            "start_step",
            self.start_step,
            "must be >= 2 with error_feedback=true (the first steps run dense, as in torch's PowerSGD)",
        )

    @property
    def compress_from(self) -> int:
        return self.start_step

    def needs_finite_input(self, step: int) -> bool:
        return step >= self.start_step

    def compresses(self, shape: Sequence[int]) -> bool:
        """Whether a gradient of this shape is sent as P and Q (else it goes dense)."""
        if len(shape) < 2:
            return False
        rows = shape[0]
        cols = math.prod(shape) // rows
        return self.rank * (rows + cols) < rows * cols

    def compressed_mean(self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int) -> Tensor:
        if step < self.start_step:
            return comm.mean(buffer)
        dense: list[Tensor] = []
        matrices: list[tuple[str, Tensor, Tensor]] = []  # name, gradient view, float32 matrix + residual
        for name, grad in zip(layout.names, layout.split(buffer), strict=True):
            if self.compresses(grad.shape):
                matrices.append((name, grad, self._matrix(name, grad)))
            else:
                dense.append(grad)
        ps = [matrix @ self._q(name, matrix, step) for name, _, matrix in matrices]
        # One collective carries the dense elements and every P: two collectives per bucket, not three.
        dense_numel = sum(grad.numel() for grad in dense)
        first = torch.cat(
            [grad.reshape(-1) / comm.world_size for grad in dense] + [p.reshape(-1).to(buffer.dtype) for p in ps]
        )
        dense_part, p_part = comm.all_reduce(first).split([dense_numel, first.numel() - dense_numel])
        for grad, piece in zip(dense, dense_part.split([grad.numel() for grad in dense]), strict=True):
            grad.copy_(piece.view(grad.shape))
        if not matrices:
            return buffer
        ps = [
            torch.linalg.qr(piece.view(p.shape).to(torch.float32)).Q
            for piece, p in zip(p_part.split([p.numel() for p in ps]), ps, strict=True)
        ]
        qs = [matrix.T @ p for (_, _, matrix), p in zip(matrices, ps, strict=True)]
        second = comm.all_reduce(torch.cat([q.reshape(-1).to(buffer.dtype) for q in qs]))
        for (name, grad, matrix), p, piece in zip(matrices, ps, second.split([q.numel() for q in qs]), strict=True):
            q = piece.view(matrix.shape[1], -1).to(torch.float32).div_(comm.world_size)
            approximation = p @ q.T
            if self.warm_start:
                self.qs.put(name, q)
            if self.error_feedback:
                self.residuals.put(name, matrix.sub_(approximation))
            grad.copy_(approximation.view(grad.shape))
        return buffer

    def _matrix(self, name: str, grad: Tensor) -> Tensor:
        """The gradient as a float32 (rows, cols) matrix, plus this rank's residual."""
        matrix = grad.reshape(grad.shape[0], -1).to(torch.float32, copy=True)
        residual = self.residuals.get(name, matrix.device, torch.float32, matrix.shape) if self.error_feedback else None
        return matrix if residual is None else matrix.add_(residual)

    def _q(self, name: str, matrix: Tensor, step: int) -> Tensor:
        """The Q to multiply with: last step's (warm start) or a fresh random one, the same on every rank."""
        cols = matrix.shape[1]
        if self.warm_start:
            q = self.qs.get(name, matrix.device, torch.float32, (cols, self.rank))
            if q is not None:
                return q
        generator = torch.Generator().manual_seed(_seed(self.seed, name, step if not self.warm_start else 0))
        return torch.randn(cols, self.rank, generator=generator).to(matrix.device)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "residuals": self.residuals.state_dict(), "q": self.qs.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.residuals.load_state_dict(state["residuals"])
        self.qs.load_state_dict(state["q"])


def _median(seconds: list[float]) -> float:
    return statistics.median(seconds) if seconds else math.inf


def _synchronize(tensor: Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


@dataclass(eq=False)
class Auto(Compressor):
    """Compression only where it pays: times a dense allreduce and `candidate`, then keeps the faster for good.

    For `probe_steps` steps each it times this rank's work inside the hook (communication plus compression, the
    device synchronized) with a dense allreduce and then with the candidate. Ranks agree on the slowest rank's
    median step time, and the candidate is kept only if it is faster by more than `margin`. Until then it sends
    dense. The candidate probe starts no earlier than the candidate's `compress_from`, so PowerSGD's dense warm-up
    is never mistaken for compression, and step 0 (DDP's bucket rebuild, first allocations) is never timed.
    The decision and the measurements are state, so a resumed run keeps its choice. Dropping the candidate drops
    what its error feedback still held: one probe's worth of gradient, once.

    Args:
        candidate: the compressor to try; default ``PowerSGD()``.
        probe_steps: steps timed for each of dense and candidate, >= 1.
        margin: the relative speed-up the candidate must beat, in [0, 1).

    Example::

        Auto(candidate=PowerSGD(rank=4, start_step=100), probe_steps=20)  # decides at step 120
    """

    name: ClassVar[str] = "auto"
    candidate: Compressor = field(default_factory=PowerSGD)
    probe_steps: int = 20
    margin: float = 0.05
    decision: str = field(default="undecided", init=False)
    measured_seconds: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    dense_seconds: list[float] = field(default_factory=list, init=False, repr=False)
    candidate_seconds: list[float] = field(default_factory=list, init=False, repr=False)
    dense: Dense = field(default_factory=Dense, init=False, repr=False)

    def __post_init__(self) -> None:
        check(
            isinstance(self.candidate, Compressor) and not isinstance(self.candidate, Auto),
            "candidate",
            self.candidate,
            "must be a compressor other than Auto, e.g. PowerSGD(rank=4)",
        )
        check_int("probe_steps", self.probe_steps, 1)
        is_number = isinstance(self.margin, (int, float)) and not isinstance(self.margin, bool)
        check(is_number and 0 <= self.margin < 1, "margin", self.margin, "must be in [0, 1)")

    @property
    def probe_start(self) -> int:
        """The first (dense) probe step."""
        return max(1, self.candidate.compress_from - self.probe_steps)

    @property
    def decide_step(self) -> int:
        """The step whose first bucket settles the decision."""
        return self.probe_start + 2 * self.probe_steps

    def needs_finite_input(self, step: int) -> bool:
        return False  # the compressor it hands the bucket to guards itself

    def compressed_mean(self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int) -> Tensor:
        if self.decision == "undecided" and step >= self.decide_step:
            self._decide(comm)
        if self.decision != "undecided":
            winner = self.candidate if self.decision == "candidate" else self.dense
            return winner.allreduce_mean(buffer, layout, comm, step)
        if step < self.probe_start:
            return self.dense.allreduce_mean(buffer, layout, comm, step)
        candidate_start = self.probe_start + self.probe_steps
        compressor: Compressor
        if step < candidate_start:
            compressor, seconds, slot = self.dense, self.dense_seconds, step - self.probe_start
        else:
            compressor, seconds, slot = self.candidate, self.candidate_seconds, step - candidate_start
        _synchronize(buffer)
        start = time.perf_counter()
        result = compressor.allreduce_mean(buffer, layout, comm, step)
        _synchronize(result)
        seconds.extend([0.0] * (slot + 1 - len(seconds)))
        seconds[slot] += time.perf_counter() - start
        return result

    def _decide(self, comm: Collectives) -> None:
        medians = torch.tensor([_median(self.dense_seconds), _median(self.candidate_seconds)], dtype=torch.float64)
        dense_seconds, candidate_seconds = comm.all_reduce(medians, dist.ReduceOp.MAX).tolist()
        self.measured_seconds = {"dense": dense_seconds, "candidate": candidate_seconds}
        self.decision = "candidate" if candidate_seconds < dense_seconds * (1 - self.margin) else "dense"
        log.info(
            "Auto compression: dense %.3f ms/step, %s %.3f ms/step -> %s",
            dense_seconds * 1e3,
            self.candidate.name,
            candidate_seconds * 1e3,
            self.decision,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "decision": self.decision,
            "measured_seconds": dict(self.measured_seconds),
            "dense_seconds": list(self.dense_seconds),
            "candidate_seconds": list(self.candidate_seconds),
            "candidate": self.candidate.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.decision = state["decision"]
        self.measured_seconds = dict(state["measured_seconds"])
        self.dense_seconds = list(state["dense_seconds"])
        self.candidate_seconds = list(state["candidate_seconds"])
        self.candidate.load_state_dict(state["candidate"])

"""`Int8`: allreduce in int8 with error feedback (or stochastic rounding), about a quarter of the bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_eff.compression.base import check_bool
from lightning_eff.compression.error_feedback import ErrorFeedback
from lightning_eff.compression.transport import BucketLayout, Collectives, PerParameterState, shared_seed
from lightning_eff.validation import check_choice, check_int

# Rounding noise has 16 bits: u = (k + 0.5) / 2**16 for k uniform in [0, 2**16), so E[floor(y + u)] is within
# 2**-17 of a level of y (torch.rand's float32 noise is itself a 2**-24 grid). Each 64-bit draw of the generator
# gives four such values, a quarter of the draws `torch.rand` would make; the draws were most of Int8's cost.
_NOISE_BITS = 16
_NOISE_SCALE = 2.0**-_NOISE_BITS
_NOISE_OFFSET = 0.5 + 0.5 * _NOISE_SCALE  # int16 k in [-2**15, 2**15) -> (k + 2**15 + 0.5) / 2**16
_DRAWS_PER_INT64 = 64 // _NOISE_BITS
ROUNDINGS = ("auto", "nearest", "stochastic")


# Narrowest sub-row a run of parameters may share. A sub-row's width divides its parameters' sizes and the chunk
# size; Int8 works on (rows, width) views with each row's step size broadcast along it, one operation per run of
# parameters. A broadcast over rows narrower than this costs more per element than starting another run (~5 us).
_MIN_ROW_WIDTH = 32


@dataclass(frozen=True)
class _Plan:
    """What only depends on a bucket's layout, worked out once: how its buffer tiles into sub-rows, which chunk
    each sub-row belongs to, and the noise draws per parameter."""

    runs: tuple[tuple[int, int, int], ...]  # (start, rows, width): (rows, width) views that tile the buffer in order
    chunk_of_row: Tensor  # int64, one per sub-row: the index of its chunk (chunks never span two parameters)
    chunks: int
    draws: tuple[int, ...]  # per parameter: int64 draws for its noise (four values each)


def row_runs(numels: list[int], chunk_size: int) -> tuple[tuple[tuple[int, int, int], ...], list[int]]:
    """A bucket tiled into runs of equal-width sub-rows, and each chunk's length in sub-rows, in buffer order.

    Every parameter is cut into whole chunks of `chunk_size` and one shorter last chunk (so the result does not
    depend on bucketing). A sub-row's width divides its parameter's size and the chunk size, so every chunk is a
    whole number of sub-rows; consecutive parameters share a run while a common width of at least
    `_MIN_ROW_WIDTH` divides them all (a GPT's bucket is one run of 128-wide rows)."""
    groups: list[tuple[list[int], int]] = []  # per run: its parameters' indices and its row width
    for index, numel in enumerate(numels):
        own = math.gcd(numel, chunk_size)
        shared = math.gcd(groups[-1][1], own) if groups else 0
        if groups and (shared >= _MIN_ROW_WIDTH or shared == groups[-1][1] == own):
            groups[-1] = (groups[-1][0] + [index], shared)
        else:
            groups.append(([index], own))
    runs, chunk_rows, start = [], [], 0
    for group, width in groups:
        size = sum(numels[index] for index in group)
        runs.append((start, size // width, width))
        for index in group:
            full, rest = divmod(numels[index], chunk_size)
            chunk_rows += [chunk_size // width] * full + ([rest // width] if rest else [])
        start += size
    return tuple(runs), chunk_rows


class _Workspace:
    """Scratch tensors reused from bucket to bucket: on the CPU a fresh tensor of a bucket's size costs more in
    page faults than the arithmetic on it, so Int8 allocates its working memory once, for the largest bucket."""

    def __init__(self) -> None:
        self.tensors: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def _get(self, numel: int, dtype: torch.dtype, device: torch.device, rows: int = 1) -> Tensor:
        tensor = self.tensors.get((device, dtype))
        if tensor is None or tensor.shape[-1] < numel:
            tensor = self.tensors[(device, dtype)] = torch.empty(rows, numel, dtype=dtype, device=device)
        return tensor[:, :numel]

    def get(self, numel: int, draws: int, device: torch.device) -> tuple[Tensor, ...]:
        """Two float32 tensors, an int16 and an int8 of `numel` elements, and `draws` int64s, on `device`."""
        floats = self._get(numel, torch.float32, device, rows=2)
        noise = self._get(numel, torch.int16, device)[0]
        summed = self._get(numel, torch.int8, device)[0]
        return floats[0], floats[1], noise, summed, self._get(draws, torch.int64, device)[0]


@dataclass(eq=False)
class Int8(ErrorFeedback):
    """Allreduce in int8: about a quarter of the bytes, summed by the allreduce itself.

    Every 1024 elements of a parameter share a scale, agreed across ranks by a MAX allreduce of |x| (0.4% extra
    bytes). Each rank rounds into +-floor(127 / world_size) levels so the int8 SUM cannot overflow; precision
    therefore falls as the world grows (63 levels for 2 ranks, 15 for 8), and more than 127 ranks are refused.
    Scales and noise are per parameter, so the result does not depend on how DDP happens to bucket parameters
    (which differs between the first step of a run, resumed or not, and later steps).

    Rounding: with error feedback each element is rounded to the nearest level, and what that loses is added to
    the next step's gradient, so no error is dropped and the sum over steps is exact up to the last residual
    (error-feedback SGD, 1-bit SGD). Without it, rounding is stochastic, so that each step's average is unbiased.
    Noise on top of error feedback would only add variance, and it was half of Int8's compute (`rounding=auto`:
    nearest with error feedback, stochastic without; either can be forced).

    Cost: step sizes are never spread over the bucket. The buffer is viewed as rows as wide as every parameter
    and the chunk size allow (`row_runs`: 128 for a GPT, so one run for the whole bucket), each row's step size
    is broadcast along it, and one operation per run finds maxima, divides, keeps residuals and rescales the sum:
    eight passes over the bucket in all with nearest rounding. Stochastic rounding's noise is 16-bit
    (`_NOISE_BITS`: unbiased to 2**-17 of a level, four values per 64-bit draw where `torch.rand` makes one draw
    per value), from a generator per parameter (a few small operations each). Working memory is reused
    (`_Workspace`, 11 bytes per element of the largest bucket) and residuals are copied into tensors kept from
    step to step.

    Args:
        error_feedback: add what rounding lost to the next step's gradient.
        seed: base of the rounding noise, derived per parameter, step and rank (nothing to save, resumes exactly).
        rounding: ``auto`` (nearest with error feedback, stochastic without), ``nearest`` or ``stochastic``.
    """

    name: ClassVar[str] = "int8"
    chunk_size: ClassVar[int] = 1024
    error_feedback: bool = True
    seed: int = 0
    rounding: str = "auto"
    residuals: PerParameterState = field(default_factory=PerParameterState, init=False, repr=False)
    _plans: dict[BucketLayout, _Plan] = field(default_factory=dict, init=False, repr=False)
    _workspace: _Workspace = field(default_factory=_Workspace, init=False, repr=False)
    _flat: dict[BucketLayout, Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_bool("error_feedback", self.error_feedback)
        check_int("seed", self.seed, 0)
        check_choice("rounding", self.rounding, ROUNDINGS)

    @property
    def stochastic(self) -> bool:
        """Whether rounding draws noise: forced, or `auto` without error feedback."""
        return self.rounding == "stochastic" or (self.rounding == "auto" and not self.error_feedback)

    def compressed_mean(self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int) -> Tensor:
        levels = 127 // comm.world_size
        if levels < 1:
            raise RuntimeError(f"Int8 compression sums int8 and supports at most 127 processes, not {comm.world_size}")
        plan = self._plan(layout, buffer.device)
        stochastic = self.stochastic
        corrected, quantized, noise, summed, draws = self._workspace.get(
            buffer.numel(), sum(plan.draws) if stochastic else 0, buffer.device
        )
        residual = self._flat_residual(layout, buffer.device) if self.error_feedback else None
        if buffer.dtype == torch.float32:  # the result overwrites it anyway: work in it (an in-place add is cheaper)
            corrected = buffer if residual is None else buffer.add_(residual)
        elif residual is None:
            corrected.copy_(buffer)
        else:
            torch.add(buffer, residual, out=corrected)
        maxima = self._chunk_maxima(torch.abs(corrected, out=quantized), plan)
        step_sizes = comm.all_reduce(maxima, dist.ReduceOp.MAX).div_(levels).clamp_min_(torch.finfo(torch.float32).tiny)
        row_steps = step_sizes.index_select(0, plan.chunk_of_row)  # each sub-row's step size, broadcast along it
        if stochastic:
            quantized.copy_(self._noise(noise, draws, layout, plan, step, comm.rank))
            quantized.mul_(_NOISE_SCALE).add_(_NOISE_OFFSET)
            for q, x, s in self._rows(plan, row_steps, quantized, corrected):
                q.addcdiv_(x, s)
            quantized.floor_().clamp_(-levels, levels)  # noise can push x / step = levels one level past it
        else:  # |x| / step <= levels up to one rounding of the division, which the nearest level absorbs: no clamp
            for q, x, s in self._rows(plan, row_steps, quantized, corrected):
                torch.div(x, s, out=q)
            quantized.round_()
        if residual is not None:
            for r, x, q, s in self._rows(plan, row_steps, residual, corrected, quantized):
                torch.addcmul(x, q, s, value=-1, out=r)
        comm.all_reduce(summed.copy_(quantized))
        # The mean: each sum times its step size over the world size (folded into the few step sizes, not the bucket).
        out = buffer if buffer.dtype == torch.float32 else quantized
        for o, total, s in self._rows(plan, row_steps.div_(comm.world_size), out, summed):
            torch.mul(total, s, out=o)
        return buffer if out is buffer else buffer.copy_(out)

    @staticmethod
    def _rows(plan: _Plan, row_steps: Tensor, *flats: Tensor) -> list[tuple[Tensor, ...]]:
        """Per run: each flat tensor's (rows, width) view, then the run's step sizes as a (rows, 1) column."""
        first = 0
        views = []
        for start, rows, width in plan.runs:
            pieces = [flat[start : start + rows * width].view(rows, width) for flat in flats]
            views.append((*pieces, row_steps[first : first + rows, None]))
            first += rows
        return views

    def _flat_residual(self, layout: BucketLayout, device: torch.device) -> Tensor:
        """This layout's residuals as one bucket-shaped tensor (each parameter's residual a view of it), so adding
        and keeping them is one operation per bucket, not one per parameter. Built when a layout is first seen
        (DDP's first step, a resume, a move), from the residuals the parameters had."""
        flat = self._flat.get(layout)
        if flat is not None and flat.device == device:
            return flat
        flat = torch.zeros(sum(layout.numels), device=device)
        for name, view in zip(layout.names, layout.split(flat), strict=True):
            kept = self.residuals.get(name, device, torch.float32, view.shape)
            if kept is not None:
                view.copy_(kept)
            self.residuals.put(name, view)
        names = set(layout.names)
        self._flat = {other: t for other, t in self._flat.items() if not names & set(other.names)}
        self._flat[layout] = flat
        return flat

    def _plan(self, layout: BucketLayout, device: torch.device) -> _Plan:
        plan = self._plans.get(layout)
        if plan is None or plan.chunk_of_row.device != device:
            runs, chunk_rows = row_runs(layout.numels, self.chunk_size)
            plan = _Plan(
                runs=runs,
                chunk_of_row=torch.repeat_interleave(torch.tensor(chunk_rows)).to(device),
                chunks=len(chunk_rows),
                draws=tuple(-(-n // _DRAWS_PER_INT64) for n in layout.numels),
            )
            self._plans[layout] = plan
        return plan

    def _chunk_maxima(self, magnitude: Tensor, plan: _Plan) -> Tensor:
        """Max |x| of every chunk, in buffer order: each sub-row's maximum (one `amax` per run), then the
        maximum of each chunk's sub-rows. (`torch.linalg.vector_norm(ord=inf)` would skip writing |x| but is 15x
        slower than abs + amax on the CPU, and `aminmax` on the signed values 20x.)"""
        per_run = [magnitude[start : start + n * width].view(n, width).amax(1) for start, n, width in plan.runs]
        row_maxima = per_run[0] if len(per_run) == 1 else torch.cat(per_run)
        maxima = torch.zeros(plan.chunks, dtype=magnitude.dtype, device=magnitude.device)
        return maxima.scatter_reduce_(0, plan.chunk_of_row, row_maxima, "amax")  # |x| >= 0: the zeros change nothing

    def _noise(self, out: Tensor, draws: Tensor, layout: BucketLayout, plan: _Plan, step: int, rank: int) -> Tensor:
        """int16 noise in buffer order, each parameter's from its own generator, seeded by seed, name, step and
        rank: nothing to save, and the same whatever bucket the parameter is in."""
        pieces = []
        for name, numel, region in zip(layout.names, layout.numels, draws.split(plan.draws), strict=True):
            generator = torch.Generator(draws.device).manual_seed(shared_seed(self.seed, name, step, rank))
            region.random_(-(2**63), None, generator=generator)  # all 64 bits: four int16 values
            pieces.append(region.view(torch.int16)[:numel])
        return torch.cat(pieces, out=out)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._flat = {}  # rebuilt from the loaded residuals (copied, so the caller's checkpoint is left alone)

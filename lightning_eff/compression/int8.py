"""`Int8`: allreduce in int8 with stochastic rounding and error feedback, about a quarter of the bytes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from lightning_eff.compression.base import check_bool
from lightning_eff.compression.error_feedback import ErrorFeedback
from lightning_eff.compression.transport import BucketLayout, Collectives, PerParameterState, shared_seed
from lightning_eff.validation import check_int


@dataclass(eq=False)
class Int8(ErrorFeedback):
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
    residuals: PerParameterState = field(default_factory=PerParameterState, init=False, repr=False)

    def __post_init__(self) -> None:
        check_bool("error_feedback", self.error_feedback)
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
            generator = torch.Generator(noise.device).manual_seed(shared_seed(self.seed, name, step, comm.rank))
            torch.rand(piece.shape, generator=generator, device=noise.device, out=piece)
        quantized = torch.floor(corrected / per_element + noise).clamp_(-levels, levels)
        self._keep_residuals(corrected.sub_(quantized * per_element), layout)
        summed = comm.all_reduce(quantized.to(torch.int8)).to(torch.float32)
        return buffer.copy_(summed.mul_(per_element).div_(comm.world_size))

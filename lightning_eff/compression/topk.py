"""`TopK`: send only the largest-magnitude share of each gradient, as (value, index) pairs, with error feedback."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from lightning_eff.compression.base import check_bool
from lightning_eff.compression.error_feedback import ErrorFeedback
from lightning_eff.compression.transport import BucketLayout, Collectives, PerParameterState
from lightning_eff.validation import check_number


@dataclass(eq=False)
class TopK(ErrorFeedback):
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
    residuals: PerParameterState = field(default_factory=PerParameterState, init=False, repr=False)

    def __post_init__(self) -> None:
        check_number("ratio", self.ratio, "must be in (0, 1]", lambda ratio: 0 < ratio <= 1)
        check_bool("error_feedback", self.error_feedback)

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

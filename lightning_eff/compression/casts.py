"""Float casts: `FP16` and `BF16` allreduce the bucket in a narrower float type, with no state to keep.

Both send half the bytes of a float32 allreduce; a bucket that is already that narrow goes as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lightning_eff.compression.base import Compressor
from lightning_eff.compression.transport import BucketLayout, Collectives


class Cast(Compressor):
    """Allreduce in a narrower float type. Stateless, and inf/NaN pass through as in a dense allreduce."""

    dtype: ClassVar[torch.dtype]
    overlaps: ClassVar[bool] = True

    def needs_finite_input(self, step: int) -> bool:
        return False

    def _narrows(self, buffer: Tensor) -> bool:
        """Whether the wire type is narrower than `buffer`'s (else the bucket goes as it is)."""
        return buffer.element_size() > torch.finfo(self.dtype).bits // 8

    def compressed_mean(self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int) -> Tensor:
        if not self._narrows(buffer):
            return comm.mean(buffer)
        narrow = buffer.div_(comm.world_size).to(self.dtype)
        return buffer.copy_(comm.all_reduce(narrow))

    def compressed_mean_async(
        self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int
    ) -> torch.futures.Future[Tensor]:
        if not self._narrows(buffer):
            return comm.mean_async(buffer)
        narrow = buffer.div_(comm.world_size).to(self.dtype)
        return comm.then(comm.all_reduce_async(narrow), lambda summed: comm.completed(buffer.copy_(summed)))


@dataclass(eq=False)
class FP16(Cast):
    """Allreduce in float16: half the bytes. Values beyond +-65504 x world size overflow to inf, as in torch's hook."""

    name: ClassVar[str] = "fp16"
    dtype: ClassVar[torch.dtype] = torch.float16


@dataclass(eq=False)
class BF16(Cast):
    """Allreduce in bfloat16: half the bytes, float32's range. Works on gloo/CPU, which torch's bf16 hook refuses."""

    name: ClassVar[str] = "bf16"
    dtype: ClassVar[torch.dtype] = torch.bfloat16

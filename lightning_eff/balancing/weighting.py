"""Sample-weighted gradient averaging for ranks with unequal batch sizes.

DDP averages gradients over ranks; with per-rank batch sizes b_i that is not the mean over samples. Scaling
each rank's gradient by b_i * world_size / sum(b) before DDP's mean gives sum(b_i g_i) / sum(b_i), the
gradient one process would compute on the whole global batch.
"""

import torch
from torch import Tensor

from lightning_eff.compression.compressors import Collectives


class SampleWeighting:
    """Counts this rank's samples between synchronizing steps and scales its gradient buckets accordingly.

    `CompressionHook` calls `apply` for every bucket, before compressing; the first bucket of a step agrees on
    the step's total sample count with one 4-byte allreduce.
    """

    def __init__(self) -> None:
        self.samples_since_step = 0
        self.weight = 1.0

    def count(self, samples: int) -> None:
        """Add a micro-batch's samples (every micro-batch, accumulation included)."""
        self.samples_since_step += samples

    def apply(self, buffer: Tensor, comm: Collectives, first_bucket: bool) -> None:
        if first_bucket:
            counts = torch.tensor([float(self.samples_since_step)], device=buffer.device)
            total = float(comm.all_reduce(counts).item())
            self.weight = self.samples_since_step * comm.world_size / total if total > 0 else 1.0
            self.samples_since_step = 0
        if self.weight != 1.0:
            buffer.mul_(self.weight)

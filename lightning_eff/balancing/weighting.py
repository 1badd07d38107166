"""Sample-weighted gradient averaging for ranks with unequal batch sizes.

DDP averages gradients over ranks; with per-rank batch sizes b_i that is not the mean over samples. Scaling
each rank's loss by b_i * world_size / sum(b) before backward gives, after DDP's mean, sum(b_i g_i) / sum(b_i):
the gradient one process would compute on the whole global batch. Scaling the loss (not the gradient buckets)
leaves DDP's own overlapped allreduce in place, and happens before any compression hook sees the gradients.
"""


def sample_weight(local_samples: int, global_samples: int, world_size: int) -> float:
    """The factor for this rank's loss: its share of the global batch, times the number of ranks."""
    return local_samples * world_size / global_samples if global_samples > 0 else 1.0

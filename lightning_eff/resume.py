"""Mid-epoch resume: where in the epoch a restored checkpoint left off.

Lightning restores the loops' position from a checkpoint but not the training loader's, so a loader built after
a mid-epoch resume (a SLURM requeue, a crash) would start the epoch again. Any loader that can skip batches (the
reference DataModules', the balancer's sampler) asks here how many to skip.
"""

from __future__ import annotations

import lightning as L


def batches_done_this_epoch(trainer: L.Trainer | None) -> int:
    """Training batches of the current epoch that a restored checkpoint already trained on (0 at an epoch end).

    Read when a loader is built, which Lightning does after restoring the loops' state.
    """
    if trainer is None or not trainer.fit_loop.restarting:
        return 0
    # `processed` counts batches whose optimizer step ran, also when the checkpoint was written in
    # on_train_batch_end (before Lightning marks the batch `completed`).
    progress = trainer.fit_loop.epoch_loop.batch_progress
    if progress.is_last_batch:  # written at the epoch's end: the next epoch starts from its first batch
        return 0
    processed = progress.current.processed  # type: ignore[attr-defined]
    # num_training_batches is still inf while the loader is built, and does not know limit_train_batches yet
    return processed if processed < trainer.num_training_batches else 0

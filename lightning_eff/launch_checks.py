"""Config errors that depend on the size of the data and the number of processes, found before launch.

Under DDP each process trains on its own share of the training set: Lightning's `DistributedSampler` gives each
of W processes ceil(n / W) samples (it pads with repeated samples, ``drop_last=False``), so an epoch has
ceil(n / W / batch_size) batches per process. A ``trainer.val_check_interval`` that fits one process's epoch can
exceed that, and Lightning then fails inside `fit`, once in every rank, after the processes have started.

`check_epoch` applies Lightning's rules to the sizes (a pure function of numbers); `check_before_launch` reads
the sizes from the validated config and the DataModule. `cli.train` calls it before `trainer.fit`: Lightning's
subprocess launcher starts the other ranks in `fit`, so until then only the first process runs, and a refused
config is reported once.
"""

from __future__ import annotations

import math
import sys

from lightning_eff.config import ValidatedConfig
from lightning_eff.validation import check, check_number

BATCH_LIMIT_RULE = "must be a fraction <= 1.0 or a whole number of batches"


def batch_limit(key: str, value: float | None) -> int | float | None:
    """Lightning's reading of a batch limit or `val_check_interval`: None (all, or once per epoch), a fraction
    (a float in [0, 1]) or a batch count (an int, or a whole float above 1: 2.0 is two batches).

    A float above 1 that is not whole (2.5) is a `ConfigError`, where Lightning would raise its own error from
    the Trainer's constructor.
    """
    if value is None:
        return None
    check_number(key, value, BATCH_LIMIT_RULE)
    if isinstance(value, int):
        return value
    if 0 <= value <= 1:
        return value
    check(value % 1 == 0, key, value, BATCH_LIMIT_RULE)
    return int(value)


def batches_per_process(samples: int, world_size: int, batch_size: int, balanced: bool = False) -> int:
    """Training batches each of `world_size` processes gets in one epoch of `samples`.

    Without a balancer, Lightning's `DistributedSampler` pads every process to ceil(samples / world_size)
    samples. With one (`BalancedBatchSampler`), each process gets a slice of every global batch of
    ``batch_size * world_size`` samples; a last global batch too small to give every process a sample joins
    the one before.
    """
    if balanced:
        full, remainder = divmod(samples, batch_size * world_size)
        return full + (1 if remainder >= world_size or full == 0 else 0)
    return math.ceil(math.ceil(samples / world_size) / batch_size)


def check_epoch(
    world_size: int,
    train_samples: int,
    batch_size: int,
    limit_train_batches: float | None = None,
    val_check_interval: float | None = None,
    validates: bool = True,
    balanced: bool = False,
) -> int:
    """The training batches per process per epoch, after `limit_train_batches`; a `ConfigError` naming the key
    for a config that Lightning would refuse (or silently shorten) once the processes run.

    Args:
        world_size: processes (devices x nodes).
        train_samples: samples in the training set.
        batch_size: ``data.batch_size``, samples per batch on each process.
        limit_train_batches: ``trainer.limit_train_batches``: None, a fraction, or a batch count, which must
            not exceed the batches there are (Lightning would quietly train fewer).
        val_check_interval: ``trainer.val_check_interval``; a batch count must not exceed the epoch's batches
            (Lightning's rule, checked in `fit`).
        validates: whether validation runs within epochs (Lightning applies its rule only then:
            ``check_val_every_n_epoch`` set and ``limit_val_batches`` > 0).
        balanced: a balancer splits the global batch (`batches_per_process`).
    """
    processes = f"{world_size} process{'es' if world_size != 1 else ''}"
    per_process = math.ceil(train_samples / world_size)
    check(batch_size <= per_process, "data.batch_size", batch_size,
          f"must be <= {per_process}, the training samples per process ({train_samples} samples, "
          f"{processes})")  # fmt: skip
    available = batches_per_process(train_samples, world_size, batch_size, balanced)
    epoch = f"with {processes} ({train_samples} samples, data.batch_size={batch_size})"
    batches = available
    limit = batch_limit("trainer.limit_train_batches", limit_train_batches)
    if isinstance(limit, int):
        check(limit <= available, "trainer.limit_train_batches", limit,
              f"is more than the {available} training batches per process {epoch}; use at most {available}, or a "
              "fraction such as 0.5")  # fmt: skip
        batches = limit
    elif isinstance(limit, float):
        batches = int(available * limit)
        check(batches >= 1 or limit == 0, "trainer.limit_train_batches", limit,
              f"leaves no training batch of the {available} per process {epoch}; use at least "
              f"{math.ceil(1000 / available) / 1000:g}")  # fmt: skip
    interval = batch_limit("trainer.val_check_interval", val_check_interval)
    if validates and batches > 0 and isinstance(interval, int):
        limited = "" if batches == available else f" after trainer.limit_train_batches={limit_train_batches:g}"
        check(interval <= batches, "trainer.val_check_interval", interval,
              f"must be <= {batches}, the training batches per process {epoch}{limited}; use e.g. "
              f"trainer.val_check_interval={batches}, or a fraction of the epoch such as 0.5")  # fmt: skip
    return batches


def train_set_size(datamodule: object) -> tuple[int, int] | None:
    """(training samples, batch size) of a DataModule that has a sized `train_set` and an int `batch_size`; None
    for any other (a user's own DataModule is not set up here: its `setup` may download or be costly).

    The reference DataModules (`SplitDataModule`) are set up here, which is cheap (data shipped with Python and
    scikit-learn) and side-effect free: their `setup` only builds the splits, and does nothing when Lightning
    calls it again in `fit`.
    """
    # A SplitDataModule instance means its module is imported; not importing it spares other DataModules
    # the import of scikit-learn.
    loading = sys.modules.get("lightning_eff.tasks.loading")
    if loading is not None and isinstance(datamodule, loading.SplitDataModule):
        datamodule.setup("fit")
    train_set = getattr(datamodule, "train_set", None)
    batch_size = getattr(datamodule, "batch_size", None)
    if train_set is None or not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        return None
    try:
        return len(train_set), batch_size
    except TypeError:  # an IterableDataset has no length
        return None


def check_before_launch(settings: ValidatedConfig, datamodule: object) -> None:
    """Refuse, with the key named, a config that Lightning would refuse only once the processes run.

    The batch limits' form is checked always; the sizes only where the number of processes is known
    (``trainer.devices`` a number, not auto or -1) and the DataModule's training set size can be read.
    """
    trainer = settings.trainer
    if trainer.fast_dev_run:
        return  # Lightning then runs one batch of each and ignores the limits and val_check_interval
    for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "val_check_interval"):
        batch_limit(f"trainer.{name}", getattr(trainer, name))
    world_size = trainer.world_size()
    sizes = train_set_size(datamodule) if world_size is not None else None
    if world_size is None or sizes is None:
        return
    check_epoch(
        world_size,
        *sizes,
        limit_train_batches=trainer.limit_train_batches,
        val_check_interval=trainer.val_check_interval,
        validates=trainer.check_val_every_n_epoch is not None and trainer.limit_val_batches != 0,
        balanced=settings.groups.get("balancing") is not None,
    )

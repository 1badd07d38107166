"""Checks that need the data's size and the number of processes (`lightning_eff.launch_checks`)."""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from lightning_eff.balancing.sampler import BalancedBatchSampler, BatchPlan
from lightning_eff.config import validate
from lightning_eff.launch_checks import (
    batch_limit,
    batches_per_process,
    check_before_launch,
    check_epoch,
    train_set_size,
)
from lightning_eff.tasks import DigitsDataModule, TextDataModule
from lightning_eff.validation import ConfigError
from tests.conftest import compose_app_config, run_cli

SIZES = list(itertools.product([1, 7, 64, 100, 1258], [1, 2, 3, 8], [1, 5, 32]))


@pytest.mark.parametrize(("samples", "world_size", "batch_size"), SIZES)
def test_batches_per_process_is_what_lightnings_distributed_sampler_gives(
    samples: int, world_size: int, batch_size: int
) -> None:
    # Lightning's DistributedSampler(Wrapper): drop_last=False, every rank padded to ceil(samples / world_size).
    lengths = {
        len(DataLoader(range(samples), batch_size, sampler=DistributedSampler(range(samples), world_size, rank)))
        for rank in range(world_size)
    }
    assert lengths == {batches_per_process(samples, world_size, batch_size)}


@pytest.mark.parametrize(("samples", "world_size", "batch_size"), [s for s in SIZES if s[0] >= s[1]])
def test_batches_per_process_with_a_balancer_is_what_its_sampler_gives(
    samples: int, world_size: int, batch_size: int
) -> None:
    plan = BatchPlan(batch_sizes=[batch_size] * world_size)
    sampler = BalancedBatchSampler(samples, batch_size * world_size, rank=0, world_size=world_size, plan=plan)
    assert len(sampler) == batches_per_process(samples, world_size, batch_size, balanced=True)


def test_batch_limit_reads_values_as_lightning_does() -> None:
    assert batch_limit("k", None) is None
    assert batch_limit("k", 0.5) == 0.5 and batch_limit("k", 1.0) == 1.0  # fractions
    assert batch_limit("k", 2.0) == 2 and isinstance(batch_limit("k", 2.0), int)  # the app's floats: counts
    assert batch_limit("k", 1) == 1 and isinstance(batch_limit("k", 1), int)  # a Python int is always a count
    for bad in (2.5, "2", True, float("inf")):
        with pytest.raises(ConfigError, match=r"^k=.*: must be a fraction <= 1\.0 or a whole number of batches"):
            batch_limit("k", bad)  # type: ignore[arg-type]


def test_val_check_interval_beyond_the_epoch_of_one_process_is_refused_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as caught:
        check_epoch(world_size=2, train_samples=3278, batch_size=32, val_check_interval=100.0)
    assert str(caught.value) == (
        "trainer.val_check_interval=100: must be <= 52, the training batches per process with 2 processes "
        "(3278 samples, data.batch_size=32); use e.g. trainer.val_check_interval=52, or a fraction of the epoch "
        "such as 0.5"
    )
    assert check_epoch(world_size=1, train_samples=3278, batch_size=32, val_check_interval=100.0) == 103
    assert check_epoch(world_size=2, train_samples=3278, batch_size=32, val_check_interval=52) == 52  # the edge
    assert check_epoch(world_size=2, train_samples=3278, batch_size=32, val_check_interval=0.5) == 52  # a fraction
    assert check_epoch(world_size=2, train_samples=3278, batch_size=32, val_check_interval=100, validates=False) == 52


def test_val_check_interval_counts_the_batches_left_by_limit_train_batches() -> None:
    with pytest.raises(ConfigError, match=r"^trainer\.val_check_interval=30: must be <= 26, .* after "):
        check_epoch(world_size=2, train_samples=3278, batch_size=32, limit_train_batches=0.5, val_check_interval=30)
    with pytest.raises(ConfigError, match=r"must be <= 20, .* after trainer\.limit_train_batches=20;"):
        check_epoch(world_size=1, train_samples=3278, batch_size=32, limit_train_batches=20.0, val_check_interval=30)
    assert check_epoch(world_size=2, train_samples=3278, batch_size=32, limit_train_batches=10) == 10


def test_limit_train_batches_beyond_the_batches_there_are_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        check_epoch(world_size=4, train_samples=1258, batch_size=64, limit_train_batches=6.0)
    assert str(caught.value).startswith(
        "trainer.limit_train_batches=6: is more than the 5 training batches per process with 4 processes "
        "(1258 samples, data.batch_size=64); use at most 5"
    )
    with pytest.raises(ConfigError, match=r"^trainer\.limit_train_batches=0\.01: leaves no training batch of the 5 "):
        check_epoch(world_size=4, train_samples=1258, batch_size=64, limit_train_batches=0.01)
    assert check_epoch(world_size=4, train_samples=1258, batch_size=64, limit_train_batches=0.2) == 1


def test_batch_size_beyond_the_training_samples_of_one_process_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        check_epoch(world_size=8, train_samples=1258, batch_size=200)
    assert str(caught.value) == (
        "data.batch_size=200: must be <= 158, the training samples per process (1258 samples, 8 processes)"
    )
    assert check_epoch(world_size=8, train_samples=1258, batch_size=158) == 1


def test_train_set_size_sets_up_the_reference_datamodules_only() -> None:
    data = DigitsDataModule()
    assert train_set_size(data) == (1258, 64)
    train_set = data.train_set
    data.setup("fit")  # what Lightning does in fit: nothing more happens
    assert data.train_set is train_set
    assert train_set_size(TextDataModule(batch_size=8)) == (3278, 8)

    class OwnData(L.LightningDataModule):
        def setup(self, stage: str) -> None:
            raise AssertionError("a user's DataModule is not set up before launch")

    assert train_set_size(OwnData()) is None

    class Stream(IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(range(3))

    streaming = OwnData()
    streaming.train_set, streaming.batch_size = Stream(), 4  # type: ignore[attr-defined]
    assert train_set_size(streaming) is None
    sized = OwnData()
    sized.train_set, sized.batch_size = torch.zeros(10, 2), 4  # type: ignore[attr-defined]
    assert train_set_size(sized) == (10, 4)


def test_sizes_are_checked_only_where_the_world_size_is_known() -> None:
    for devices in ("auto", "-1"):
        settings = validate(
            compose_app_config(["trainer=ddp_cpu", f"trainer.devices={devices}", "data.batch_size=5000"])
        )
        check_before_launch(settings, DigitsDataModule(batch_size=5000))
    settings = validate(compose_app_config(["data.batch_size=5000", "trainer.fast_dev_run=true"]))
    check_before_launch(settings, DigitsDataModule(batch_size=5000))  # fast_dev_run: one batch, no limits
    settings = validate(compose_app_config(["data.batch_size=5000"]))
    with pytest.raises(ConfigError, match=r"^data\.batch_size=5000: must be <= 1258"):
        check_before_launch(settings, DigitsDataModule(batch_size=5000))


@pytest.mark.slow
def test_cli_refuses_val_check_interval_of_a_ddp_run_once_before_launch(tmp_path: Path) -> None:
    # Lightning would fail inside fit with its own ValueError, once per rank, after both processes started.
    result = run_cli(["experiment=text_gpt", "trainer=ddp_cpu", "trainer.devices=2", "run_dir=run"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        "lightning-eff: error: trainer.val_check_interval=100: must be <= 52, the training batches per process "
        "with 2 processes (3278 samples, data.batch_size=32); use e.g. trainer.val_check_interval=52, or a "
        "fraction of the epoch such as 0.5"
    ]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()

"""The `lightning-eff` app end to end: default run, report, run directory, resume, DDP, loggers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from tests.conftest import read_report, run_cli


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The README's main job: `lightning-eff` with no overrides except a known run_dir."""
    work = tmp_path_factory.mktemp("default")
    result = run_cli([f"run_dir={work / 'run'}"], cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run", result.stdout


def test_default_run_reaches_95_percent_and_reports(default_run: tuple[Path, str]) -> None:
    run_dir, stdout = default_run
    report = read_report(run_dir)["run"]["summary"]
    assert report["test_acc"] >= 0.95
    for key in ("parameters", "model_size_bytes", "train_samples_per_second", "wall_seconds"):
        assert report[key] > 0, key
    assert report["parameters"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert report["model_size_bytes"] == 4 * report["parameters"]
    assert report["world_size"] == 1
    assert "== run ==" in stdout and "test_acc" in stdout


def test_default_run_logs_csv_and_checkpoints(default_run: tuple[Path, str]) -> None:
    run_dir, _ = default_run
    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert any(row.get("val_acc") for row in rows)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_resume_auto_continues_from_newest_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run_cli([f"run_dir={run_dir}", "trainer.max_epochs=2", "test_after_fit=false"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert read_report(run_dir)["run"]["summary"]["global_step"] == 2 * 20
    second = run_cli(
        [f"run_dir={run_dir}", "trainer.max_epochs=3", "resume=auto", "test_after_fit=false"], cwd=tmp_path
    )
    assert second.returncode == 0, second.stderr[-3000:]
    summary = read_report(run_dir)["run"]["summary"]
    assert summary["global_step"] == 3 * 20
    assert summary["train_samples"] < 2 * 1258  # only the third epoch was trained in the second run
    assert "resume=auto: resuming from" in second.stdout + second.stderr


def test_resume_auto_on_an_empty_run_dir_starts_fresh(tmp_path: Path) -> None:
    result = run_cli([f"run_dir={tmp_path / 'run'}", "trainer.max_epochs=1", "resume=auto"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no checkpoint" in result.stdout + result.stderr


def test_tensorboard_logger_writes_event_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli([f"run_dir={run_dir}", "trainer.max_epochs=1", "logger=tensorboard"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_two_process_gloo_ddp_writes_one_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "ddp"
    result = run_cli(
        ["trainer=ddp_cpu", "trainer.devices=2", "trainer.max_epochs=2", f"run_dir={run_dir}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["ddp"]
    assert not (tmp_path / "outputs").exists()
    summary = read_report(run_dir)["run"]["summary"]
    assert summary["world_size"] == 2
    assert summary["global_step"] == 2 * 10  # 1258 samples / 2 ranks = 629 each, 64 per batch, rounded up
    assert summary["train_samples"] == 2 * 1258  # every rank counted: both epochs, both halves
    assert (run_dir / "train_ddp_process_1.log").exists()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 20


def test_python_dash_m_and_console_script_agree(tmp_path: Path) -> None:
    result = run_cli(["--cfg", "job"], cwd=tmp_path)
    assert result.returncode == 0
    assert "_target_: lightning_eff.tasks.DigitsMLP" in result.stdout

"""Nothing lost when a job dies mid-write: atomic writes, and resume=auto skips a checkpoint cut short."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lightning_eff.checkpoints import (
    AtomicCheckpointIO,
    atomic_write_text,
    checkpoint_problem,
    newest_whole_checkpoint,
)
from tests.conftest import read_report, run_cli


def saved(path: Path, value: float) -> Path:
    torch.save({"value": torch.full((256,), value)}, path)
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_a_byte_in_the_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    atomic_write_text(target, "old\n")

    class DiskFull(Exception):
        pass

    def fail_midway(handle: object) -> None:
        handle.write(b"ne")  # type: ignore[attr-defined]
        raise DiskFull

    from lightning_eff.checkpoints import atomic_write

    with pytest.raises(DiskFull):
        atomic_write(target, fail_midway)
    assert target.read_text() == "old\n"
    assert [path.name for path in tmp_path.iterdir()] == ["report.json"]  # no temporary file left behind


def test_atomic_checkpoint_io_writes_a_loadable_file_with_normal_permissions(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 3, "weights": torch.ones(4)}, path)
    assert torch.load(path)["step"] == 3
    assert checkpoint_problem(path) is None
    assert path.stat().st_mode & 0o044  # readable by others as a plain torch.save would be, not mkstemp's 0600
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_truncated_and_corrupted_checkpoints_are_named_and_skipped(tmp_path: Path) -> None:
    old = saved(tmp_path / "old.ckpt", 1.0)
    middle = saved(tmp_path / "middle.ckpt", 2.0)
    new = saved(tmp_path / "new.ckpt", 3.0)
    truncate(new)
    flip_a_byte_in_the_middle(middle)
    for path, mtime in ((old, 1_000), (middle, 2_000), (new, 3_000)):
        os.utime(path, (mtime, mtime))  # rewriting them touched their times
    assert "BadZipFile" in (checkpoint_problem(new) or "")
    assert "CRC" in (checkpoint_problem(middle) or "")
    skipped: list[str] = []
    chosen = newest_whole_checkpoint([old, middle, new], lambda path, why: skipped.append(path.name))
    assert chosen == old and skipped == ["new.ckpt", "middle.ckpt"]
    truncate(old)
    assert newest_whole_checkpoint([old, middle, new], lambda path, why: None) is None


@pytest.mark.slow
def test_resume_auto_skips_a_newest_checkpoint_cut_short(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [f"run_dir={run_dir}", "test_after_fit=false", "trainer.limit_train_batches=5"]
    first = run_cli([*args, "trainer.max_epochs=2"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = sorted(run_dir.rglob("*.ckpt"), key=lambda path: path.stat().st_mtime)
    assert len(checkpoints) >= 2 and not list(run_dir.rglob("*.tmp"))
    newest = checkpoints[-1]
    truncate(newest)  # what kill -9 or a full disk during torch.save leaves behind
    second = run_cli([*args, "trainer.max_epochs=3", "resume=auto"], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    output = second.stdout + second.stderr
    assert f"resume=auto: skipping {newest}" in output
    assert "resume=auto: resuming from" in output
    assert read_report(run_dir)["run"]["summary"]["global_step"] == 3 * 5  # continued, not restarted
    for path in run_dir.rglob("*.ckpt"):
        truncate(path)
    third = run_cli([*args, "trainer.max_epochs=4", "resume=auto"], cwd=tmp_path)
    assert third.returncode == 2
    errors = [line for line in third.stderr.splitlines() if line.startswith("lightning-eff: error:")]
    assert len(errors) == 1 and errors[0].startswith("lightning-eff: error: resume=auto: no whole checkpoint in")
    assert "Traceback" not in third.stderr

"""Checkpoints that survive a job dying mid-write, and a resume that skips one that did not.

`kill -9`, a node failure, preemption or a full disk during `torch.save` leave a truncated file behind. Every
file this project writes goes to a temporary file in the same directory, is fsynced and then renamed over the
target (`atomic_write`, `AtomicCheckpointIO` for Lightning's checkpoints), so a reader sees the old file or the
new one, never half of one. Files written before that rule, or by other tools, can still be broken: the
resume path checks each candidate's zip structure and every member's CRC (`checkpoint_problem`) and resumes
from the newest one that is whole.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary path beside `path`; on a clean exit it is fsynced and renamed to `path`, else removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 would make every checkpoint private
    try:
        yield Path(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
        _fsync_directory(target.parent)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(handle)` on a temporary file beside `path`, then put it in place atomically."""
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        write(handle)
    return Path(path)


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode()))


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (a crash right after it must not bring the old name back)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `torch.save` checkpoint IO, written atomically: `Trainer(plugins=[AtomicCheckpointIO()])`."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        with atomic_path(path) as temporary:
            super().save_checkpoint(checkpoint, temporary, storage_options=storage_options)


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be a whole checkpoint (truncated, corrupted), or None if it is.

    A `torch.save` file is whole when every CRC checks out. A sharded checkpoint (a directory, as FSDP2 under
    `ModelParallelStrategy` writes) is whole when `torch.distributed.checkpoint`'s ``.metadata`` (written after
    every shard) and Lightning's ``meta.pt`` (written after that) are there and whole, and so is every folder of
    shards a plugin wrote beside them (GradualPruning's masks).
    """
    if path.is_dir():
        for folder in [path, *(child for child in path.iterdir() if child.is_dir() and any(child.glob("*.distcp")))]:
            if not (folder / ".metadata").is_file():
                return f"sharded checkpoint without {folder.relative_to(path.parent) / '.metadata'} (cut short)"
        if not (path / "meta.pt").is_file():
            return "sharded checkpoint without meta.pt (cut short)"
        return checkpoint_problem(path / "meta.pt")
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return f"member {broken} fails its CRC check" if broken is not None else None


def newest_whole_checkpoint(candidates: list[Path], skipped: Callable[[Path, str], None]) -> Path | None:
    """The newest of `candidates` (by modification time) that is whole; `skipped(path, why)` for each that is not."""
    for path in sorted(candidates, key=lambda candidate: candidate.stat().st_mtime, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        skipped(path, problem)
    return None

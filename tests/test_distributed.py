"""The exit handler that keeps a finished gloo run from aborting in the interpreter's teardown."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from lightning_eff.distributed import release_process_group
from tests import exit_handler_worker
from tests.workers import run_worker


def test_release_destroys_the_default_group_and_is_a_no_op_without_one(tmp_path: Path) -> None:
    release_process_group()  # nothing initialised: must not raise
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    assert dist.is_initialized()
    release_process_group()
    assert not dist.is_initialized()


def test_registered_handler_destroys_the_group_at_exit_once(tmp_path: Path) -> None:
    result = run_worker(exit_handler_worker, [str(tmp_path / "store")], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "handlers added: 1" in result.stdout
    assert "initialized after our handler: False" in result.stdout

"""The exit handler that keeps a finished gloo run from aborting in the interpreter's teardown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch.distributed as dist

from lightning_eff.distributed import release_process_group


def test_release_destroys_the_default_group_and_is_a_no_op_without_one(tmp_path: Path) -> None:
    release_process_group()  # nothing initialised: must not raise
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    assert dist.is_initialized()
    release_process_group()
    assert not dist.is_initialized()


def test_registered_handler_destroys_the_group_at_exit_once(tmp_path: Path) -> None:
    script = f"""
import atexit, torch, torch.distributed as dist
from lightning_eff.distributed import destroy_process_group_at_exit
atexit.register(lambda: print("initialized after our handler:", dist.is_initialized()))  # LIFO: runs last
before = atexit._ncallbacks()
destroy_process_group_at_exit()
destroy_process_group_at_exit()
print("handlers added:", atexit._ncallbacks() - before)
dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
out = [torch.zeros(3)]
dist.all_gather(out, torch.ones(3))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "handlers added: 1" in result.stdout
    assert "initialized after our handler: False" in result.stdout

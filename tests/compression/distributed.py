"""Run a function on 2 gloo ranks in fresh processes, with a timeout that turns a hang into a failure."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_eff.distributed import release_process_group


def _entry(rank: int, fn: Callable[..., Any], world_size: int, workdir: str, kwargs: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    kwargs = {**kwargs, "workdir": workdir}
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/store",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        result = fn(rank, world_size, **kwargs)
        torch.save(result, Path(workdir) / f"rank{rank}.pt")
    finally:
        release_process_group()  # not a bare destroy: gloo's workers may still need the GIL (see the module)


def run_ranks(
    fn: Callable[..., Any], workdir: Path, world_size: int = 2, timeout: float = 90, **kwargs: Any
) -> list[Any]:
    """`fn(rank, world_size, workdir=..., **kwargs)` on each rank of a new gloo group; the return values by rank."""
    workdir.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(
        _entry, args=(fn, world_size, str(workdir), kwargs), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{fn.__name__} did not finish on {world_size} ranks within {timeout} s: a hang")
    return [torch.load(workdir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]

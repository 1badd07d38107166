"""A one-rank gloo program that registers the exit handler twice, for `tests/test_distributed.py`.

`python -m tests.exit_handler_worker STORE` prints how many atexit handlers the two registrations added and,
from a handler registered before them (atexit runs last-in first-out, so it runs after ours), whether the
process group was still initialized. STORE is the path of the group's file store.
"""

from __future__ import annotations

import argparse
import atexit

import torch
import torch.distributed as dist

from lightning_eff.distributed import destroy_process_group_at_exit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("store", help="file for the process group's FileStore")
    args = parser.parse_args()
    atexit.register(lambda: print("initialized after our handler:", dist.is_initialized()))  # LIFO: runs last
    before = atexit._ncallbacks()
    destroy_process_group_at_exit()
    destroy_process_group_at_exit()
    print("handlers added:", atexit._ncallbacks() - before)
    dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=0, world_size=1)
    out = [torch.zeros(3)]
    dist.all_gather(out, torch.ones(3))


if __name__ == "__main__":
    main()

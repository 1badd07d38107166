"""`CastReduceScatter` called as FSDP2 calls it, on 2 gloo processes: `python -m tests.strategies.comm_worker OUT PORT`.

Each rank reduce-scatters ``arange(8) + 100 * rank`` (float32) with FSDP2's ``AVG`` and with ``SUM``, through
`FP16`, `BF16` and `Dense`, and writes `OUT/rank<N>.json`: its output shard and the bytes counted per compressor.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_eff.compression import BF16, FP16, Dense
from lightning_eff.compression.sharded import CastReduceScatter
from lightning_eff.compression.stats import CompressionStats


def rank_main(rank: int, out: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    result: dict[str, Any] = {}
    for compressor in (FP16(), BF16(), Dense()):
        stats = CompressionStats()
        comm = CastReduceScatter(compressor, stats, dense_element_size=4)
        for op_name, op in (("avg", dist.ReduceOp.AVG), ("sum", dist.ReduceOp.SUM)):
            input_tensor = comm.allocate((8,), dtype=torch.float32, device=torch.device("cpu"))
            input_tensor.copy_(torch.arange(8, dtype=torch.float32) + 100 * rank)
            output = comm.allocate((4,), dtype=torch.float32, device=torch.device("cpu"))
            comm(output, input_tensor, dist.group.WORLD, op)
            result[f"{compressor.name}/{op_name}"] = output.tolist()
        stats.end_step()
        result[f"{compressor.name}/bytes"] = [stats.total.bytes_dense, stats.total.bytes_sent]
    with open(f"{out}/rank{rank}.json", "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()


def main() -> None:
    out, port = sys.argv[1], int(sys.argv[2])
    mp.spawn(rank_main, args=(out, port), nprocs=2)


if __name__ == "__main__":
    main()

"""Load-balanced FSDP2 with one slowed rank: Lightning's ModelParallelStrategy against ThroughputBalancer.

Two CPU processes (gloo, one thread each, rank r pinned to core r) train the small GPT, whose blocks are sharded
with `fully_shard` in `configure_model`. The peer is Lightning's own `ModelParallelStrategy` (every process a
data-parallel rank, equal batches); ours is `EfficientModelParallelStrategy(balancer=ThroughputBalancer(...))`.
Both train the same model, global batch, steps and seed, with rank 1 slowed:

- ``quota`` (default where a cgroup can be written, i.e. as root): rank 1's process in a cgroup with a ``cpu``
  quota of 50% of one core, as in `benchmarks/balancing.py`;
- ``sleep``: rank 1 sleeps `SLEEP_PER_SAMPLE` seconds per sample in every training step, spread over the blocks'
  forwards (a slower device that burns no CPU; use it on a shared machine where a quota cannot be made). FSDP2
  synchronizes the ranks at every block, so the slowdown must be spread like a slower device's, not one stall.

Step time is rank 0's span from `on_train_batch_start` to `on_train_batch_end`; the figure is the median over the
steps after the balancer's first re-plans, and samples/s is the global batch over it. Each method runs `--rounds`
times, alternating, and the medians over all their timed steps are compared.

Usage:
    python benchmarks/fsdp_balance.py [--quick] [--rounds N] [--slowdown auto|quota|sleep] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from balancing import choose_slowdown, join_cgroup, quota_cgroup
from harness import (
    StepRecorder,
    command_line,
    fit,
    free_port,
    job_env,
    machine_facts,
    median,
    print_table,
    progress,
    quiet_lightning,
    worker_command,
    write_json,
)
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_eff.balancing import ThroughputBalancer
from lightning_eff.distributed import destroy_process_group_at_exit
from lightning_eff.strategies import EfficientModelParallelStrategy
from lightning_eff.tasks import TextDataModule, TinyGPT

METHODS = {"plain": "Lightning ModelParallelStrategy (FSDP2)", "balanced": "FSDP2 + ThroughputBalancer"}
SLEEP_PER_SAMPLE = 0.004  # seconds per sample on the slowed rank under `--slowdown sleep`


@dataclass(frozen=True)
class Job:
    method: str
    slowdown: str
    cgroup: str | None
    result_dir: str
    d_model: int
    n_layer: int
    seq_len: int
    batch_size: int  # per rank; the global batch is twice this
    steps: int
    replan_every: int
    seed: int


class SleepyGPT(TinyGPT):
    """The small GPT whose rank 1 sleeps `SLEEP_PER_SAMPLE` per sample of every batch, spread over its blocks.

    FSDP2 synchronizes the ranks at every block (its all-gather), so a slower device is slower in every block;
    one sleep before the forward would be a stall that no split of the batch can hide.
    """

    def configure_model(self) -> None:
        super().configure_model()
        if self.global_rank == 1:
            for block in self.blocks:
                block.register_forward_pre_hook(self._slow_down)

    def _slow_down(self, block: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        time.sleep(SLEEP_PER_SAMPLE * args[0].shape[0] / len(self.blocks))


def worker(job: Job) -> None:
    """Train `job` on this rank and write rank 0's step rows (and the balancer's plans)."""
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    os.sched_setaffinity(0, {rank})
    if job.cgroup is not None and rank == 1:
        join_cgroup(job.cgroup)
    torch.set_num_threads(1)
    quiet_lightning()
    destroy_process_group_at_exit()
    L.seed_everything(job.seed, verbose=False)
    model_class = SleepyGPT if job.slowdown == "sleep" else TinyGPT
    model = model_class(n_layer=job.n_layer, n_head=4, d_model=job.d_model, seq_len=job.seq_len)
    data = TextDataModule(seq_len=job.seq_len, batch_size=job.batch_size)
    if job.method == "plain":
        strategy: ModelParallelStrategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = EfficientModelParallelStrategy(balancer=ThroughputBalancer(replan_every=job.replan_every))
    recorder = StepRecorder(lambda trainer, outputs, batch: {"samples": len(batch[0])})
    fit(model, data, [recorder], devices=2, strategy=strategy, max_steps=job.steps)
    result: dict[str, Any] = {"rows": recorder.rows}
    if isinstance(strategy, EfficientModelParallelStrategy) and strategy.balancer is not None:
        result["plans"] = [entry["batch_sizes"] for entry in strategy.balancer.history]
        result["speeds"] = [[round(speed, 1) for speed in entry["speeds"]] for entry in strategy.balancer.history]
    Path(job.result_dir, f"rank{rank}.json").write_text(json.dumps(result))


def run_job(job: Job) -> list[dict[str, Any]]:
    """One 2-process run (rank 0 is this file with ``--worker``; Lightning starts rank 1); each rank's record."""
    Path(job.result_dir).mkdir(parents=True)
    log = Path(job.result_dir, "log.txt")
    with log.open("w") as handle:
        done = subprocess.run(
            worker_command(__file__, job), env=job_env(free_port()), stdout=handle, stderr=subprocess.STDOUT
        )
    if done.returncode != 0:
        raise SystemExit(f"{job.method} failed (exit {done.returncode}); see {log}")
    return [json.loads(Path(job.result_dir, f"rank{rank}.json").read_text()) for rank in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a smoke run of the harness (numbers mean nothing)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each method, alternating")
    parser.add_argument("--slowdown", choices=["auto", "quota", "sleep"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    if args.worker is not None:
        worker(Job(**json.loads(args.worker)))
        return
    slowdown = choose_slowdown(args.slowdown)
    slowdown = "sleep" if slowdown == "busy" else slowdown  # no busy loop: it would take a core from other users
    steps, measure_from = (12, 6) if args.quick else (60, 30)
    sizes = (
        {"d_model": 64, "n_layer": 1, "seq_len": 32} if args.quick else {"d_model": 128, "n_layer": 2, "seq_len": 64}
    )
    root = Path(f"/tmp/fsdp-balance-{os.getpid()}")
    seconds: dict[str, list[float]] = {method: [] for method in METHODS}
    plans: list[list[int]] = []
    global_batch = 2 * 16
    with quota_cgroup() if slowdown == "quota" else nullcontext() as cgroup:
        for round_index in range(args.rounds):
            for method in METHODS:
                job = Job(method=method, slowdown=slowdown, cgroup=str(cgroup) if cgroup is not None else None,
                          result_dir=str(root / f"{method}-{round_index}"), batch_size=global_batch // 2,
                          steps=steps, replan_every=10, seed=args.seed, **sizes)  # fmt: skip
                progress(f"round {round_index + 1}/{args.rounds}: {METHODS[method]}")
                ranks = run_job(job)
                rows = [row for row in ranks[0]["rows"] if row["step"] >= measure_from]
                seconds[method] += [row["end"] - row["start"] for row in rows]
                plans += ranks[0].get("plans", [])[-1:]
                if "speeds" in ranks[0]:
                    progress(f"  plans {ranks[0]['plans']}, measured samples/s per rank {ranks[0]['speeds']}")
    medians = {method: median(values) for method, values in seconds.items()}
    rates = {method: global_batch / medians[method] for method in METHODS}
    print(machine_facts(f"rank 1 slowed by {'a 50% cpu quota' if slowdown == 'quota' else 'a sleep per sample'}"))
    rows = [(METHODS[method], f"{medians[method] * 1000:.1f}", f"{rates[method]:.1f}", len(seconds[method]))
            for method in METHODS]  # fmt: skip
    print_table("FSDP2, 2 gloo ranks, rank 1 slowed", ["method", "median step ms", "samples/s", "steps"], rows)
    ratio = rates["balanced"] / rates["plain"]
    print(f"balanced / plain throughput: {ratio:.2f}x   final plans (rank 0, rank 1): {plans}")
    print(f"command: {command_line()}")
    write_json(args.json, {"slowdown": slowdown, "median_step_seconds": medians, "samples_per_second": rates,
                           "ratio": ratio, "plans": plans, "job": asdict(job)})  # fmt: skip


if __name__ == "__main__":
    main()

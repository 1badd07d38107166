"""GradualPruning under FSDP2: per-rank memory and step overhead, against FSDP2 alone and against DDP.

Two CPU processes (gloo) train a GPT (the app's `TinyGPT`, scaled up so that its weights and optimizer state
outweigh the interpreter) for a few steps under four setups: FSDP2 (Lightning's `ModelParallelStrategy`, the
model's blocks sharded by its `configure_model`), FSDP2 + `GradualPruning` (90% global unstructured, masks
recomputed every 5 steps from the first), DDP, DDP + `GradualPruning`. Each setup is its own 2-process job,
so its peak memory is its own; the setups run in interleaved rounds and medians are reported.

Memory is the peak resident set of each rank (``ru_maxrss``) minus its resident set just before `fit`: what
training itself adds (weights' shards, gradients, AdamW state, gathered blocks, activations, masks). The
issue's goals: FSDP2 + pruning <= 1.10x FSDP2's per-rank memory, and pruning's step overhead under FSDP2 no
worse than under DDP (the ratio pruned/plain under FSDP2 <= the same ratio under DDP).

GPU part (``--gpu``, for when a CUDA machine is lent): the same four setups on 2 GPUs (NCCL), memory from
`torch.cuda.max_memory_allocated`.

Step times on a shared 2-core machine swing by more than pruning costs, so the callback's own work per step
(its ``on_train_batch_end``: mask updates and applying the masks) is also clocked directly and compared.

Usage:
    python benchmarks/fsdp_pruning.py [--rounds 3] [--steps 20] [--layers 6] [--width 512] [--gpu] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from harness import Goal, finish, free_port, machine_facts, median, print_table, progress, report_goals
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_eff import GradualPruning
from lightning_eff.tasks import TextDataModule, TinyGPT

SETUPS = ("fsdp", "fsdp_prune", "ddp", "ddp_prune")


class StepClock(L.Callback):
    """Wall time of each optimizer step (batch start to batch end), on this rank."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


class TimedPruning(GradualPruning):
    """GradualPruning that clocks its own per-step work (mask updates and applying the masks), on this rank."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hook_seconds: list[float] = []

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        super().on_train_batch_end(*args, **kwargs)
        self.hook_seconds.append(time.perf_counter() - started)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(job: dict[str, Any]) -> None:
    """One setup on this rank; writes its step times and memory to ``job["out"].rank<N>``."""
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    gpu = job["gpu"]
    model = TinyGPT(n_layer=job["layers"], n_head=8, d_model=job["width"], seq_len=64, warmup_steps=1)
    strategy: Any = (ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
                     if job["setup"].startswith("fsdp") else "ddp")  # fmt: skip
    clock = StepClock()
    callbacks: list[L.Callback] = [clock]
    pruning = TimedPruning(target_sparsity=0.9, start_step=0, end_step=job["steps"] // 2, update_every=5)
    if job["setup"].endswith("prune"):
        callbacks.append(pruning)
    trainer = L.Trainer(accelerator="gpu" if gpu else "cpu", devices=2, strategy=strategy, max_steps=job["steps"],
                        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    before = rss_bytes()
    trainer.fit(model, TextDataModule(seq_len=64, batch_size=8, max_bytes=400_000))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    memory = torch.cuda.max_memory_allocated() if gpu else peak_rss - before
    hook = sum(pruning.hook_seconds) / len(pruning.hook_seconds) if pruning.hook_seconds else 0.0
    result = {"step_seconds": median(clock.times[2:]), "memory_bytes": memory, "pruning_seconds_per_step": hook}
    rank = os.environ.get("LOCAL_RANK", "0")
    Path(f"{job['out']}.rank{rank}").write_text(json.dumps(result))


def run_setup(setup: str, args: argparse.Namespace, folder: Path, round_index: int) -> dict[str, float]:
    out = folder / f"{setup}-{round_index}"
    job = {"setup": setup, "steps": args.steps, "layers": args.layers, "width": args.width, "gpu": args.gpu,
           "out": str(out)}  # fmt: skip
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get("PYTHONPATH")]))}  # fmt: skip
    log = folder / f"{setup}-{round_index}.log"
    with log.open("w") as handle:
        code = subprocess.call([sys.executable, __file__, "--worker", json.dumps(job)], env=env, stdout=handle,
                               stderr=subprocess.STDOUT, cwd=folder)  # fmt: skip
    if code != 0:
        raise RuntimeError(f"{setup} failed ({code}); log: {log}")
    ranks = [json.loads(Path(f"{out}.rank{rank}").read_text()) for rank in (0, 1)]
    keys = ("step_seconds", "memory_bytes", "pruning_seconds_per_step")
    return {key: max(rank[key] for rank in ranks) for key in keys}  # the slower rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--gpu", action="store_true", help="2 CUDA devices, NCCL (skipped without them)")
    parser.add_argument("--json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.gpu and torch.cuda.device_count() < 2:
        print("--gpu: needs 2 CUDA devices; skipped")
        return
    print(machine_facts(f"{args.layers} layers x {args.width} wide, {args.steps} steps, {args.rounds} rounds"))
    results: dict[str, list[dict[str, float]]] = {setup: [] for setup in SETUPS}
    with tempfile.TemporaryDirectory(prefix="fsdp-pruning-") as tmp:
        for round_index in range(args.rounds):
            for setup in SETUPS:
                progress(f"round {round_index + 1}/{args.rounds}: {setup}")
                results[setup].append(run_setup(setup, args, Path(tmp), round_index))
    step = {setup: median([r["step_seconds"] for r in runs]) for setup, runs in results.items()}
    memory = {setup: median([r["memory_bytes"] for r in runs]) for setup, runs in results.items()}
    print_table(
        "per rank, medians over rounds (memory: what training adds to the process)",
        ["setup", "step s", "memory MB", "step spread s"],
        [(s, f"{step[s]:.3f}", f"{memory[s] / 1e6:.0f}",
          f"{min(r['step_seconds'] for r in results[s]):.3f}-{max(r['step_seconds'] for r in results[s]):.3f}")
         for s in SETUPS],
    )  # fmt: skip
    hook = {s: median([r["pruning_seconds_per_step"] for r in results[s]]) for s in ("fsdp_prune", "ddp_prune")}
    print(
        f"pruning's own work per step (mask updates every 5 steps and applying the masks, mean over the run): "
        f"FSDP2 {hook['fsdp_prune'] * 1e3:.1f} ms, DDP {hook['ddp_prune'] * 1e3:.1f} ms"
    )
    memory_ratio = memory["fsdp_prune"] / memory["fsdp"]
    fsdp_overhead, ddp_overhead = step["fsdp_prune"] / step["fsdp"], step["ddp_prune"] / step["ddp"]
    goals = report_goals(
        Goal("FSDP2 + pruning per-rank memory <= 1.10x FSDP2", f"{memory_ratio:.3f}x", memory_ratio <= 1.10),
        Goal("pruning's step overhead under FSDP2 <= under DDP", f"{fsdp_overhead:.3f}x vs {ddp_overhead:.3f}x",
             fsdp_overhead <= ddp_overhead),
        Goal("pruning's own work per step under FSDP2 <= under DDP",
             f"{hook['fsdp_prune'] * 1e3:.1f} ms vs {hook['ddp_prune'] * 1e3:.1f} ms",
             hook["fsdp_prune"] <= hook["ddp_prune"]),
    )  # fmt: skip
    report = {"results": results, "goals": goals}
    finish(report, args.json)


if __name__ == "__main__":
    main()

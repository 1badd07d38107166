"""QuantizationAwareTraining's step-time overhead under FSDP2 vs under DDP: 2 CPU processes, the small GPT.

The issue's goal (#13): QAT costs FSDP2 no more than it costs DDP, i.e. (FSDP2+QAT)/FSDP2 <= (DDP+QAT)/DDP.
One 2-process gloo job (Lightning's launcher starts rank 1 with this same command) runs, in every round, one
short fit of each of the four variants (DDP, DDP+QAT, FSDP2 = `ModelParallelStrategy(data_parallel_size=2,
tensor_parallel_size=1)` with each block its own unit, FSDP2+QAT), the order reversed every other round, so
machine noise and drift hit all alike. A variant's step time is rank 0's median over its timed steps (batch
start to batch end: forward, backward, collectives, AdamW; the first `--warmup-steps` of each fit not timed);
its figure is the median over rounds; each overhead ratio is the median over rounds of that round's
QAT/float pair. QAT is ``int8_dynamic_act_int4_weight`` (groups of 32, every Linear and embedding but the
head) fake-quantized from step 0; the conversion after fit is off (not a training cost). One torch thread per
process (2 processes on 2 cores). Every rank trains on its own fixed random token batches.

    python benchmarks/fsdp_qat.py                 # 5 rounds
    python benchmarks/fsdp_qat.py --quick         # 2 rounds of a smaller model: a smoke run

Measured on 2 shared EPYC cores (load average 5-7 from other jobs, torch 2.13 CPU): QAT overhead 1.089x under
FSDP2 vs 1.102x under DDP with ``--rounds 7`` (ratio of overheads 0.989, PASS); a 5-round run just before gave
1.122x vs 1.082x (1.037, MISS). Steps vary 0.6-1.6 s from round to round on this loaded machine, so the two
overheads are equal within the noise; about 7 minutes per 7 rounds here.
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from harness import (
    Goal,
    StepRecorder,
    command_line,
    finish,
    machine_facts,
    print_table,
    progress,
    quiet_lightning,
    report_goals,
    trainer,
)
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_eff.distributed import destroy_process_group_at_exit
from lightning_eff.quantization import QuantizationAwareTraining
from lightning_eff.tasks.gpt import TinyGPT

VARIANTS = ("ddp", "ddp+qat", "fsdp2", "fsdp2+qat")


@dataclass(frozen=True)
class Plan:
    n_layer: int
    d_model: int
    seq_len: int
    batch: int
    rounds: int
    steps: int
    warmup_steps: int


FULL = Plan(n_layer=4, d_model=256, seq_len=128, batch=8, rounds=5, steps=12, warmup_steps=3)
QUICK = Plan(n_layer=2, d_model=64, seq_len=32, batch=4, rounds=2, steps=5, warmup_steps=2)


class RankBatches(Dataset):
    """Fixed random token batches, other ones on each rank (use with ``batch_size=None``)."""

    def __init__(self, plan: Plan, rank: int) -> None:
        self.plan, self.rank = plan, rank

    def __len__(self) -> int:
        return self.plan.steps + self.plan.warmup_steps

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(index + 1000 * self.rank)
        tokens = torch.randint(0, 256, (self.plan.batch, self.plan.seq_len + 1), generator=generator)
        return tokens[:, :-1], tokens[:, 1:]


def step_seconds(plan: Plan, variant: str) -> float:
    """Rank 0's median timed step of one fit of `variant` (every rank runs the fit; others return 0)."""
    L.seed_everything(0, verbose=False)
    recorder = StepRecorder(skip_steps=plan.warmup_steps, global_zero_only=True)
    callbacks: list[L.Callback] = [recorder]
    if variant.endswith("+qat"):
        qat = QuantizationAwareTraining("int8_dynamic_act_int4_weight", group_size=32, convert_on_fit_end=False)
        callbacks.insert(0, qat)  # before the recorder: its per-step work is timed
    strategy: Any = "ddp"
    if variant.startswith("fsdp2"):
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    model = TinyGPT(n_layer=plan.n_layer, n_head=4, d_model=plan.d_model, seq_len=plan.seq_len, warmup_steps=1)
    fitter = trainer(callbacks, devices=2, strategy=strategy, max_steps=plan.steps + plan.warmup_steps,
                     use_distributed_sampler=False)  # fmt: skip
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    fitter.fit(model, DataLoader(RankBatches(plan, rank), batch_size=None))
    return statistics.median(recorder.seconds) if recorder.seconds else 0.0


def main() -> None:
    destroy_process_group_at_exit()  # gloo: a finished run must not abort at exit
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of a smaller model (a smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the four variants (default 5)")
    parser.add_argument("--json", type=str, default=None, help="write the results here as JSON")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.rounds is not None:
        plan = Plan(**{**plan.__dict__, "rounds": args.rounds})
    torch.set_num_threads(1)
    quiet_lightning()
    rank_zero = int(os.environ.get("LOCAL_RANK", "0")) == 0
    report: dict[str, Any] = {"command": command_line(), "machine": machine_facts("1 torch thread per process"),
                              "plan": plan.__dict__}  # fmt: skip
    if rank_zero:
        print(f"command: {report['command']}\nmachine: {report['machine']}")
        model = (
            f"TinyGPT {plan.n_layer} layers, d_model {plan.d_model}, seq {plan.seq_len}, batch {plan.batch} per rank"
        )
        print(f"model: {model}; {plan.steps} timed steps per fit after {plan.warmup_steps}; {plan.rounds} rounds")
    rounds: list[dict[str, float]] = []
    for index in range(plan.rounds):
        order = VARIANTS if index % 2 == 0 else VARIANTS[::-1]
        seconds = {variant: step_seconds(plan, variant) for variant in order}
        rounds.append(seconds)
        if rank_zero:
            progress(
                f"round {index + 1}/{plan.rounds}: " + ", ".join(f"{v} {1e3 * seconds[v]:.1f} ms" for v in VARIANTS)
            )
    if not rank_zero:
        return
    medians = {variant: statistics.median(r[variant] for r in rounds) for variant in VARIANTS}
    ratio = {base: statistics.median(r[f"{base}+qat"] / r[base] for r in rounds) for base in ("ddp", "fsdp2")}
    print_table(
        "median step time (rank 0), ms; QAT overhead = median over rounds of QAT / float",
        ["strategy", "float", "+QAT", "QAT overhead"],
        [
            [base, f"{1e3 * medians[base]:.1f}", f"{1e3 * medians[base + '+qat']:.1f}", f"{ratio[base]:.3f}x"]
            for base in ("ddp", "fsdp2")
        ],
    )
    print(f"\nratio of overheads (FSDP2+QAT)/FSDP2 / ((DDP+QAT)/DDP): {ratio['fsdp2'] / ratio['ddp']:.3f}")
    report.update(rounds=rounds, median_step_seconds=medians, qat_overhead=ratio)
    report["goals"] = report_goals(
        Goal(
            "QAT overhead under FSDP2 no worse than under DDP",
            f"(FSDP2+QAT)/FSDP2 {ratio['fsdp2']:.3f}x vs (DDP+QAT)/DDP {ratio['ddp']:.3f}x",
            ratio["fsdp2"] <= ratio["ddp"],
        )
    )
    finish(report, args.json)


if __name__ == "__main__":
    main()

"""Local SGD against plain DDP: step time, bytes per step and loss of post-local SGD at several periods.

Two CPU processes train the small GPT on the text task with Lightning DDP (gloo): plain DDP (Lightning's
DDPStrategy) and `EfficientDDPStrategy(compression=LocalSGD(period, warmup_steps))` for each period. Every
method runs the same model, data, seed and steps, each as its own `python` job (rank 0 is this file with
``--worker``; Lightning starts rank 1), one after the other. ``--links none`` (the default) runs on the
host's loopback; ``100mbit``/``1gbit`` run inside a network namespace whose loopback is rate-limited with tc
(`scripts/netns-link`, needs root), as `benchmarks/compression.py` does.

Per link it prints, for each method: the median and the mean step time over the steps after warm-up (local SGD's
steps are not alike: every `period`-th one averages the parameters, which the median hides and the mean keeps),
the payload bytes one rank sends per step (plain DDP: 4 bytes per parameter, computed; local SGD: its counted
`CompressionStats`, the mean over the same steps) and the final training and validation loss (after local SGD's
last average, so the model scored is the ranks' consensus), with ratios to plain DDP.

Usage:
    python benchmarks/local_sgd.py [--periods 4,8,16] [--steps 200] [--warmup 20] [--links none,100mbit]
                                   [--d-model 128] [--n-layer 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from compression import NETNS_LINK, namespace
from harness import (
    JobRunner,
    Launch,
    StepRecorder,
    command_line,
    exit_on_sigterm,
    finish,
    fit,
    job_env,
    machine_facts,
    parse_choices,
    print_table,
    progress,
    quiet_lightning,
    validation_loss,
    worker_command,
    write_json,
)
from lightning.pytorch.strategies import DDPStrategy

from lightning_eff import EfficientDDPStrategy
from lightning_eff.compression import LocalSGD
from lightning_eff.distributed import destroy_process_group_at_exit
from lightning_eff.tasks import TextDataModule, TinyGPT

LINKS = ("none", "1gbit", "100mbit")
STARTUP_SECONDS = 240  # a job must finish its first step within this (imports, rendezvous)
STALL_SECONDS = 120  # a job with no finished step for this long is killed


@dataclass(frozen=True)
class Job:
    """One training job, passed as JSON on rank 0's command line (Lightning gives rank 1 the same)."""

    period: int  # 0: plain DDP
    warmup: int
    steps: int
    seed: int
    d_model: int
    n_layer: int
    n_head: int
    seq_len: int
    batch_size: int
    val_windows: int
    result_path: str
    progress_path: str


def label(period: int) -> str:
    return "plain DDP" if period == 0 else f"LocalSGD period {period}"


def worker(job: Job) -> None:
    """Train one method for `job.steps` steps on 2 gloo processes; rank 0 writes the result JSON."""
    torch.set_num_threads(1)  # two ranks on two cores: one thread each
    quiet_lightning()
    destroy_process_group_at_exit()
    L.seed_everything(job.seed, verbose=False)
    model = TinyGPT(n_layer=job.n_layer, n_head=job.n_head, d_model=job.d_model, seq_len=job.seq_len)
    data = TextDataModule(seq_len=job.seq_len, batch_size=job.batch_size)
    strategy: DDPStrategy = (
        DDPStrategy(process_group_backend="gloo")
        if job.period == 0
        else EfficientDDPStrategy(
            compression=LocalSGD(period=job.period, warmup_steps=job.warmup), process_group_backend="gloo"
        )
    )

    def bytes_sent(trainer: L.Trainer, outputs: Any, batch: Any) -> dict[str, Any]:
        stats = getattr(trainer.strategy, "compression_stats", None)
        return {"bytes_sent": stats.last_step.bytes_sent} if stats is not None and stats.steps else {}

    log = StepRecorder(bytes_sent, progress_path=job.progress_path, global_zero_only=True)
    trainer, fit_seconds = fit(model, data, [log], devices=2, strategy=strategy, max_steps=job.steps)
    if not trainer.is_global_zero:
        return
    parameters = sum(p.numel() for p in model.parameters())
    result = {
        "period": job.period,
        "parameters": parameters,
        "fit_seconds": fit_seconds,
        "rows": log.rows,
        "val_loss": validation_loss(model, data, job.val_windows),
    }
    if isinstance(strategy, EfficientDDPStrategy) and strategy.local_sgd is not None:
        section = strategy.local_sgd.report_section()
        result["report"] = section.summary if section is not None else None
    Path(job.result_path).write_text(json.dumps(result))


def summarise(result: dict[str, Any], first_step: int, loss_steps: int) -> dict[str, Any]:
    """Step times (end to end of rank 0's steps), bytes per step and losses over steps `first_step` on."""
    rows = result["rows"]
    by_step = {row["step"]: row for row in rows}
    steps = [row["step"] for row in rows if row["step"] >= first_step and row["step"] - 1 in by_step]
    seconds = [by_step[s]["end"] - by_step[s - 1]["end"] for s in steps]
    if result["period"] == 0:
        payload = 4.0 * result["parameters"]  # DDP's fp32 gradient allreduce, every step
    else:
        payload = statistics.fmean(by_step[s]["bytes_sent"] for s in steps)
    return {
        "median_step_seconds": statistics.median(seconds),
        "mean_step_seconds": statistics.fmean(seconds),
        "payload_bytes_per_step": payload,
        "final_loss": statistics.fmean(row["loss"] for row in rows[-loss_steps:]),
        "val_loss": result["val_loss"],
        "measured_steps": len(steps),
        "report": result.get("report"),
    }


@contextmanager
def link_prefix(link: str) -> Iterator[list[str]]:
    """The command prefix that runs a job over `link`: none for unlimited loopback, else a rate-limited namespace
    (`compression.namespace`, deleted on the way out)."""
    if link == "none":
        yield []
        return
    name = f"lesgd{os.getpid()}-{link}"
    with namespace(name, link):
        yield [str(NETNS_LINK), "exec", name]


def run_link(runner: JobRunner, link: str, jobs: Sequence[Job], first_step: int, loss_steps: int) -> dict[str, Any]:
    """Every method on one link, one job after another; the table, and the summaries by method."""
    context = link_prefix(link)
    summaries: dict[str, Any] = {}
    port = 29600
    with context as prefix:
        for template in jobs:
            port += 1
            stem = runner.stem(f"{link}-p{template.period}")
            job = Job(**{**asdict(template), "result_path": f"{stem}.json", "progress_path": f"{stem}.progress"})
            launch = Launch(
                name=label(job.period),
                command=worker_command(__file__, job, prefix=prefix),
                env=job_env(port, GLOO_SOCKET_IFNAME="lo"),
                log_path=Path(f"{stem}.log"),
                progress_path=Path(job.progress_path),
                result_paths=(Path(job.result_path),),
            )
            progress(f"{link}: {label(job.period)}, {job.steps} steps")
            [outcome] = runner.launch([launch])
            progress(f"{link}: {label(job.period)}: {outcome.status} in {outcome.seconds:.0f}s {outcome.detail}")
            if outcome.status != "completed":
                summaries[label(job.period)] = {"error": f"{outcome.status}: {outcome.detail}"}
                continue
            result = json.loads(Path(job.result_path).read_text())
            summaries[label(job.period)] = summarise(result, first_step, loss_steps)
    print_link(link, summaries, first_step, jobs[0].steps)
    return summaries


def print_link(link: str, summaries: dict[str, Any], first_step: int, steps: int) -> None:
    base = summaries.get(label(0))
    rows = []
    for name, s in summaries.items():
        if "error" in s:
            rows.append([name, s["error"], *["-"] * 8])
            continue
        ok = base is not None and "error" not in base
        rows.append(
            [
                name,
                f"{s['median_step_seconds']:.3f}",
                f"{s['mean_step_seconds']:.3f}",
                f"{base['mean_step_seconds'] / s['mean_step_seconds']:.2f}x" if ok else "-",
                f"{s['payload_bytes_per_step'] / 1e6:.3g} MB",
                f"{base['payload_bytes_per_step'] / s['payload_bytes_per_step']:.1f}x" if ok else "-",
                f"{s['final_loss']:.4f}",
                f"{s['val_loss']:.4f}",
                f"{(s['val_loss'] / base['val_loss'] - 1) * 100:+.2f}%" if ok else "-",
            ]
        )
    header = ["method", "median step s", "mean step s", "speedup (mean)", "payload/step/rank", "x fewer",
              "final train loss", "val loss", "val vs DDP"]  # fmt: skip
    print_table(f"link {link}: {steps} steps per method, times and bytes over steps {first_step}..{steps - 1}",
                header, rows)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--periods", default="4,8,16", help="comma-separated LocalSGD periods")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per method")
    parser.add_argument("--warmup", type=int, default=20, help="LocalSGD warmup_steps (dense DDP steps first)")
    parser.add_argument("--links", default="none", help=f"comma-separated subset of {','.join(LINKS)}")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None, help="write the results here as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Job(**json.loads(args.worker)))
        return
    periods = [int(p) for p in args.periods.split(",") if p.strip()]
    links = parse_choices(args.links, LINKS, "--links", parser)
    if any(link != "none" for link in links) and os.geteuid() != 0:
        sys.exit("local_sgd.py: rate-limited links need root (network namespaces, scripts/netns-link)")
    first_step = args.warmup + 1  # after warm-up (and never DDP's first-step bucket rebuild)
    if args.steps < first_step + max(periods, default=1):
        parser.error(f"--steps must be at least {first_step + max(periods, default=1)}: a whole period after warm-up")
    loss_steps = 5
    # The app's small GPT (conf/model/tiny_gpt.yaml): 4 heads, 128-byte windows.
    template = Job(0, args.warmup, args.steps, args.seed, args.d_model, args.n_layer, 4, 128, 8, 64, "", "")
    jobs = [template, *(Job(**{**asdict(template), "period": p}) for p in periods)]
    parameters = sum(p.numel() for p in TinyGPT(n_layer=args.n_layer, n_head=template.n_head, d_model=args.d_model,
                                                 seq_len=template.seq_len).parameters())  # fmt: skip
    command, machine = command_line(), machine_facts()
    print(f"command: {command}\nmachine: {machine}")
    print(
        f"model: TinyGPT d_model {args.d_model}, {args.n_layer} layers, seq {template.seq_len}: {parameters:,} "
        f"parameters ({parameters * 4 / 1e6:.2f} MB fp32); 2 processes (gloo, 1 thread each), batch "
        f"{template.batch_size}x{template.seq_len} per rank, seed {args.seed}, {args.steps} steps; LocalSGD "
        f"warmup_steps={args.warmup}, periods {periods}\nmeasures: step times and bytes over steps {first_step} on; "
        f"final train loss: rank 0's mean over the last {loss_steps} steps (its own replica); val loss: the first "
        f"{template.val_windows} validation windows, after the final average"
    )
    exit_on_sigterm()
    report: dict[str, Any] = {"command": command, "machine": machine, "job": asdict(template), "links": {}}
    runner = JobRunner("local-sgd-bench-", args.seed, STALL_SECONDS, STARTUP_SECONDS)
    for link in links:
        report["links"][link] = run_link(runner, link, jobs, first_step, loss_steps)
        write_json(args.json, report)
    finish(report, args.json)


if __name__ == "__main__":
    main()

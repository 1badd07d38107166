"""Overlapped PowerSGD: torch's `powerSGD_hook` against lightning_eff's hook, side by side on the same link.

Two CPU processes train the small GPT of `benchmarks/compression.py` with Lightning DDP (gloo) inside a network
namespace whose loopback is unlimited or rate-limited with tc (`scripts/netns-link`). Every method is a comm
hook registered by hand the same way (Lightning registers comm hooks only on CUDA), with the same PowerSGD rank,
the same dense warm-up (torch's ``start_powerSGD_iter`` = our ``start_step``), model, data, seed and steps:

- ``torch``: torch's `powerSGD_hook` (futures chained with ``.then``, no non-finite check);
- ``overlap``: our `CompressionHook` (the default, ``overlap=True``): the bucket's future is returned at once;
- ``sync``: our hook with ``overlap=False``: every collective waited for inside the hook (the earlier behaviour);
- ``unguarded``: ``overlap`` without the non-finite check (its 4-byte MAX allreduce per bucket), to price it.

Jobs run one after another in rounds, the order reversed every other round; per method the median step time
over every round's measured steps is printed, with the ratio to torch's. On a machine whose neighbours' load
changes from minute to minute, jobs land in different load phases; ``--interleave`` instead trains one model per
method in the same 2 processes (plain DDP, no Lightning), one step of each in turn (the order reversed every
step, a barrier before each), so every method sees the same load, step by step. Needs root (network
namespaces) and iproute2.

Usage:
    python benchmarks/overlap.py [--links none,100mbit] [--rounds 2] [--steps 20] [--interleave] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from compression import (
    FULL,
    NETNS_LINK,
    STARTUP_SECONDS,
    HandRegisteredHook,
    Job,
    Plan,
    StepTraffic,
    measure_link,
    namespace,
    summarise,
)
from harness import (
    Goal,
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
    report_goals,
    run_jobs,
    validation_loss,
    worker_command,
    write_json,
)
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from lightning_eff.compression import CompressionHook, CompressionStats, PowerSGD
from lightning_eff.distributed import destroy_process_group_at_exit
from lightning_eff.tasks import TextDataModule, TinyGPT

LINKS = ("none", "100mbit")
METHODS = ("torch", "overlap", "sync", "unguarded")
LABELS = {
    "torch": "torch powerSGD_hook",
    "overlap": "ours, overlapped",
    "sync": "ours, synchronous",
    "unguarded": "ours, overlapped, no inf/NaN check",
}
STEPS = 20
START = 5  # PowerSGD's dense warm-up, both hooks
FIRST_MEASURED = START + 2  # the first compressed steps allocate; DDP rebuilt its buckets long before


class UnguardedPowerSGD(PowerSGD):
    """PowerSGD without the non-finite check, as torch's hook: what the check costs, nothing else changed."""

    def needs_finite_input(self, step: int) -> bool:
        return False


class OurHook(HandRegisteredHook):
    """Our `CompressionHook` registered like torch's, its stats where `StepTraffic` looks for them."""

    def __init__(self, hook: CompressionHook, **kwargs: Any) -> None:
        super().__init__(hook, **kwargs)
        self.compression_stats: CompressionStats = hook.stats


def strategy(method: str, plan: Plan, model: TinyGPT) -> HandRegisteredHook:
    if method == "torch":

        def state() -> PowerSGDState:
            return PowerSGDState(None, matrix_approximation_rank=plan.powersgd_rank, start_powerSGD_iter=START)

        return HandRegisteredHook(powerSGD_hook, state, process_group_backend="gloo")
    compressor_type = UnguardedPowerSGD if method == "unguarded" else PowerSGD
    compressor = compressor_type(rank=plan.powersgd_rank, start_step=START)
    hook = CompressionHook(compressor, module=model, overlap=method != "sync")
    return OurHook(hook, process_group_backend="gloo")


def worker(job: Job) -> None:
    """Train one method for `job.steps` steps on 2 gloo processes; rank 0 writes the result JSON."""
    torch.set_num_threads(1)
    quiet_lightning()
    plan = Plan(**{**job.plan, **{key: tuple(job.plan[key]) for key in ("links", "methods", "peers")}})
    L.seed_everything(job.seed, verbose=False)
    model = TinyGPT(
        n_layer=plan.n_layer,
        n_head=plan.n_head,
        d_model=plan.d_model,
        seq_len=plan.seq_len,
        warmup_steps=plan.warmup_steps,
    )
    data = TextDataModule(seq_len=plan.seq_len, batch_size=plan.batch_size)
    log = StepRecorder(StepTraffic(), progress_path=job.progress_path, global_zero_only=True)
    trainer, fit_seconds = fit(
        model, data, [log], devices=2, strategy=strategy(job.method, plan, model), max_steps=job.steps
    )
    if not trainer.is_global_zero:
        return
    result = {
        "method": job.method,
        "parameters": sum(p.numel() for p in model.parameters()),
        "fit_seconds": fit_seconds,
        "rows": log.rows,
        "val_loss": validation_loss(model, data, plan.val_windows),
    }
    Path(job.result_path).write_text(json.dumps(result))


def interleaved_rank(rank: int, methods: list[str], steps: int, seed: int, result_path: str) -> None:
    """One rank of the interleaved run: a TinyGPT per method, one step of each in turn; rank 0 writes seconds."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    plan = FULL
    runs = {}
    for method in methods:
        torch.manual_seed(seed)
        model = TinyGPT(n_layer=plan.n_layer, n_head=plan.n_head, d_model=plan.d_model, seq_len=plan.seq_len)
        ddp = DistributedDataParallel(model)
        if method == "torch":
            state = PowerSGDState(None, matrix_approximation_rank=plan.powersgd_rank, start_powerSGD_iter=START)
            ddp.register_comm_hook(state, powerSGD_hook)
        else:
            compressor_type = UnguardedPowerSGD if method == "unguarded" else PowerSGD
            hook = CompressionHook(
                compressor_type(rank=plan.powersgd_rank, start_step=START), module=model, overlap=method != "sync"
            )
            ddp.register_comm_hook(None, hook)
        runs[method] = (ddp, torch.optim.AdamW(model.parameters(), lr=3e-4))
    generator = torch.Generator().manual_seed(seed * 10 + rank)
    seconds: dict[str, list[float]] = {method: [] for method in methods}
    for step in range(steps):
        tokens = torch.randint(0, 256, (plan.batch_size, plan.seq_len + 1), generator=generator)
        for method in methods if step % 2 == 0 else methods[::-1]:
            ddp, optimizer = runs[method]
            dist.barrier()
            start = time.perf_counter()
            logits = ddp(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds[method].append(time.perf_counter() - start)
        if rank == 0:
            Path(result_path).write_text(json.dumps({"steps_done": step + 1, "seconds": seconds}))
    dist.barrier()
    dist.destroy_process_group()


def interleaved_job(args: dict[str, Any]) -> None:
    """Both ranks of the interleaved run, started here (inside the namespace)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args["port"]), GLOO_SOCKET_IFNAME="lo")
    mp.spawn(interleaved_rank, args=(args["methods"], args["steps"], args["seed"], args["result"]), nprocs=2)


def run_interleaved(link: str, methods: list[str], steps: int, seed: int, tag: str, port: int) -> dict[str, Any]:
    name = f"{tag}-{link}"
    result = Path(f"/tmp/{name}-interleaved.json")
    job = {"methods": methods, "steps": steps, "seed": seed, "result": str(result), "port": port}
    with namespace(name, link):
        measured_mbit = measure_link(name, link)
        progress(f"{name}: lo measured at {measured_mbit:,.0f} Mbit/s; {steps} interleaved steps of {methods}")
        command = [str(NETNS_LINK), "exec", name, sys.executable, __file__, "--interleaved-worker", json.dumps(job)]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=560, check=False)
    if not result.exists():
        print(f"{link}: interleaved run failed: {completed.stderr[-600:]}")
        return {"failed": completed.stderr[-2000:]}
    data = json.loads(result.read_text())
    if completed.returncode != 0:
        print(f"{link}: interleaved run stopped after {data['steps_done']} steps: {completed.stderr[-400:]}")
    first = FIRST_MEASURED
    medians = {m: statistics.median(v[first:]) for m, v in data["seconds"].items() if len(v) > first}
    base = medians.get("torch")
    print_table(
        f"link {link} (measured {measured_mbit:,.0f} Mbit/s on lo), interleaved: one step of each method in turn, "
        f"{data['steps_done']} steps, medians over steps {first}..",
        ["method", "median step ms", "speed vs torch"],
        [[LABELS[m], f"{v * 1e3:.1f}", f"{base / v:.2f}x" if base else "-"] for m, v in medians.items()],
    )
    goals = []
    if base and "overlap" in medians:
        goals.append(
            Goal(
                f"{link}, interleaved: our overlapped PowerSGD step no slower than torch's powerSGD_hook",
                f"torch {base * 1e3:.1f} ms, ours {medians['overlap'] * 1e3:.1f} ms ({base / medians['overlap']:.2f}x)",
                medians["overlap"] <= base,
            )
        )
    return {
        "measured_mbit": measured_mbit,
        "seconds": data["seconds"],
        "medians": medians,
        "goals": report_goals(*goals),
    }


class Runner(JobRunner):
    def __init__(self, plan: Plan, seed: int) -> None:
        super().__init__("overlap-bench-", seed, plan.stall_seconds, STARTUP_SECONDS)
        self.plan = plan
        self.port = 29700

    def run(self, method: str, steps: int, namespace_name: str) -> tuple[dict[str, Any] | None, str]:
        """Run `method` in the namespace: rank 0's result if it completed, else None and why not."""
        self.port += 1
        stem = self.stem(f"{namespace_name}-{method}")
        job = Job(method, steps, self.seed, f"{stem}.json", f"{stem}.progress", asdict(self.plan))
        launch = Launch(
            name=f"{namespace_name}-{method}",
            command=worker_command(__file__, job, prefix=[str(NETNS_LINK), "exec", namespace_name]),
            env=job_env(self.port, GLOO_SOCKET_IFNAME="lo"),
            log_path=Path(f"{stem}.log"),
            progress_path=Path(job.progress_path),
            result_paths=(Path(job.result_path),),
        )
        [outcome] = run_jobs([launch], self.plan.stall_seconds, self.startup_seconds)
        progress(f"{namespace_name}: {LABELS[method]}: {outcome.status} in {outcome.seconds:.0f}s {outcome.detail}")
        if outcome.status != "completed":
            log = launch.log_path.read_text(errors="replace")
            cause = " (gloo: collective mismatch between the ranks)" if "collective mismatch" in log else ""
            return None, f"{outcome.status} after {outcome.steps_done} steps{cause}: {outcome.detail}"
        return json.loads(Path(job.result_path).read_text()), ""


def run_link(runner: Runner, link: str, methods: list[str], rounds: int, steps: int, tag: str) -> dict[str, Any]:
    """Every method `rounds` times in one namespace, the order reversed every other round."""
    name = f"{tag}-{link}"
    seconds: dict[str, list[float]] = {method: [] for method in methods}
    summaries: dict[str, list[dict[str, Any]]] = {method: [] for method in methods}
    errors: dict[str, list[str]] = {method: [] for method in methods}
    with namespace(name, link):
        measured_mbit = measure_link(name, link)
        progress(f"{name}: lo measured at {measured_mbit:,.0f} Mbit/s")
        for round_index in range(rounds):
            for method in methods if round_index % 2 == 0 else methods[::-1]:
                result, error = runner.run(method, steps, name)
                if result is None:
                    errors[method].append(error)
                    continue
                summary = summarise(method, result, FIRST_MEASURED, runner.plan.loss_steps)
                summaries[method].append(summary)
                seconds[method].extend(summary["step_seconds"])
    medians = {method: statistics.median(values) for method, values in seconds.items() if values}
    base = medians.get("torch")
    rows = []
    for method in methods:
        runs = summaries[method]
        completed = f"{len(runs)}/{len(runs) + len(errors[method])}"
        if method not in medians:
            rows.append([LABELS[method], completed, "-", "-", "-", "-", "-", "-"])
            continue
        rows.append(
            [
                LABELS[method],
                completed,
                f"{medians[method] * 1e3:.1f}",
                f"{base / medians[method]:.2f}x" if base else "-",
                f"{statistics.median(s['payload_bytes_per_step'] for s in runs) / 1e3:.1f} kB",
                f"{statistics.median(s.get('hook_compute_seconds', float('nan')) for s in runs) * 1e3:.1f}",
                f"{statistics.median(s['final_loss'] for s in runs):.4f}",
                f"{max(s['other_cores'] for s in runs):.2f}",
            ]
        )
    print_table(
        f"link {link} (measured {measured_mbit:,.0f} Mbit/s on lo): {rounds} rounds x {steps} steps per method, "
        f"PowerSGD rank {runner.plan.powersgd_rank} from step {START}, step times over steps {FIRST_MEASURED}..",
        [
            "method",
            "runs completed",
            "median step ms",
            "speed vs torch",
            "payload/step/rank",
            "hook compute ms",
            "final loss",
            "others' cores (max)",
        ],
        rows,
    )
    for method, messages in errors.items():
        for message in messages:
            print(f"{LABELS[method]}: {message[:300]}")
    goals = []
    if base and "overlap" in medians:
        ratio = base / medians["overlap"]
        goals.append(
            Goal(
                f"{link}: our overlapped PowerSGD step no slower than torch's powerSGD_hook",
                f"torch {base * 1e3:.1f} ms, ours {medians['overlap'] * 1e3:.1f} ms ({ratio:.2f}x)",
                medians["overlap"] <= base,
            )
        )
    return {
        "measured_mbit": measured_mbit,
        "median_step_seconds": medians,
        "runs": summaries,
        "errors": errors,
        "goals": report_goals(*goals),
    }


def main() -> None:
    destroy_process_group_at_exit()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", default=",".join(LINKS), help=f"comma-separated subset of {','.join(LINKS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    parser.add_argument("--interleave", action="store_true", help="one model per method, steps in turn")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--interleaved-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Job(**json.loads(args.worker)))
        return
    if args.interleaved_worker:
        interleaved_job(json.loads(args.interleaved_worker))
        return
    if os.geteuid() != 0:
        sys.exit("overlap.py: needs root to create network namespaces (scripts/netns-link)")
    links = parse_choices(args.links, LINKS, "--links", parser)
    methods = parse_choices(args.methods, METHODS, "--methods", parser)
    if args.steps < FIRST_MEASURED + 3:
        parser.error(f"--steps must be at least {FIRST_MEASURED + 3}")
    plan = replace(FULL, powersgd_start=START, links=tuple(links), methods=tuple(methods))
    command = command_line()
    print(f"command: {command}\nmachine: {machine_facts()}")
    print(
        f"model: TinyGPT d_model {plan.d_model}, {plan.n_layer} layers; 2 processes (gloo, Lightning DDP, 1 thread "
        f"each), batch {plan.batch_size}x{plan.seq_len} per rank, seed {args.seed}; PowerSGD rank "
        f"{plan.powersgd_rank}, dense for steps 0..{START - 1} (torch: start_powerSGD_iter={START}); step time: "
        "end to end of rank 0's optimizer steps"
    )
    exit_on_sigterm()
    report: dict[str, Any] = {"command": command, "plan": asdict(plan), "links": {}}
    if args.interleave:
        for index, link in enumerate(links):
            tag = f"leoi{os.getpid()}"
            report["links"][link] = run_interleaved(link, methods, args.steps, args.seed, tag, 29800 + index)
            write_json(args.json, report)
        finish(report, args.json)
        return
    runner = Runner(plan, args.seed)
    for link in links:
        report["links"][link] = run_link(runner, link, methods, args.rounds, args.steps, f"leov{os.getpid()}")
        write_json(args.json, report)
    finish(report, args.json)


if __name__ == "__main__":
    main()

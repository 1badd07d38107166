"""Load-balanced DDP on a node with one slowed core: plain DDP against ThroughputBalancer and CostBalancer.

Two CPU processes (Lightning DDP, gloo, one thread each) train the small GPT on the text task, rank r pinned to
core r. Every configuration is its own process tree: rank 0 is this file with ``--worker``, Lightning starts
rank 1. The peer is Lightning's own `DDPStrategy`; ours is `EfficientDDPStrategy(balancer=...)`; both train the
same model, global batch, steps and seed. Parts:

1. ``slow``: rank 1 slowed to half speed, by a cgroup ``cpu`` quota of 50% on its process (or, where no cgroup
   can be made, by a busy loop pinned to its core). Samples/s of plain DDP and of `ThroughputBalancer` once its
   plan has converged, against the ideal: the sum of each rank's standalone throughput (one process per core,
   the two run side by side, the core-1 one under the same slowdown, each at the DDP per-rank batch).
2. ``equal``: the same two methods with no slowdown, interleaved in rounds: the balancer's overhead.
3. ``loss``: the slow part's runs (same seed, same steps, so the same samples): final training loss (over the
   global batch) and validation loss, plain vs balanced, next to plain DDP with another seed as the noise level.
4. ``cost``: variable-length samples (`TextDataModule(min_seq_len=...)`), equal speeds: plain equal-count
   batches against `CostBalancer("tokens")`: median step time and how unequal the ranks' tokens per step are.

Step time is rank 0's span from `on_train_batch_start` to `on_train_batch_end` (the strategy's own batch-start
work, the balancer's re-plans included); samples/s is the global batch over the median step time. The
end-to-end time between consecutive steps (data loading included) is printed next to it as a check, and the
mean end-to-end rate (all samples of the timed steps over their wall time): a cpu quota makes step times
bimodal (a step is throttled or not), and there the median can be far from what a user gets.

Needs root for the cgroup (else the busy loop is used) and two CPU cores.

Usage:
    python benchmarks/balancing.py [--quick] [--only slow,equal,loss,cost] [--slowdown auto|quota|busy]
                                   [--seed N] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from harness import (
    Goal,
    JobFailed,
    JobRunner,
    Launch,
    StepRecorder,
    command_line,
    exit_on_sigterm,
    finish,
    fit,
    free_port,
    job_env,
    machine_facts,
    parse_choices,
    print_table,
    progress,
    quiet_lightning,
    report_goals,
    validation_loss,
    worker_command,
    write_json,
)
from lightning.pytorch.strategies import DDPStrategy

from lightning_eff import EfficientDDPStrategy
from lightning_eff.balancing import CostBalancer, ThroughputBalancer
from lightning_eff.distributed import destroy_process_group_at_exit
from lightning_eff.tasks import TextDataModule, TinyGPT

PARTS = ("slow", "equal", "loss", "cost")
SLOWDOWNS = ("auto", "quota", "busy")
CORE_ENV = "LEBENCH_CORE"  # a standalone run's core; DDP ranks use their LOCAL_RANK
QUOTA_PERIOD_US = 100_000
QUOTA_US = 50_000  # 50% of one core
CGROUP_V1 = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")
LOAD_ON = 0.4  # the chance that a random-load busy loop is on for its next stretch of steps
STARTUP_SECONDS = 180.0  # two interpreters importing torch and lightning on two busy cores
LABELS = {"plain": "plain DDP (Lightning DDPStrategy)", "balanced": "ThroughputBalancer", "cost": "CostBalancer"}


@dataclass(frozen=True)
class Plan:
    """Sizes of one run; `--quick` shrinks everything to a smoke run of the harness."""

    d_model: int
    n_layer: int
    n_head: int
    seq_len: int  # fixed-length windows of the throughput parts
    batch_size: int  # per rank; the global batch is twice this for both methods
    replan_every: int
    standalone_steps: int
    slow_steps: int
    equal_steps: int
    equal_rounds: int
    measure_from: int  # first timed step of the throughput parts: after the balancer's first re-plans
    cost_seq_len: int
    cost_min_seq_len: int
    cost_batch_size: int
    cost_steps: int
    cost_rounds: int
    cost_measure_from: int
    loss_steps: int  # the final training loss is the mean over this many last steps
    val_windows: int
    noise_run: bool  # plain DDP with seed + 1, the noise level of the loss comparison
    stall_seconds: float


FULL = Plan(
    d_model=256,
    n_layer=2,
    n_head=4,
    seq_len=64,
    batch_size=16,
    replan_every=10,
    standalone_steps=50,
    slow_steps=150,
    equal_steps=100,
    equal_rounds=3,
    measure_from=40,
    cost_seq_len=128,
    cost_min_seq_len=16,
    cost_batch_size=16,
    cost_steps=70,
    cost_rounds=2,
    cost_measure_from=10,
    loss_steps=10,
    val_windows=256,
    noise_run=True,
    stall_seconds=90.0,
)
QUICK = Plan(
    d_model=64,
    n_layer=1,
    n_head=2,
    seq_len=32,
    batch_size=8,
    replan_every=4,
    standalone_steps=12,
    slow_steps=24,
    equal_steps=16,
    equal_rounds=1,
    measure_from=12,
    cost_seq_len=64,
    cost_min_seq_len=8,
    cost_batch_size=8,
    cost_steps=16,
    cost_rounds=1,
    cost_measure_from=4,
    loss_steps=4,
    val_windows=32,
    noise_run=False,
    stall_seconds=60.0,
)


# --- one job: what each rank trains and records ----------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One training run, passed as JSON on the command line (Lightning hands rank 1 the same)."""

    name: str
    method: str  # "plain", "balanced" (ThroughputBalancer), "frozen" (one that keeps the equal split), "cost",
    # "pinned" (one that keeps `pinned_split`)
    variable_length: bool
    devices: int
    steps: int
    seed: int
    slow_rank: int | None  # the local rank whose process joins `cgroup`
    cgroup: str | None  # the directory of the quota cgroup (None: no quota)
    result_dir: str
    plan: dict[str, Any]
    stall_ms: int = 0  # the slow rank's process is stopped this long every `stall_period_ms` (0: never)
    stall_period_ms: int = 0
    change_at: int | None = None  # at this step the slow rank joins (`change="slows"`) or leaves ("recovers")
    change: str | None = None  # `cgroup`, instead of being in it from the start
    load_pids: tuple[int, ...] = ()  # stopped busy loops, one per core, that rank 0 switches on and off by step
    load_seed: int = 0  # the seed of their schedule: the same for every method of a round
    pinned_split: tuple[int, ...] = ()  # method "pinned": this split from the first step on, never re-planned


def batch_counts(trainer: L.Trainer, outputs: Any, batch: Any) -> dict[str, int]:
    """A step's samples, the tokens its loss counts and the tokens the model computes on (padding included)."""
    _, targets = batch
    return {
        "samples": int(targets.shape[0]),
        "tokens": int((targets != -100).sum()),  # -100: padding, which the loss ignores
        "padded_tokens": int(targets.numel()),
    }


def join_cgroup(cgroup: str) -> None:
    """Move this whole process (every thread, and every thread it starts later) into the quota cgroup."""
    Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))


def leave_cgroup(cgroup: str) -> None:
    """Move this whole process back to the parent of the quota cgroup: full speed again."""
    Path(cgroup).parent.joinpath("cgroup.procs").write_text(str(os.getpid()))


class ChangeSpeed(L.Callback):
    """On the slow rank: join or leave the quota cgroup when step `job.change_at` starts."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.job.change_at and self.job.cgroup is not None:
            (join_cgroup if self.job.change == "slows" else leave_cgroup)(self.job.cgroup)


class StepKeyedLoad(L.Callback):
    """On rank 0: switch each busy loop in `pids` on (probability `LOAD_ON`) or off, and hold that for 1-8 steps,
    on a schedule drawn from `seed` and keyed to the training step.

    Keyed to the step, not the clock, both methods of a round meet the same load at the same step: a round's
    ratio then measures the method, not when its startup happened to fall against a wall-clock schedule (which
    swung a round's ratio by +-12% at identical decisions).
    """

    def __init__(self, pids: Sequence[int], seed: int) -> None:
        self.pids = list(pids)
        draw = random.Random(seed)
        self.schedule: list[list[bool]] = [[] for _ in pids]  # per loop: on or off at each step
        for states in self.schedule:
            while len(states) < 100_000:
                states.extend([draw.random() < LOAD_ON] * draw.randint(1, 8))
        self._applied = -1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        step = trainer.global_step
        if step == self._applied:
            return
        self._applied = step
        for pid, states in zip(self.pids, self.schedule, strict=True):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT if states[step % len(states)] else signal.SIGSTOP)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for pid in self.pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)


def start_stalls(stall_ms: int, period_ms: int) -> None:
    """A child that stops this process for `stall_ms` every `period_ms` (SIGSTOP, SIGCONT) until it exits: a
    co-located job that takes the core in bursts. It is in the job's process group, so it goes with the job."""
    code = (
        "import os, signal, sys, time\n"
        f"pid, stall, period = {os.getpid()}, {stall_ms / 1e3}, {period_ms / 1e3}\n"
        "while True:\n"
        "    time.sleep(period - stall)\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGSTOP)\n"
        "        time.sleep(stall)\n"
        "        os.kill(pid, signal.SIGCONT)\n"
        "    except ProcessLookupError:\n"
        "        sys.exit(0)\n"
    )
    subprocess.Popen([sys.executable, "-c", code])


def strategy(job: Job, plan: Plan) -> DDPStrategy | str:
    if job.devices == 1:
        return "auto"
    if job.method == "plain":
        return DDPStrategy(process_group_backend="gloo")
    if job.method == "cost":
        balancer: CostBalancer | ThroughputBalancer = CostBalancer("tokens")
    elif job.method == "frozen":  # measures and exchanges as the balancer does, but keeps the equal split
        balancer = ThroughputBalancer(replan_every=plan.replan_every, tolerance=0.99)
    elif job.method == "pinned":  # a given split, never re-planned: the best split, as a reference
        balancer = ThroughputBalancer(replan_every=2**62)
        balancer.plan.batch_sizes = list(job.pinned_split)  # setup keeps a plan that fits the global batch
    else:
        balancer = ThroughputBalancer(replan_every=plan.replan_every)
    return EfficientDDPStrategy(balancer=balancer, process_group_backend="gloo")


def worker(job: Job) -> None:
    """Train `job` on this rank (pinned to its core, slowed if it is the slow rank) and write its record."""
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    os.sched_setaffinity(0, {int(os.environ.get(CORE_ENV, rank))})
    callbacks: list[L.Callback] = []
    if rank == job.slow_rank:
        if job.cgroup is not None and job.change != "slows":
            join_cgroup(job.cgroup)
        if job.change is not None:
            callbacks.append(ChangeSpeed(job))
        if job.stall_ms:
            start_stalls(job.stall_ms, job.stall_period_ms)
    if rank == 0 and job.load_pids:
        callbacks.append(StepKeyedLoad(job.load_pids, job.load_seed))
    torch.set_num_threads(1)  # one core per rank: more threads would only contend
    quiet_lightning()
    plan = Plan(**job.plan)
    L.seed_everything(job.seed, verbose=False)
    seq_len = plan.cost_seq_len if job.variable_length else plan.seq_len
    model = TinyGPT(n_layer=plan.n_layer, n_head=plan.n_head, d_model=plan.d_model, seq_len=seq_len)
    data = TextDataModule(
        seq_len=seq_len,
        batch_size=plan.cost_batch_size if job.variable_length else plan.batch_size,
        min_seq_len=plan.cost_min_seq_len if job.variable_length else None,
    )
    result_dir = Path(job.result_dir)
    # Rank 0 also streams its rows to progress.jsonl, so the watchdog sees a stalled job as it stalls.
    recorder = StepRecorder(batch_counts, progress_path=result_dir / "progress.jsonl" if rank == 0 else None)
    trainer, seconds = fit(
        model, data, [*callbacks, recorder], devices=job.devices, strategy=strategy(job, plan), max_steps=job.steps
    )
    result: dict[str, Any] = {"rows": recorder.rows, "fit_seconds": seconds}
    if rank == 0:
        result["parameters"] = sum(p.numel() for p in model.parameters())
        result["val_loss"] = validation_loss(model, data, plan.val_windows)
        balancer = getattr(trainer.strategy, "balancer", None)
        if isinstance(balancer, ThroughputBalancer):
            result["balance_stats"] = trainer.strategy.balance_stats  # type: ignore[attr-defined]
            result["history"] = balancer.history
    (result_dir / f"rank{rank}.json").write_text(json.dumps(result))


# --- the harness: slowdowns, jobs, stalls ------------------------------------------------------------------


def cgroup_root() -> Path | None:
    """Where a cpu-quota cgroup can be made: cgroup v1's cpu hierarchy, or v2 with the cpu controller."""
    if (CGROUP_V1 / "cpu.cfs_quota_us").exists():
        return CGROUP_V1
    controllers = CGROUP_V2 / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return CGROUP_V2
    return None


@contextmanager
def quota_cgroup() -> Iterator[Path]:
    """A cgroup limited to 50% of one core; its processes are moved out and it is removed on the way out."""
    root = cgroup_root()
    if root is None:
        raise OSError("no cgroup hierarchy with the cpu controller is mounted")
    path = root / f"lebench-{os.getpid()}"
    path.mkdir()
    try:
        if root == CGROUP_V1:
            (path / "cpu.cfs_period_us").write_text(str(QUOTA_PERIOD_US))
            (path / "cpu.cfs_quota_us").write_text(str(QUOTA_US))
        else:
            (path / "cpu.max").write_text(f"{QUOTA_US} {QUOTA_PERIOD_US}")
        yield path
    finally:
        for pid in (path / "cgroup.procs").read_text().split():
            with suppress(OSError):  # already gone
                (root / "cgroup.procs").write_text(pid)
        with suppress(OSError):
            path.rmdir()


@contextmanager
def busy_core(core: int) -> Iterator[subprocess.Popen[bytes]]:
    """A busy loop pinned to `core` for as long as the context lasts (its process, which SIGSTOP/SIGCONT pause
    and resume): the scheduler halves a rank's share."""
    code = f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True:\n    pass\n"
    process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        yield process
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def choose_slowdown(requested: str) -> str:
    """'quota' where a cpu cgroup can be made and written (root), else 'busy'."""
    if requested != "auto":
        return requested
    try:
        with quota_cgroup():
            return "quota"
    except OSError as error:
        progress(f"no cpu quota cgroup ({error}); slowing rank 1 with a busy loop on core 1")
        return "busy"


class Runner(JobRunner):
    """Starts jobs as their own process groups, watches them for stalls, and collects every rank's record."""

    def __init__(self, plan: Plan, seed: int) -> None:
        super().__init__("balancing-bench-", seed, plan.stall_seconds, STARTUP_SECONDS)
        self.plan = plan
        self.records: dict[str, list[dict[str, Any]]] = {}  # every job's per-rank record, for the JSON

    def job(self, name: str, method: str, steps: int, **kwargs: Any) -> Job:
        result_dir = self.stem(name)
        result_dir.mkdir()
        fields: dict[str, Any] = {
            "variable_length": False,
            "devices": 2,
            "seed": self.seed,
            "slow_rank": None,
            "cgroup": None,
            **kwargs,
        }
        return Job(name=name, method=method, steps=steps, result_dir=str(result_dir), plan=asdict(self.plan), **fields)

    def run(self, jobs: Sequence[Job], cores: Sequence[int | None]) -> list[list[dict[str, Any]]]:
        """Run `jobs` side by side (`cores`: a standalone job's core, None for DDP); every rank's record each.

        Raises `JobFailed` if any of them stalls (killed by the watchdog) or ends without every rank's record.
        """
        launches = []
        for job, core in zip(jobs, cores, strict=True):
            env = job_env(free_port())
            env.pop(CORE_ENV, None)
            if core is not None:
                env[CORE_ENV] = str(core)
            result_dir = Path(job.result_dir)
            launches.append(
                Launch(
                    name=job.name,
                    command=worker_command(__file__, job),
                    env=env,
                    log_path=result_dir / "log.txt",
                    progress_path=result_dir / "progress.jsonl",
                    result_paths=tuple(result_dir / f"rank{rank}.json" for rank in range(job.devices)),
                )
            )
        outcomes = self.launch(launches)
        for launch, outcome in zip(launches, outcomes, strict=True):
            if outcome.status != "completed":
                raise JobFailed(f"{launch.name}: {outcome.status}: {outcome.detail}")
        results = [[json.loads(path.read_text()) for path in launch.result_paths] for launch in launches]
        self.records.update((Path(job.result_dir).name, ranks) for job, ranks in zip(jobs, results, strict=True))
        progress(f"  {', '.join(job.name for job in jobs)}: {max(o.seconds for o in outcomes):.0f}s")
        return results


# --- summarising ------------------------------------------------------------------------------------------


def timed_rows(ranks: list[dict[str, Any]], first_step: int) -> list[list[dict[str, Any]]]:
    """Per timed step (>= first_step), each rank's row."""
    by_rank = [{row["step"]: row for row in rank["rows"]} for rank in ranks]
    steps = sorted(step for step in by_rank[0] if step >= first_step and all(step in rows for rows in by_rank))
    return [[rows[step] for rows in by_rank] for step in steps]


def throughput(ranks: list[dict[str, Any]], first_step: int) -> dict[str, Any]:
    """Rank 0's median step time over the timed steps, the global samples per step, and their ratio."""
    steps = timed_rows(ranks, first_step)
    seconds = [step[0]["end"] - step[0]["start"] for step in steps]
    ends = [step[0]["end"] for step in steps]
    samples = statistics.median(sum(row["samples"] for row in step) for step in steps)
    median = statistics.median(seconds)
    end_to_end = statistics.median(b - a for a, b in itertools.pairwise(ends))
    # every timed step after the first, over the time they took: what a user gets, stalls and throttling included
    total_samples = sum(sum(row["samples"] for row in step) for step in steps[1:])
    return {
        "timed_steps": len(steps),
        "global_samples": samples,
        "median_step_seconds": median,
        "median_end_to_end_seconds": end_to_end,
        "samples_per_second": samples / median,
        "end_to_end_samples_per_second": samples / end_to_end,
        "mean_end_to_end_samples_per_second": total_samples / (ends[-1] - ends[0]),
        "rank_samples": [statistics.fmean(row["samples"] for row in [s[r] for s in steps]) for r in range(len(ranks))],
    }


def global_losses(ranks: list[dict[str, Any]]) -> list[float]:
    """The loss over the global batch at every step: each rank's mean, weighted by its counted tokens."""
    return [
        sum(row["loss"] * row["tokens"] for row in step) / sum(row["tokens"] for row in step)
        for step in timed_rows(ranks, 0)
    ]


def shares_text(history: list[dict[str, Any]]) -> str:
    return " ".join(f"{entry['step']}:{'/'.join(str(size) for size in entry['batch_sizes'])}" for entry in history)


def window_times_text(history: list[dict[str, Any]]) -> str:
    """Each window's plan and the wall time per step it measured (what `prefer_measured` compares)."""
    plans = [entry["batch_sizes"] for entry in history]
    texts = []
    for before, entry in zip([None, *plans], history, strict=False):
        if entry.get("step_seconds") is not None and before is not None:
            texts.append(f"{entry['step']}:{'/'.join(map(str, before))}:{entry['step_seconds'] * 1e3:.0f}")
    return " ".join(texts)


def plan_changes(history: list[dict[str, Any]], first_step: int) -> int:
    """Re-plans at or after `first_step` that changed the split (a converged plan changes none)."""
    changes = 0
    for before, after in itertools.pairwise(history):
        if after["step"] >= first_step and after["batch_sizes"] != before["batch_sizes"]:
            changes += 1
    return changes


def rate(value: float) -> str:
    return f"{value:.1f}"


# --- the parts ---------------------------------------------------------------------------------------------


def run_slow(runner: Runner, plan: Plan, slowdown: str, with_noise_run: bool) -> dict[str, Any]:
    """Standalone throughputs, then plain and balanced DDP with rank 1 slowed (and the noise run for `loss`)."""
    progress(f"slow: rank 1 at 50% by {'a cgroup cpu quota' if slowdown == 'quota' else 'a busy loop on core 1'}")
    with slowed(slowdown) as cgroup:
        path = str(cgroup) if cgroup is not None else None
        standalone = runner.run(
            [
                runner.job("standalone-core0", "plain", plan.standalone_steps, devices=1),
                runner.job("standalone-core1", "plain", plan.standalone_steps, devices=1, slow_rank=0, cgroup=path),
            ],
            cores=[0, 1],
        )
        runs = {}
        for method in ("plain", "balanced"):
            job = runner.job(f"slow-{method}", method, plan.slow_steps, slow_rank=1, cgroup=path)
            runs[method] = runner.run([job], cores=[None])[0]
        if with_noise_run:
            job = runner.job("slow-plain-seed+1", "plain", plan.slow_steps, slow_rank=1, cgroup=path,
                             seed=runner.seed + 1)  # fmt: skip
            runs["plain_noise"] = runner.run([job], cores=[None])[0]
    first = plan.standalone_steps // 3
    alone = [throughput(ranks, first) for ranks in standalone]
    measured = {method: throughput(ranks, plan.measure_from) for method, ranks in runs.items()}
    return {
        "slowdown": slowdown,
        "standalone": alone,
        "ideal_samples_per_second": sum(a["samples_per_second"] for a in alone),
        "ideal_mean_samples_per_second": sum(a["mean_end_to_end_samples_per_second"] for a in alone),
        "runs": measured,
        "raw": runs,
    }


@contextmanager
def slowed(slowdown: str) -> Iterator[Path | None]:
    if slowdown == "quota":
        with quota_cgroup() as path:
            yield path
    else:
        with busy_core(1):
            yield None


def report_slow(slow: dict[str, Any], plan: Plan) -> dict[str, Any]:
    ideal = slow["ideal_samples_per_second"]
    plain, balanced = slow["runs"]["plain"], slow["runs"]["balanced"]
    raw = slow["raw"]["balanced"][0]
    history, stats = raw.get("history", []), raw.get("balance_stats", {})
    core0, core1 = slow["standalone"]
    how = "cgroup cpu quota 50% on rank 1's process" if slow["slowdown"] == "quota" else "busy loop on core 1"
    print_table(
        f"slow rank ({how}); global batch {2 * plan.batch_size}, steps {plan.slow_steps}, timed from step "
        f"{plan.measure_from}",
        ["run", "median step ms", "end-to-end ms", "samples/s", "e2e samples/s", "vs ideal", "vs plain DDP"],
        [
            [
                name,
                f"{run['median_step_seconds'] * 1e3:.1f}",
                f"{run['median_end_to_end_seconds'] * 1e3:.1f}",
                rate(run["samples_per_second"]),
                rate(run["end_to_end_samples_per_second"]),
                f"{run['samples_per_second'] / ideal:.2f}" if index >= 2 else "",
                f"{run['samples_per_second'] / plain['samples_per_second']:.2f}x" if index >= 2 else "",
            ]
            for index, (name, run) in enumerate(
                [
                    (f"standalone core 0, batch {plan.batch_size}", core0),
                    (f"standalone core 1 slowed, batch {plan.batch_size}", core1),
                    ("plain DDP (Lightning DDPStrategy)", plain),
                    (f"ThroughputBalancer(replan_every={plan.replan_every})", balanced),
                    *([("plain DDP, seed+1", slow["runs"]["plain_noise"])] if "plain_noise" in slow["runs"] else []),
                ]
            )
        ],
    )
    print(f"ideal (sum of standalone): {rate(ideal)} samples/s")
    print(f"balancer splits (step:rank0/rank1): {shares_text(history)}")
    print(f"measured wall ms per step of each window's plan (step:plan:ms): {window_times_text(history)}")
    print(
        f"final shares {[round(s, 3) for s in stats.get('share', [])]}, speeds "
        f"{[round(s, 1) for s in stats.get('speed', [])]} samples/s, fixed "
        f"{[round(s * 1e3, 1) for s in stats.get('fixed_seconds', [])]} ms per step, idle fraction "
        f"{[round(s, 3) for s in stats.get('idle_fraction', [])]}; per-rank samples in the timed steps "
        f"{[round(s, 2) for s in balanced['rank_samples']]}; split changes in the timed steps: "
        f"{plan_changes(history, plan.measure_from)}"
    )
    vs_ideal = balanced["samples_per_second"] / ideal
    vs_plain = balanced["samples_per_second"] / plain["samples_per_second"]
    mean_ideal = slow["ideal_mean_samples_per_second"]
    mean_plain, mean_balanced = (
        plain["mean_end_to_end_samples_per_second"],
        balanced["mean_end_to_end_samples_per_second"],
    )
    print(
        f"mean end-to-end (samples over wall time of the timed steps; a quota makes step times bimodal, which the "
        f"median hides): ideal {rate(mean_ideal)}, plain DDP {rate(mean_plain)}, balanced {rate(mean_balanced)} "
        f"samples/s: balanced {mean_balanced / mean_ideal:.2f} of ideal, {mean_balanced / mean_plain:.2f}x plain DDP"
    )
    return {
        "ideal_samples_per_second": ideal,
        "standalone": slow["standalone"],
        "plain": plain,
        "balanced": balanced,
        "balanced_vs_ideal": vs_ideal,
        "balanced_vs_plain": vs_plain,
        "mean_balanced_vs_ideal": mean_balanced / mean_ideal,
        "mean_balanced_vs_plain": mean_balanced / mean_plain,
        "history": history,
        "balance_stats": stats,
        "goals": report_goals(
            Goal("balanced >= 90% of ideal", f"{vs_ideal:.1%}", vs_ideal >= 0.9),
            Goal("balanced >= 1.3x plain DDP", f"{vs_plain:.2f}x", vs_plain >= 1.3),
        ),
    }


def report_loss(slow: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Final training loss over the global batch and validation loss of the slow part's runs."""
    rows, finals = [], {}
    for method, label in (("plain", LABELS["plain"]), ("balanced", LABELS["balanced"]), ("plain_noise", None)):
        if method not in slow["raw"]:
            continue
        ranks = slow["raw"][method]
        losses = global_losses(ranks)[-plan.loss_steps :]
        final = statistics.fmean(losses)
        error = statistics.stdev(losses) / len(losses) ** 0.5 if len(losses) > 1 else 0.0
        samples = sum(row["samples"] for rank in ranks for row in rank["rows"])
        finals[method] = {"train_loss": final, "train_loss_stderr": error, "val_loss": ranks[0]["val_loss"]}
        name = label or "plain DDP, seed+1 (noise level)"
        rows.append([name, samples, f"{final:.4f} +- {error:.4f}", f"{ranks[0]['val_loss']:.4f}"])
    print_table(
        f"loss after the same samples (slow part's runs; train: global-batch loss, mean of the last "
        f"{plan.loss_steps} steps +- its standard error; val: first {plan.val_windows} validation windows)",
        ["run", "samples trained", "train loss", "val loss"],
        rows,
    )
    plain, balanced = finals["plain"], finals["balanced"]
    train_gap = abs(balanced["train_loss"] - plain["train_loss"])
    val_gap = abs(balanced["val_loss"] - plain["val_loss"])
    train_noise = 2 * (plain["train_loss_stderr"] ** 2 + balanced["train_loss_stderr"] ** 2) ** 0.5
    val_noise = None
    if "plain_noise" in finals:
        noise = finals["plain_noise"]
        train_noise = max(train_noise, abs(noise["train_loss"] - plain["train_loss"]))
        val_noise = abs(noise["val_loss"] - plain["val_loss"])
    goals = [
        Goal(
            "train loss within noise",
            f"|balanced - plain| = {train_gap:.4f} <= {train_noise:.4f} "
            "(the larger of the seed-to-seed gap and 2 standard errors of the difference)",
            train_gap <= train_noise,
        ),
        Goal(
            "val loss within noise",
            f"|balanced - plain| = {val_gap:.4f}; no seed+1 run (--quick), so no noise level to judge it"
            if val_noise is None
            else f"|balanced - plain| = {val_gap:.4f} <= seed-to-seed gap {val_noise:.4f}",
            None if val_noise is None else val_gap <= val_noise,
        ),
    ]
    return {"runs": finals, "goals": report_goals(*goals)}


Measure = Callable[[list[dict[str, Any]]], dict[str, Any]]


def interleaved(
    runner: Runner, part: str, methods: Sequence[str], rounds: int, steps: int, measure: Measure, **fields: Any
) -> dict[str, list[dict[str, Any]]]:
    """Each method once per round, in `rounds` rounds, so machine drift hits all alike: `measure` of every run."""
    runs: dict[str, list[dict[str, Any]]] = {method: [] for method in methods}
    for round_index in range(rounds):
        for method in methods:
            job = runner.job(f"{part}-{method}-{round_index}", method, steps, **fields)
            runs[method].append(measure(runner.run([job], cores=[None])[0]))
    return runs


def round_rows(
    runs: dict[str, list[dict[str, Any]]], label: Callable[[str], str], columns: Callable[[dict[str, Any]], list[str]]
) -> list[list[str]]:
    """A table row per method and round: its label, median step and end-to-end ms, then `columns` of the run."""
    return [
        [
            f"{label(method)}, round {index + 1}",
            f"{run['median_step_seconds'] * 1e3:.1f}",
            f"{run['median_end_to_end_seconds'] * 1e3:.1f}",
            *columns(run),
        ]
        for method, measured in runs.items()
        for index, run in enumerate(measured)
    ]


def run_equal(runner: Runner, plan: Plan) -> dict[str, Any]:
    """Plain and balanced DDP with no slowdown, interleaved in rounds."""
    progress("equal: no slowdown")

    def measure(ranks: list[dict[str, Any]]) -> dict[str, Any]:
        return throughput(ranks, plan.measure_from) | {"splits": shares_text(ranks[0].get("history", []))}

    return interleaved(runner, "equal", ("plain", "balanced"), plan.equal_rounds, plan.equal_steps, measure)


def report_equal(runs: dict[str, list[dict[str, Any]]], plan: Plan) -> dict[str, Any]:
    rows = round_rows(
        runs,
        lambda method: LABELS[method],
        lambda run: [rate(run["samples_per_second"]), "/".join(f"{s:.1f}" for s in run["rank_samples"])],
    )
    print_table(
        f"no slowdown; global batch {2 * plan.batch_size}, steps {plan.equal_steps}, timed from step "
        f"{plan.measure_from}, {plan.equal_rounds} interleaved rounds",
        ["run", "median step ms", "end-to-end ms", "samples/s", "samples rank0/rank1"],
        rows,
    )
    for run in runs["balanced"]:
        print(f"balancer splits (step:rank0/rank1): {run['splits']}")
    plain = statistics.median(run["samples_per_second"] for run in runs["plain"])
    balanced = statistics.median(run["samples_per_second"] for run in runs["balanced"])
    ratio = balanced / plain
    mean_ratio = statistics.median(run["mean_end_to_end_samples_per_second"] for run in runs["balanced"]) / (
        statistics.median(run["mean_end_to_end_samples_per_second"] for run in runs["plain"])
    )
    print(f"mean end-to-end samples/s, balanced / plain (median over rounds): {mean_ratio:.3f}x")
    return {
        "runs": runs,
        "balanced_vs_plain": ratio,
        "mean_balanced_vs_plain": mean_ratio,
        "goals": report_goals(
            Goal("balanced within 3% of plain DDP (median over rounds)", f"{ratio:.3f}x", ratio >= 0.97)
        ),
    }


def spread(values: Sequence[float]) -> float:
    """(largest - smallest) / mean: 0 when the ranks are equal."""
    mean = statistics.fmean(values)
    return (max(values) - min(values)) / mean if mean > 0 else 0.0


def run_cost(runner: Runner, plan: Plan) -> dict[str, Any]:
    """Variable-length samples at equal speeds: equal-count batches against CostBalancer, interleaved in rounds."""
    progress("cost: variable-length text, no slowdown")

    def measure(ranks: list[dict[str, Any]]) -> dict[str, Any]:
        measured = throughput(ranks, plan.cost_measure_from)
        steps = timed_rows(ranks, plan.cost_measure_from)
        measured["tokens_spread"] = statistics.median(spread([row["tokens"] for row in s]) for s in steps)
        measured["padded_tokens_spread"] = statistics.median(spread([row["padded_tokens"] for row in s]) for s in steps)
        measured["rank_tokens"] = [statistics.fmean(s[r]["tokens"] for s in steps) for r in range(2)]
        measured["rank_padded_tokens"] = [statistics.fmean(s[r]["padded_tokens"] for s in steps) for r in range(2)]
        return measured

    return interleaved(
        runner, "cost", ("plain", "cost"), plan.cost_rounds, plan.cost_steps, measure, variable_length=True
    )


def report_cost(runs: dict[str, list[dict[str, Any]]], plan: Plan) -> dict[str, Any]:
    rows = round_rows(
        runs,
        lambda method: LABELS[method] if method == "cost" else "plain DDP, equal-count batches",
        lambda run: [
            "/".join(f"{s:.1f}" for s in run["rank_samples"]),
            "/".join(f"{t:.0f}" for t in run["rank_tokens"]),
            f"{run['tokens_spread']:.1%}",
            "/".join(f"{t:.0f}" for t in run["rank_padded_tokens"]),
            f"{run['padded_tokens_spread']:.1%}",
        ],
    )
    print_table(
        f"variable-length text (lengths {plan.cost_min_seq_len}-{plan.cost_seq_len}, padded per batch), equal speeds; "
        f"global batch {2 * plan.cost_batch_size} samples, steps {plan.cost_steps}, timed from step "
        f"{plan.cost_measure_from}, {plan.cost_rounds} interleaved rounds; spreads: median over steps of "
        "(max - min) / mean over ranks",
        [
            "run",
            "median step ms",
            "end-to-end ms",
            "samples r0/r1",
            "tokens r0/r1",
            "token spread",
            "padded r0/r1",
            "padded spread",
        ],
        rows,
    )
    plain = statistics.median(run["median_step_seconds"] for run in runs["plain"])
    cost = statistics.median(run["median_step_seconds"] for run in runs["cost"])
    ratio = cost / plain
    plain_spread = statistics.median(run["tokens_spread"] for run in runs["plain"])
    even = statistics.median(run["tokens_spread"] for run in runs["cost"])
    print(
        "(the issue states no number for this part; the model computes on padded tokens, the loss counts the others, "
        "so equal tokens are equal work only where padding is not computed)"
    )
    return {
        "runs": runs,
        "cost_vs_plain_step_time": ratio,
        "goals": report_goals(
            Goal(
                "CostBalancer evens the ranks' tokens", f"spread {plain_spread:.1%} -> {even:.1%}", even < plain_spread
            ),
            Goal("CostBalancer step time below equal-count batches'", f"{ratio:.3f}x", ratio < 1.0),
        ),
    }


# --- main ----------------------------------------------------------------------------------------------------


def main() -> None:
    destroy_process_group_at_exit()  # the plain-DDP peer runs need it too (gloo exit race)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps: a smoke run (< 2 min)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--slowdown", choices=SLOWDOWNS, default="auto", help="how rank 1 is slowed (auto: quota)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None, help="write the results here as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Job(**json.loads(args.worker)))
        return
    parts = parse_choices(args.only, PARTS, "--only", parser)
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("balancing.py: needs two CPU cores (one per rank)")

    plan = QUICK if args.quick else FULL
    command, machine = command_line(), machine_facts()
    print(f"command: {command}\nmachine: {machine}")
    slowdown = choose_slowdown(args.slowdown) if {"slow", "loss"} & set(parts) else "none"
    model = TinyGPT(n_layer=plan.n_layer, n_head=plan.n_head, d_model=plan.d_model)
    parameters = sum(p.numel() for p in model.parameters())
    quota = f" (cgroup {cgroup_root()}: cfs quota {QUOTA_US} us per {QUOTA_PERIOD_US} us)"
    print(
        f"model: TinyGPT d_model {plan.d_model}, {plan.n_layer} layers, {plan.n_head} heads: {parameters:,} "
        "parameters\n"
        f"training: 2 processes (Lightning DDP, gloo, 1 thread each, rank r pinned to core r), seed {args.seed}; "
        f"fixed-length parts: {plan.batch_size} windows of {plan.seq_len} bytes per rank (global batch "
        f"{2 * plan.batch_size} for both methods)\n"
        f"slowdown: {slowdown}{quota if slowdown == 'quota' else ''}"
    )
    if args.quick:
        print("quick: sizes far too small for the goals to mean anything; this only shows the harness works")

    exit_on_sigterm()  # so the cgroup is removed
    report: dict[str, Any] = {"command": command, "machine": machine, "plan": asdict(plan), "parts": {}}

    runner = Runner(plan, args.seed)

    def slow_and_loss() -> None:
        slow = run_slow(runner, plan, slowdown, with_noise_run="loss" in parts and plan.noise_run)
        if "slow" in parts:
            report["parts"]["slow"] = report_slow(slow, plan)
        if "loss" in parts:
            report["parts"]["loss"] = report_loss(slow, plan)

    def equal() -> None:
        report["parts"]["equal"] = report_equal(run_equal(runner, plan), plan)

    def cost() -> None:
        report["parts"]["cost"] = report_cost(run_cost(runner, plan), plan)

    steps = [("slow", slow_and_loss)] if {"slow", "loss"} & set(parts) else []
    steps += [(name, run) for name, run in (("equal", equal), ("cost", cost)) if name in parts]
    for name, run in steps:
        try:
            run()
        except JobFailed as error:  # a hang or crash is a result too: report it and go on
            print(f"\n{name}: FAILED: {error}")
            report["parts"][name] = {"failed": str(error)}
        write_json(args.json, report)
    report["jobs"] = runner.records
    finish(report, args.json)


if __name__ == "__main__":
    main()

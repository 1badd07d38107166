"""Does the balancer ever hurt? ThroughputBalancer against plain DDP under slowness that differs in kind, comes
and goes, or is not there at all (issue #15).

The jobs are `benchmarks/balancing.py`'s (the small GPT, 2 CPU processes, gloo, rank r pinned to core r, the
same seed, global batch and steps for both methods). Steady scenarios, each run by both methods in every round
(the scenarios and the two methods' order alternate between rounds, so drift on the machine hits all alike):

- ``none``: nothing slowed;
- ``quota``: rank 1 in a cgroup with a cpu quota of 50% of its core;
- ``busy``: a busy loop pinned to rank 1's core (the scheduler halves its share);
- ``stall``: rank 1's process stopped (SIGSTOP) for `--stall-ms` every `--stall-period-ms` (a co-located job
  that takes the core in bursts: every other step or so at the defaults);
- ``random``: background load that comes and goes on both cores: a busy loop pinned to each core, each switched
  on (probability 0.4) or off every 0.3-1.5 s on a schedule drawn from the round's seed, so the two methods of
  a round meet the same schedule from their launch on.

Then the changes, balanced runs only: rank 1 joins the quota cgroup at step `change_at` (``slows``) or leaves it
there (``recovers``). For each, the wall time per step of every re-plan window after the change, against the
best split's: the balanced steady runs' time per step in the new condition (``quota``, resp. ``none``), median
over rounds. Goal: within 5% of it in the window after at most 3 re-plans.

Throughput is the mean end-to-end rate over the timed steps (all their samples over their wall time: what a
user gets, stalls and throttling included); each round's balanced/plain ratio is reported, with the median,
the spread and the worst. Goals (the issue's): median >= 1.3x for `quota`, `busy` and `stall`; >= 0.97x in
every round for `none` and `random`.

Needs root for the cgroup and two CPU cores.

Usage:
    python benchmarks/balancing_robust.py [--quick] [--rounds 5] [--change-rounds 2]
                                          [--only none,quota,busy,stall,random,slows,recovers] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

from balancing import FULL, QUICK, Plan, Runner, busy_core, quota_cgroup, shares_text, throughput, timed_rows
from harness import (
    Goal,
    JobFailed,
    command_line,
    exit_on_sigterm,
    finish,
    machine_facts,
    parse_choices,
    print_table,
    progress,
    report_goals,
    write_json,
)

from lightning_eff.distributed import destroy_process_group_at_exit

STEADY = ("none", "quota", "busy", "stall", "random")
CHANGES = ("slows", "recovers")
SLOWED = ("quota", "busy", "stall")  # goal: median >= 1.3x
UNHARMED = ("none", "random")  # goal: >= 0.97x in every round
CLOSE = 0.05  # a window within this of the best split's time per step has reached it
REPLANS = 3


@contextmanager
def random_load(seed: int) -> Iterator[None]:
    """A busy loop pinned to each core (`busy_core`), switched on and off on a schedule drawn from `seed`."""
    with busy_core(0) as loop0, busy_core(1) as loop1:
        loops = [loop0, loop1]
        for loop in loops:
            os.kill(loop.pid, signal.SIGSTOP)
        stop = threading.Event()

        def switch() -> None:
            draw = random.Random(seed)
            while not stop.is_set():
                for loop in loops:
                    with suppress(ProcessLookupError):
                        os.kill(loop.pid, signal.SIGCONT if draw.random() < 0.4 else signal.SIGSTOP)
                stop.wait(draw.uniform(0.3, 1.5))

        thread = threading.Thread(target=switch, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()  # busy_core kills the loops, stopped or not


def run_one(runner: Runner, plan: Plan, scenario: str, method: str, round_index: int, args: Any) -> dict[str, Any]:
    """One job of `scenario` with `method`; its throughput, splits and per-step rows."""
    name = f"{scenario}-{method}-{round_index}"
    fields: dict[str, Any] = {}
    with conditions_for(scenario, runner.seed + round_index) as cgroup:
        if scenario == "quota":
            fields = {"slow_rank": 1, "cgroup": str(cgroup)}
        elif scenario in CHANGES:
            fields = {"slow_rank": 1, "cgroup": str(cgroup), "change_at": args.change_at, "change": scenario}
        elif scenario == "stall":
            fields = {"slow_rank": 1, "stall_ms": args.stall_ms, "stall_period_ms": args.stall_period_ms}
        ranks = runner.run([runner.job(name, method, plan.slow_steps, **fields)], cores=[None])[0]
    history = ranks[0].get("history", [])
    steps = timed_rows(ranks, plan.measure_from)
    equal = sum(len({row["samples"] for row in step}) == 1 for step in steps)
    return throughput(ranks, plan.measure_from) | {
        "equal_split_share": equal / len(steps),  # of the timed steps: did the balancer move at all?
        "splits": shares_text(history),
        "history": history,
        "rows": ranks[0]["rows"],
    }


@contextmanager
def conditions_for(scenario: str, seed: int) -> Iterator[Path | None]:
    """What the scenario needs around its job: a quota cgroup, a busy loop, random load, or nothing."""
    if scenario in ("quota", *CHANGES):
        with quota_cgroup() as path:
            yield path
    elif scenario == "busy":
        with busy_core(1):
            yield None
    elif scenario == "random":
        with random_load(seed):
            yield None
    else:
        yield None


def rate_of(run: dict[str, Any]) -> float:
    return float(run["mean_end_to_end_samples_per_second"])


def report_steady(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per scenario: each round's ratio, the median, the spread and the worst; the goals."""
    rows, summary, goals = [], {}, []
    for scenario, by_method in runs.items():
        ratios = [rate_of(b) / rate_of(p) for p, b in zip(by_method["plain"], by_method["balanced"], strict=True)]
        median, worst = statistics.median(ratios), min(ratios)
        summary[scenario] = {"ratios": ratios, "median": median, "worst": worst, "best": max(ratios)}
        rows.append(
            [
                scenario,
                " ".join(f"{rate_of(run):.1f}" for run in by_method["plain"]),
                " ".join(f"{rate_of(run):.1f}" for run in by_method["balanced"]),
                " ".join(f"{ratio:.2f}" for ratio in ratios),
                f"{median:.2f}x",
                f"{worst:.2f}-{max(ratios):.2f}",
            ]
        )
        if scenario in SLOWED:
            goals.append(Goal(f"{scenario}: median >= 1.3x plain DDP", f"{median:.2f}x", median >= 1.3))
        if scenario in UNHARMED:
            goals.append(Goal(f"{scenario}: >= 0.97x plain DDP in every round", f"worst {worst:.3f}x", worst >= 0.97))
    print_table(
        "mean end-to-end samples/s per round (plain DDP, ThroughputBalancer) and balanced/plain",
        ["scenario", "plain DDP", "balanced", "ratio per round", "median", "spread"],
        rows,
    )
    for scenario, by_method in runs.items():
        if "frozen" in by_method:  # the control: the balancer's measuring and exchanging, at the equal split
            frozen = [rate_of(f) / rate_of(p) for p, f in zip(by_method["plain"], by_method["frozen"], strict=True)]
            summary[scenario]["frozen_ratios"] = frozen
            print(
                f"{scenario}: equal split kept (control) / plain DDP per round: " + " ".join(f"{r:.2f}" for r in frozen)
            )
        shares = " ".join(f"{run['equal_split_share']:.0%}" for run in by_method["balanced"])
        print(f"{scenario}: timed steps at the equal split, per round: {shares}")
        for index, run in enumerate(by_method["balanced"]):
            print(f"{scenario} round {index + 1} splits (step:rank0/rank1): {run['splits']}")
    return {"scenarios": summary, "goals": report_goals(*goals)}


def window_seconds(rows: list[dict[str, Any]], start: int, end: int) -> float | None:
    """Wall seconds per step from the end of step `start - 1` to the end of step `end - 1` (None: not run)."""
    ends = {row["step"]: row["end"] for row in rows}
    if start - 1 not in ends or end - 1 not in ends:
        return None
    return (ends[end - 1] - ends[start - 1]) / (end - start)


def report_changes(
    changes: dict[str, list[dict[str, Any]]], steady: dict[str, dict[str, list[dict[str, Any]]]], plan: Plan, at: int
) -> dict[str, Any]:
    """Per change and round: each window's time per step after the change against the best split's."""
    every = plan.replan_every
    first_replan = (at // every + 1) * every  # the first re-plan that has measured steps after the change
    summary, goals = {}, []
    for change, runs in changes.items():
        target = "quota" if change == "slows" else "none"
        if target not in steady:
            print(f"{change}: no steady {target} runs to compare with (--only)")
            continue
        best = statistics.median(run["global_samples"] / rate_of(run) for run in steady[target]["balanced"])
        reached = []
        rows = []
        for index, run in enumerate(runs):
            windows = []
            for replan in range(REPLANS + 1):
                start = first_replan + (replan - 1) * every if replan else at
                seconds = window_seconds(run["rows"], start, start + every)
                windows.append(seconds)
            within = [
                replan
                for replan, seconds in enumerate(windows)
                if seconds is not None and seconds <= best * (1 + CLOSE)
            ]
            reached.append(within[0] if within else None)
            rows.append(
                [
                    f"{change}, round {index + 1}",
                    *(f"{seconds * 1e3:.0f}" if seconds is not None else "-" for seconds in windows),
                    f"{best * 1e3:.0f}",
                    str(reached[-1]) if reached[-1] is not None else f"> {REPLANS}",
                ]
            )
            print(f"{change} round {index + 1} splits (step:rank0/rank1): {run['splits']}")
        print_table(
            f"rank 1 {change} at step {at}: ms per step of the window after each re-plan (0: before the first), "
            f"the best split's (balanced steady {target} runs, median), and the re-plans it took to get within "
            f"{CLOSE:.0%}",
            ["run", *(f"after {k}" for k in range(REPLANS + 1)), "best", "re-plans"],
            rows,
        )
        ok = all(value is not None for value in reached)
        summary[change] = {"best_seconds": best, "replans_to_reach": reached}
        goals.append(
            Goal(f"{change}: within {CLOSE:.0%} of the best split within {REPLANS} re-plans", str(reached), ok)
        )
    return {"changes": summary, "goals": report_goals(*goals)}


def main() -> None:
    destroy_process_group_at_exit()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps: a smoke run")
    parser.add_argument("--only", default=",".join(STEADY + CHANGES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--change-rounds", type=int, default=2)
    parser.add_argument("--change-at", type=int, default=None, help="step of the change (default: 70, quick 12)")
    parser.add_argument("--stall-ms", type=int, default=100)
    parser.add_argument("--stall-period-ms", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None)
    parser.add_argument(
        "--control", action="store_true", help="also run a balancer that keeps the equal split (its overhead alone)"
    )
    args = parser.parse_args()
    chosen = parse_choices(args.only, STEADY + CHANGES, "--only", parser)
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("balancing_robust.py: needs two CPU cores (one per rank)")
    plan = QUICK if args.quick else FULL
    args.change_at = args.change_at or (12 if args.quick else 70)
    command, machine = command_line(), machine_facts()
    print(f"command: {command}\nmachine: {machine}")
    print(
        f"small GPT d_model {plan.d_model}, {plan.n_layer} layers; global batch {2 * plan.batch_size}, "
        f"{plan.slow_steps} steps, timed from step {plan.measure_from}; ThroughputBalancer(replan_every="
        f"{plan.replan_every}); stall {args.stall_ms} ms every {args.stall_period_ms} ms"
    )
    exit_on_sigterm()
    report: dict[str, Any] = {"command": command, "machine": machine, "plan": asdict(plan), "parts": {}}
    runner = Runner(plan, args.seed)
    methods = ("plain", "balanced", "frozen") if args.control else ("plain", "balanced")
    steady: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {method: [] for method in methods} for s in chosen if s in STEADY
    }
    try:
        for round_index in range(args.rounds):
            order = list(steady) if round_index % 2 == 0 else list(reversed(steady))
            for scenario in order:
                for method in methods if round_index % 2 == 0 else tuple(reversed(methods)):
                    steady[scenario][method].append(run_one(runner, plan, scenario, method, round_index, args))
            progress(f"round {round_index + 1} of {args.rounds} done")
        changes: dict[str, list[dict[str, Any]]] = {c: [] for c in chosen if c in CHANGES}
        for round_index in range(args.change_rounds):
            for change in changes:
                changes[change].append(run_one(runner, plan, change, "balanced", round_index, args))
    except JobFailed as error:
        print(f"FAILED: {error}")
        report["failed"] = str(error)
        write_json(args.json, report)
        raise SystemExit(1) from error
    light = {s: {m: [{k: v for k, v in run.items() if k != "rows"} for run in runs] for m, runs in by.items()}
             for s, by in steady.items()}  # fmt: skip
    report["parts"]["steady"] = report_steady(steady) | {"runs": light}
    if changes:
        report["parts"]["changes"] = report_changes(changes, steady, plan, args.change_at)
    finish(report, args.json)


if __name__ == "__main__":
    main()

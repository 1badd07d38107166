"""Does the balancer ever hurt? ThroughputBalancer against plain DDP under slowness that differs in kind, comes
and goes, or is not there at all (issue #15).

The jobs are `benchmarks/balancing.py`'s (the small GPT, 2 CPU processes, gloo, rank r pinned to core r, the
same seed, global batch and steps for both methods). Steady scenarios, each run by both methods in every round
(the scenarios and the two methods' order alternate between rounds, so drift on the machine hits all alike;
``none`` and ``random``, whose goal holds in every round, run each method `--repeats` times a round in mirrored
order, A B B A, and a round's rate is the mean of its runs: one run of a method measured up to 5% off the next
on a quiet machine):

- ``none``: nothing slowed;
- ``quota``: rank 1 in a cgroup with a cpu quota of 50% of its core;
- ``busy``: a busy loop pinned to rank 1's core (the scheduler halves its share);
- ``stall``: rank 1's process stopped (SIGSTOP) for `--stall-ms` every `--stall-period-ms` (a co-located job
  that takes the core in bursts: every other step or so at the defaults);
- ``random``: background load that comes and goes on both cores: a busy loop pinned to each core, each switched
  on (probability 0.4) or off for 1-8 steps at a time, on a schedule drawn from the round's seed and keyed to
  the training step (`balancing.StepKeyedLoad`), so the two methods of a round meet the same load at the same
  step. (A wall-clock schedule swung a round's ratio by +-12% at identical decisions: where each method's
  startup happened to fall against it.)

Then the changes: rank 1 joins the quota cgroup at step `change_at` (``slows``) or leaves it there
(``recovers``), run by the balancer and, in the same round, by balancers pinned to the candidate best splits for
the new condition from the first step: the two splits the balanced steady runs of ``quota``, resp. ``none``,
ended on most often (one, if they all ended on it). The faster of them over the settled steps is the round's best
split. Goal: from the third re-plan after the change to the end of the run, the balanced run's wall time per
step within 5% of the best split's over the same steps, in every round (each re-plan window is printed too).
A same-round reference, because one split's time per step differed by up to 30% between runs; two candidates,
because under a cpu quota 22/10 and 21/11 each measured faster than the other in some rounds.

Throughput is the mean end-to-end rate over the timed steps (all their samples over their wall time: what a
user gets, stalls and throttling included); each round's balanced/plain ratio is reported, with the median,
the spread and the worst. Goals (the issue's): median >= 1.3x for `quota`, `busy` and `stall`; >= 0.97x in
every round for `none` and `random`. `--pinned 21/11,19/13` also runs those fixed splits in each round of the
steady scenarios: what a split can reach at all under that slowness, the balancer's ceiling.

Needs root for the cgroup and two CPU cores.

Usage:
    python benchmarks/balancing_robust.py [--quick] [--rounds 5] [--change-rounds 2] [--repeats 2]
                                          [--only none,quota,busy,stall,random,slows,recovers] [--json PATH]
                                          [--pinned 21/11,19/13]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
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
TARGET = {"slows": "quota", "recovers": "none"}  # the steady condition each change ends in
CLOSE = 0.05  # a window within this of the best split's time per step has reached it
REPLANS = 3


@contextmanager
def random_load() -> Iterator[tuple[int, ...]]:
    """A busy loop pinned to each core (`busy_core`), stopped: the job's rank 0 switches them by step
    (`balancing.StepKeyedLoad`), so both methods of a round meet the same load at the same step."""
    with busy_core(0) as loop0, busy_core(1) as loop1:
        for loop in (loop0, loop1):
            os.kill(loop.pid, signal.SIGSTOP)
        yield (loop0.pid, loop1.pid)


def run_one(
    runner: Runner, plan: Plan, scenario: str, method: str, round_index: int, args: Any, pinned: list[int] | None = None
) -> dict[str, Any]:
    """One job of `scenario` with `method` (`pinned`: the split the "pinned" method holds); its throughput,
    splits and per-step rows."""
    held = tuple(pinned) if method == "pinned" and pinned else ()
    name = f"{scenario}-{method}{'-'.join(map(str, held))}-{round_index}"
    fields: dict[str, Any] = {"pinned_split": held} if held else {}
    with conditions_for(scenario) as condition:
        cgroup = condition if isinstance(condition, Path) else None
        if scenario == "random":
            fields |= {"load_pids": condition, "load_seed": runner.seed + round_index}
        elif scenario == "quota":
            fields |= {"slow_rank": 1, "cgroup": str(cgroup)}
        elif scenario in CHANGES:
            fields |= {"slow_rank": 1, "cgroup": str(cgroup), "change_at": args.change_at, "change": scenario}
        elif scenario == "stall":
            fields |= {"slow_rank": 1, "stall_ms": args.stall_ms, "stall_period_ms": args.stall_period_ms}
        ranks = runner.run([runner.job(name, method, plan.slow_steps, **fields)], cores=[None])[0]
    history = ranks[0].get("history", [])
    steps = timed_rows(ranks, plan.measure_from)
    equal = sum(len({row["samples"] for row in step}) == 1 for step in steps)
    return throughput(ranks, plan.measure_from) | {
        "equal_split_share": equal / len(steps),  # of the timed steps: did the balancer move at all?
        "splits": shares_text(history),
        "history": history,
        "rows": ranks[0]["rows"],
        "pinned_split": fields.get("pinned_split"),
        "round": round_index,
    }


@contextmanager
def conditions_for(scenario: str) -> Iterator[Path | tuple[int, ...] | None]:
    """What the scenario needs around its job: a quota cgroup, a busy loop, random load (its loops' pids), or
    nothing."""
    if scenario in ("quota", *CHANGES):
        with quota_cgroup() as path:
            yield path
    elif scenario == "busy":
        with busy_core(1):
            yield None
    elif scenario == "random":
        with random_load() as pids:
            yield pids
    else:
        yield None


def parse_split(text: str, global_batch: int, parser: argparse.ArgumentParser) -> list[int]:
    """ "21/11" -> [21, 11]: a split of the global batch between the two ranks (parser.error if it is not one)."""
    parts = text.split("/")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts) or sum(map(int, parts)) != global_batch:
        parser.error(f"--pinned: {text!r} is not two positive sample counts summing to the global batch {global_batch}")
    return [int(p) for p in parts]


def rate_of(run: dict[str, Any]) -> float:
    return float(run["mean_end_to_end_samples_per_second"])


def round_rates(runs: list[dict[str, Any]]) -> list[float]:
    """Per round, the mean rate of its runs of one method."""
    rounds = sorted({run["round"] for run in runs})
    return [statistics.fmean(rate_of(run) for run in runs if run["round"] == index) for index in rounds]


def report_steady(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per scenario: each round's ratio (of the mean rates of its runs), the median, the spread and the worst;
    the goals."""
    rows, summary, goals = [], {}, []
    for scenario, by_method in runs.items():
        plain, balanced = (round_rates(by_method[m]) for m in ("plain", "balanced"))
        ratios = [b / p for p, b in zip(plain, balanced, strict=True)]
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
        for method in (m for m in by_method if m.startswith("pinned ")):  # a fixed split: the ceiling of a split
            plain, pinned = (round_rates(by_method[m]) for m in ("plain", method))
            ratios = [f / p for p, f in zip(plain, pinned, strict=True)]
            summary[scenario][f"{method} ratios"] = ratios
            print(
                f"{scenario}: {method} / plain DDP per round: {' '.join(f'{r:.2f}' for r in ratios)}, "
                f"median {statistics.median(ratios):.2f}x"
            )
        if "frozen" in by_method:  # the control: the balancer's measuring and exchanging, at the equal split
            plain, control = (round_rates(by_method[m]) for m in ("plain", "frozen"))
            frozen = [f / p for p, f in zip(plain, control, strict=True)]
            summary[scenario]["frozen_ratios"] = frozen
            print(
                f"{scenario}: equal split kept (control) / plain DDP per round: " + " ".join(f"{r:.2f}" for r in frozen)
            )
        shares = " ".join(f"{run['equal_split_share']:.0%}" for run in by_method["balanced"])
        print(f"{scenario}: timed steps at the equal split, per run: {shares}")
        for index, run in enumerate(by_method["balanced"]):
            print(f"{scenario} run {index + 1} splits (step:rank0/rank1): {run['splits']}")
    return {"scenarios": summary, "goals": report_goals(*goals)}


def window_seconds(rows: list[dict[str, Any]], start: int, end: int) -> float | None:
    """Wall seconds per step from the end of step `start - 1` to the end of step `end - 1` (None: not run)."""
    ends = {row["step"]: row["end"] for row in rows}
    if end <= start or start - 1 not in ends or end - 1 not in ends:
        return None
    return (ends[end - 1] - ends[start - 1]) / (end - start)


def settled_splits(runs: list[dict[str, Any]]) -> list[list[int]]:
    """The (at most two) splits the balanced steady runs of a condition ended on most often: the candidates for
    the best split there."""
    finals = Counter(tuple(run["history"][-1]["batch_sizes"]) for run in runs if run["history"])
    return [list(split) for split, _ in finals.most_common(2)]


def report_changes(changes: dict[str, dict[str, list[dict[str, Any]]]], plan: Plan, at: int) -> dict[str, Any]:
    """Per change and round: the balanced run's time per step against the faster of the runs of the same round
    that held a candidate best split throughout (`pinned`), window by window after the change and over every step
    from the third re-plan after it to the end; goal: that within `CLOSE` in every round."""
    every = plan.replan_every
    first_replan = (at // every + 1) * every  # the first re-plan that has measured steps after the change
    settled_from = first_replan + (REPLANS - 1) * every  # the window after the third re-plan starts here
    summary, goals = {}, []
    for change, by_method in changes.items():
        ratios, rows = [], []
        for index, balanced in enumerate(by_method["balanced"]):
            held = [run for run in by_method["pinned"] if run["round"] == balanced["round"]]
            times = [window_seconds(run["rows"], settled_from, plan.slow_steps) or float("inf") for run in held]
            pinned = held[times.index(min(times))]
            cells = []
            for replan in range(REPLANS + 1):
                start = first_replan + (replan - 1) * every if replan else at
                pair = [window_seconds(run["rows"], start, start + every) for run in (balanced, pinned)]
                cells.append("/".join(f"{s * 1e3:.0f}" if s is not None else "-" for s in pair))
            settled = [window_seconds(run["rows"], settled_from, plan.slow_steps) for run in (balanced, pinned)]
            ratio = settled[0] / settled[1] if settled[0] and settled[1] else float("inf")
            ratios.append(ratio)
            rows.append([f"{change}, round {index + 1}", *cells, *(f"{s * 1e3:.0f}" if s else "-" for s in settled),
                         f"{ratio:.3f}"])  # fmt: skip
            candidates = ", ".join(f"{'/'.join(map(str, run['pinned_split']))} {t * 1e3:.0f} ms" for run, t in
                                   zip(held, times, strict=True))  # fmt: skip
            print(f"{change} round {index + 1} splits (step:rank0/rank1): {balanced['splits']}; splits held from "
                  f"step {settled_from}: {candidates}")  # fmt: skip
        print_table(
            f"rank 1 {change} at step {at}: ms per step, balanced/best split held, of the window after each "
            f"re-plan (0: before the first), then over steps {settled_from}-{plan.slow_steps} (from the third "
            f"re-plan on), and balanced over best",
            ["run", *(f"after {k}" for k in range(REPLANS + 1)), "balanced", "best split", "ratio"],
            rows,
        )
        worst = max(ratios)
        summary[change] = {"settled_ratios": ratios, "worst": worst, "settled_from": settled_from}
        goals.append(Goal(f"{change}: within {CLOSE:.0%} of the best split from the {REPLANS}rd re-plan on, "
                          "every round", f"worst {worst:.3f}x the time", worst <= 1 + CLOSE))  # fmt: skip
    return {"changes": summary, "goals": report_goals(*goals)}


def without_rows(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The runs for the JSON report: splits and the balancer's history, without the per-step rows."""
    return {
        scenario: {method: [{k: v for k, v in r.items() if k != "rows"} for r in done] for method, done in by.items()}
        for scenario, by in runs.items()
    }


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
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="runs per method per round of none and random (goal: every round), mirrored: 2 is A B B A",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None)
    parser.add_argument(
        "--control", action="store_true", help="also run a balancer that keeps the equal split (its overhead alone)"
    )
    parser.add_argument(
        "--pinned",
        type=str,
        default="",
        help="also run these fixed splits in the steady scenarios (e.g. 21/11,19/13): what the best split can reach",
    )
    args = parser.parse_args()
    chosen = parse_choices(args.only, STEADY + CHANGES, "--only", parser)
    for change in CHANGES:
        if change in chosen and TARGET[change] not in chosen:
            parser.error(f"--only: {change} needs {TARGET[change]} (its steady runs give the best split)")
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("balancing_robust.py: needs two CPU cores (one per rank)")
    plan = QUICK if args.quick else FULL
    splits = {
        f"pinned {text}": parse_split(text, 2 * plan.batch_size, parser) for text in args.pinned.split(",") if text
    }
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
    methods = ("plain", "balanced", *(("frozen",) if args.control else ()), *splits)
    steady: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {method: [] for method in methods} for s in chosen if s in STEADY
    }
    try:
        for round_index in range(args.rounds):
            order = list(steady) if round_index % 2 == 0 else list(reversed(steady))
            forward = methods if round_index % 2 == 0 else tuple(reversed(methods))
            for scenario in order:
                repeats = args.repeats if scenario in UNHARMED else 1
                mirrored = [m for r in range(repeats) for m in (forward if r % 2 == 0 else reversed(forward))]
                for method in mirrored:  # e.g. A B B A: drift within the round hits both methods alike
                    kind, pinned = ("pinned", splits[method]) if method in splits else (method, None)
                    run = run_one(runner, plan, scenario, kind, round_index, args, pinned=pinned)
                    steady[scenario][method].append(run)
            progress(f"round {round_index + 1} of {args.rounds} done")
        changes: dict[str, dict[str, list[dict[str, Any]]]] = {
            c: {"balanced": [], "pinned": []} for c in chosen if c in CHANGES
        }
        candidates = {c: settled_splits(steady[TARGET[c]]["balanced"]) for c in changes}
        for round_index in range(args.change_rounds):
            for change in changes:
                jobs = [("balanced", None), *(("pinned", split) for split in candidates[change])]
                for method, split in jobs if round_index % 2 == 0 else reversed(jobs):
                    run = run_one(runner, plan, change, method, round_index, args, pinned=split)
                    changes[change][method].append(run)
    except JobFailed as error:
        print(f"FAILED: {error}")
        report["failed"] = str(error)
        write_json(args.json, report)
        raise SystemExit(1) from error
    report["parts"]["steady"] = report_steady(steady) | {"runs": without_rows(steady)}
    if changes:
        report["parts"]["changes"] = report_changes(changes, plan, args.change_at) | {"runs": without_rows(changes)}
    finish(report, args.json)


if __name__ == "__main__":
    main()

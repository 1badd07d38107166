"""ThroughputBalancer and CostBalancer: what the strategy asks each step, and the state a resume restores."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from lightning_eff.balancing.planner import (
    agreed_by_windows,
    beyond_noise,
    plan_batch_sizes,
    predicted_step_seconds,
    prefer_measured,
    smoothed,
    split_by_weight,
)
from lightning_eff.balancing.sampler import BatchPlan
from lightning_eff.validation import ConfigError, check, check_fraction, check_int

COSTS = ("tokens", "samples")
PLAN_MEMORY = 10  # re-plan windows for which a plan's measured step time is remembered
CHANGE = 0.2  # two windows in a row this far (relative) from a rank's estimate, on the same side: a new speed
NOISE_PRIOR = 0.1  # the noise assumed before windows have measured it (a first move must promise 2 x 10%)
NOISE_MARGIN = 2.0  # a new split must promise a step this many times the noise shorter
OUTLIER = 3.0  # a step longer than this many times the window's median (validation, a checkpoint) is left out


class CostBalancer:
    """Splits each global batch so that every rank's total cost, divided by its speed, is as equal as possible.

    For variable-length samples an equal sample count is not equal work. Alone it assumes equal speeds;
    inside `ThroughputBalancer(cost=CostBalancer(...))` it uses the measured ones.

    Args:
        cost: ``"tokens"`` (the length of a sample's first tensor, padding excluded when the dataset pads
            per batch) or a function ``cost_fn(sample) -> float``.
    """

    def __init__(self, cost: str | Callable[[Any], float] = "tokens") -> None:
        check((isinstance(cost, str) and cost in COSTS) or (callable(cost) and not isinstance(cost, type)), "cost",
              cost, f"must be one of {', '.join(COSTS)} or a function of a sample")  # fmt: skip
        self.cost = cost

    def cost_of(self, dataset: Dataset) -> Callable[[int], float]:
        """The cost of sample `index` of `dataset`."""
        if callable(self.cost):
            cost_fn = self.cost
            return lambda index: float(cost_fn(dataset[index]))
        if self.cost == "samples":
            return lambda index: 1.0

        def tokens(index: int) -> float:
            sample = dataset[index]
            first = sample[0] if isinstance(sample, (tuple, list)) else sample
            return float(len(first))

        return tokens


class ThroughputBalancer:
    """Sizes each rank's share of the global batch so that every rank's predicted step time is the same.

    Each rank's step time is modelled as ``t_i(b) = fixed_i + b / speed_i``: `speed_i` is samples per second of
    the work that grows with the batch (forward, and backward up to the moment this rank's gradients are ready),
    `fixed_i` the seconds per step of this rank's own work that does not (hooks, zero_grad, the optimizer step;
    on CPU also the communication threads' work after the last gradient, see `EfficientDDPStrategy`).
    A proportional split by speed alone ignores the fixed part, and a rank that is slow at everything pays its
    fixed part slowly too, so it would be given slightly too many samples. Neither part includes time spent
    waiting in collectives, so a rank that waits for a slow peer does not look slow itself. Every
    `replan_every` optimizer steps the ranks all-gather their measurements and all compute the same new plan
    (`plan_batch_sizes`). The first `warmup_steps` steps after set-up (allocations, DDP rebuilding its buckets
    with a collective in the second forward) are left out of the first window. The wall time per step that
    each plan achieved is remembered for a few windows, and a proposal that ran slower than another remembered
    plan by more than twice the standard error of the difference gives way to that plan (`prefer_measured`): the
    measured step time is what a plan is for.

    The moving average keeps the plan from following noise, but it would take many windows to follow a rank that
    really turned slow or recovered (a co-located job starting or ending): when two windows in a row measure a rank
    more than 20% (or twice a window's typical relative deviation of a speed, `speed_noise`) away from its estimate
    on the same side, the estimate is reset to their mean (`follow_change`), so the plan follows within two
    re-plans; unless its batch moved the same way in both windows (under a cpu quota a rank given fewer samples
    measures faster, which is the plan's doing, not a change of the rank); the next window, the first on a plan cut
    for the new speed, replaces the estimate once more (or, when its batch moved the way its speed did, is averaged
    in). When the change also moves the rank's predicted time under the plan by more than twice the noise of the
    step (below), it concerns the plan: the remembered step times of earlier plans, measured before it, are
    forgotten (those of the change's two windows are kept: the new plan must beat them), and the noise gate does
    not hold the new plan back. A fast rank with a few milliseconds of work reads twice as fast for two windows
    without moving the step: its estimate follows, and the rest stands.
    Otherwise a new plan must promise more than the noise: the predicted step time (`beyond_noise`) must shrink by
    more than twice the noise: how far a window's measured speeds typically move a rank's predicted time from the
    estimates, as a fraction of the predicted step (a moving average of the largest, 10% until measured), so load
    that comes and goes faster than a window does not move the split: on equal ranks a wrong split costs as much as
    the gain it promised. (A fast rank with a few milliseconds of work can stray by half its speed while barely
    moving the step; in units of speed that held back a move predicted to cut the step by 35%.) A move away from the
    equal split must also be asked for by each of the last two windows' own measurements (`agreed_by_windows`), so
    the first re-plan never moves away from it, and load that lands on one rank for a single window does not move
    the split. A move back toward the equal split needs no such proof.

    Args:
        replan_every: optimizer steps between re-plans.
        smoothing: weight of the previous estimates in the moving average, in [0, 1).
        min_share: smallest share of the global batch a rank gets, in (0, 1/world_size).
        tolerance: keep the current plan unless some rank's share would change by more than this (relative).
        cost: also balance the cost of variable-length samples (`CostBalancer`).
        warmup_steps: steps after set-up (and after a resume) that are not measured.
    """

    def __init__(
        self,
        replan_every: int = 50,
        smoothing: float = 0.8,
        min_share: float = 0.05,
        tolerance: float = 0.05,
        cost: CostBalancer | None = None,
        warmup_steps: int = 2,
    ) -> None:
        check_int("replan_every", replan_every, 1)
        check_fraction("smoothing", smoothing, low_open=False)
        check_fraction("min_share", min_share)
        check_fraction("tolerance", tolerance, low_open=False)
        check_int("warmup_steps", warmup_steps, 0)
        check(cost is None or isinstance(cost, CostBalancer), "cost", cost,
              "must be a CostBalancer or null, e.g. CostBalancer(cost=tokens) (balancing=throughput_cost)")  # fmt: skip
        self.replan_every = replan_every
        self.smoothing = smoothing
        self.min_share = min_share
        self.tolerance = tolerance
        self.cost = cost
        self.warmup_steps = warmup_steps
        self.plan = BatchPlan(batch_sizes=[])
        self.speeds: list[float] = []  # per rank: samples/s of the work that grows with the batch
        self.fixed_seconds: list[float] = []  # per rank: seconds per step of the work that does not
        self.history: list[dict[str, Any]] = []
        self._last_measured: tuple[list[float], list[float]] | None = None  # the last window's speeds and fixed
        # Moving averages of how far a window strays from the estimates, in two units. `noise` gates plans: the most
        # any rank's predicted time under the window's plan strayed, as a fraction of the predicted step (a fast
        # rank with a few milliseconds of work may stray by half its speed and barely move the step).
        # `speed_noise` sets the bar for a change of one rank's speed: its largest relative deviation.
        self.noise = NOISE_PRIOR
        self.speed_noise = NOISE_PRIOR
        self._noise_before = self._speed_noise_before = NOISE_PRIOR  # before the last window's update
        self._window_plans: list[list[int]] = []  # the plans the last three windows ran
        self._settling: list[bool] = []  # per rank: its speed changed at the last re-plan
        self._steps = 0
        self._samples = 0
        self._busy_seconds = 0.0
        self._fixed_seconds = 0.0
        self._step_times: list[float] = []  # this window's wall seconds per step, of steps cut by the plan
        # plan -> its windows in the last PLAN_MEMORY re-plans: (step, wall seconds per step, its standard error)
        self._measured: dict[tuple[int, ...], list[tuple[int, float, float]]] = {}
        self.step_noise: float | None = None  # relative spread of a window's mean step time between windows of a plan
        self._step_noise_before: float | None = None  # before the last window's update
        self._recorded = 0
        self._last_replan = 0

    # --- set-up ---------------------------------------------------------------------------------------

    def check_world_size(self, world_size: int) -> None:
        """Every rank must be able to get `min_share`: the app asks before launch, `setup` again at run time."""
        check(self.min_share < 1 / world_size, "min_share", self.min_share,
              f"must be < 1/world_size = {1 / world_size:.3g}")  # fmt: skip

    def setup(self, global_batch_size: int, world_size: int) -> BatchPlan:
        """The plan for a run: restored from a checkpoint, or equal shares. Measuring starts anew."""
        self.check_world_size(world_size)
        if len(self.plan.batch_sizes) != world_size or sum(self.plan.batch_sizes) != global_batch_size:
            self.plan.batch_sizes = split_by_weight(global_batch_size, [1.0] * world_size, minimum=1)
            self.plan.speeds = [1.0] * world_size
        self._steps, self._samples, self._busy_seconds, self._fixed_seconds = 0, 0, 0.0, 0.0
        self._step_times, self._recorded = [], 0
        return self.plan

    # --- measuring and re-planning --------------------------------------------------------------------

    def record(
        self, samples: int, busy_seconds: float, fixed_seconds: float = 0.0, step_seconds: float | None = None
    ) -> None:
        """This rank's work in one optimizer step, none of it waiting in collectives.

        Args:
            samples: samples trained in the step.
            busy_seconds: seconds of the work that grows with the batch (forward and backward).
            fixed_seconds: seconds of the work that does not (hooks, zero_grad, the optimizer step).
            step_seconds: the step's wall time, waiting included. It counts toward the current plan's measured
                step time only if this rank's batch had the plan's size (the loader cuts batches ahead, so
                the first steps after a re-plan still follow the old plan).
        """
        self._recorded += 1
        if self._recorded <= self.warmup_steps:
            return
        self._steps += 1
        self._samples += samples
        self._busy_seconds += busy_seconds
        self._fixed_seconds += fixed_seconds
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        sizes = self.plan.batch_sizes
        if step_seconds is not None and rank < len(sizes) and samples == sizes[rank]:
            self._step_times.append(step_seconds)

    def maybe_replan(self, step: int, device: torch.device) -> bool:
        """At every `replan_every`-th step, exchange measurements and re-plan; the same on every rank (collective)."""
        if step == 0 or step % self.replan_every or step == self._last_replan:
            return False
        self._last_replan = step
        window = [float(self._steps), float(self._samples), self._busy_seconds, self._fixed_seconds]
        window += [float(len(self._step_times)), *_step_time_summary(self._step_times)]
        local = torch.tensor(window, dtype=torch.float64, device=device)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        gathered = [torch.zeros_like(local) for _ in range(world)]
        if world > 1:
            dist.all_gather(gathered, local)
        else:
            gathered = [local]
        columns = ([float(t[k]) for t in gathered] for k in range(7))
        steps, samples, busy, fixed, timed, step_seconds, step_errors = columns
        self._steps, self._samples, self._busy_seconds, self._fixed_seconds = 0, 0, 0.0, 0.0
        self._step_times = []
        old = list(self.plan.batch_sizes)
        measured_step = max(step_seconds) if all(n > 0 for n in timed) else None  # steps are synchronous
        step_error = max(step_errors)
        step_change = None  # relative difference from the plan's last window: how much windows of one plan spread
        if measured_step is not None:
            windows = self._measured.setdefault(tuple(old), [])
            if windows:
                step_change = abs(measured_step - windows[-1][1]) / windows[-1][1]
            windows.append((step, measured_step, step_error))
        self._forget_measured_before(step - PLAN_MEMORY * self.replan_every + 1)
        if not all(n > 0 and s > 0 and b > 0 for n, s, b in zip(steps, samples, busy, strict=True)):
            return False  # a window of warm-up steps only, or nothing measured: the same answer on every rank
        measured_speeds = [s / b for s, b in zip(samples, busy, strict=True)]
        measured_fixed = [max(f, 0.0) / n for f, n in zip(fixed, steps, strict=True)]
        fresh = len(self.speeds) != world or len(self.fixed_seconds) != world
        previous_speeds = [None] * world if fresh else self.speeds
        previous_fixed = [None] * world if fresh else self.fixed_seconds
        self._window_plans = [*self._window_plans[-2:], old]  # the plans of the last three windows, this one last
        last = self._last_measured
        self._last_measured = (measured_speeds, measured_fixed)
        last_speeds: list[float | None] = [None] * world
        last_fixed: list[float | None] = [None] * world
        sizes: list[tuple[int, ...]] = [()] * world
        plans_known = len(self._window_plans) == 3 and all(len(p) == world for p in self._window_plans)
        if last is not None and len(last[0]) == world and plans_known:
            last_speeds, last_fixed = list(last[0]), list(last[1])
            sizes = list(zip(*self._window_plans, strict=True))
        # Load that comes and goes puts two windows in a row off the estimate often: a change must stand out of the
        # noise as it was before the first of the two (which that window's deviation then raised).
        threshold = max(CHANGE, NOISE_MARGIN * self._speed_noise_before)
        speeds = [
            follow_change(p, m, last, self.smoothing, rank_sizes, threshold)
            for p, m, last, rank_sizes in zip(previous_speeds, measured_speeds, last_speeds, sizes, strict=True)
        ]
        fixed_seconds = [  # a rank whose speed changed: its fixed work too (the same cause slows both)
            (m + f) / 2 if change and f is not None else smoothed(p, m, self.smoothing)
            for p, m, f, (_, change) in zip(previous_fixed, measured_fixed, last_fixed, speeds, strict=True)
        ]
        # The window after a change settles it: the change's estimate averaged two windows that ran a plan cut for
        # the old speed (a rank's speed depends a little on its batch), this one ran the plan cut for the new one.
        # Unless the rank's batch moved the way its speed did, which may be the plan's doing (a cpu quota): then the
        # new speed is only averaged in, or the move it asks for undoes itself (at 22/10 a rank at half quota
        # measured 15% faster than at 16/16, and the 20/12 that followed measured 15% slower than 22/10).
        settling = self._settling if len(self._settling) == world else [False] * world
        for rank, (settle, previous, rank_sizes) in enumerate(zip(settling, previous_speeds, sizes, strict=True)):
            if not settle or speeds[rank][1]:
                continue
            faster = previous is not None and measured_speeds[rank] > previous
            if len(rank_sizes) != 3 or not batch_explains(faster, rank_sizes[:2], rank_sizes[2:]):
                speeds[rank] = (measured_speeds[rank], False)
                fixed_seconds[rank] = measured_fixed[rank]
        self._settling = [change for _, change in speeds]
        # A change concerns the plan only if it moves the rank's predicted time under it beyond the step's noise: a
        # fast rank with a few milliseconds of work reads twice as fast for two windows and barely moves the step.
        # Its estimate follows all the same, but the step times plans measured stand, and so does the noise gate.
        # (Such a read forgot that a proposal had measured 75% slower, and the next re-plan ran it again.)
        new_speeds = [v for v, _ in speeds]
        moved = [] if fresh else _step_deviations(old, self.speeds, self.fixed_seconds, new_speeds)
        bar = NOISE_MARGIN * self._noise_before
        changed = any(change and (not moved or moved[rank] > bar) for rank, (_, change) in enumerate(speeds))
        deviations = [abs(m - p) / p for p, m in zip(previous_speeds, measured_speeds, strict=True) if p]
        step_deviations = [] if fresh else _step_deviations(old, self.speeds, self.fixed_seconds, measured_speeds)
        if changed:  # a lasting change is not noise: undo what its first window added
            # (A plan's step time moved with the change too: its first window is no measure of windows' spread.)
            self.noise, self.speed_noise = self._noise_before, self._speed_noise_before
            self.step_noise = self._step_noise_before
            # The step times plans measured before it are out of date; its own two windows ran the old plan under
            # the new condition, so the plan cut for it must measure faster than they did, or it gives way.
            # (Stalls that fell into a slow rank's wait for two windows read as a recovery, and the equal split
            # that followed measured 25% slower than the plan it replaced.)
            self._forget_measured_before(step - self.replan_every)
        else:
            if deviations:
                self._speed_noise_before = self.speed_noise
                self.speed_noise = smoothed(self.speed_noise, max(deviations), self.smoothing)
            if step_deviations:
                self._noise_before, self.noise = self.noise, smoothed(self.noise, max(step_deviations), self.smoothing)
            self._step_noise_before = self.step_noise
            if step_change is not None:  # the standard deviation of one window, from a difference of two
                self.step_noise = smoothed(self.step_noise, step_change / math.sqrt(2), self.smoothing)
        self.speeds, self.fixed_seconds = new_speeds, fixed_seconds
        proposed = plan_batch_sizes(
            sum(old), self.speeds, self.min_share, old, self.tolerance, fixed_seconds=self.fixed_seconds
        )
        margin = NOISE_MARGIN * self.noise
        planned = proposed
        if not changed:  # a move away from the equal split: beyond the noise, by the estimates and by each window
            own = [w for w in (last, self._last_measured) if w is not None and len(w[0]) == world]
            planned = beyond_noise(old, proposed, self.speeds, self.fixed_seconds, margin)
            planned = agreed_by_windows(old, planned, own, margin)
        seconds_per_step, errors = self._measured_step_times()
        self.plan.batch_sizes = prefer_measured(planned, seconds_per_step, errors, z=NOISE_MARGIN)
        self.plan.speeds = list(self.speeds)
        per_step = [(b + f) / n for b, f, n in zip(busy, fixed, steps, strict=True)]
        slowest = max(per_step)
        self.history.append(
            {
                "step": step,
                "batch_sizes": list(self.plan.batch_sizes),
                "speeds": list(self.speeds),
                "fixed_seconds": list(self.fixed_seconds),
                "busy_seconds": per_step,
                "idle_fraction": [1 - b / slowest if slowest > 0 else 0.0 for b in per_step],
                "step_seconds": measured_step,  # wall time per step under the window's plan (`old`)
                "step_seconds_error": step_error if measured_step is not None else None,  # its standard error
                "step_noise": self.step_noise,
                "proposed": proposed,  # the model's plan, before the noise gate and the measured step times
                "noise": self.noise,
                "changed": changed,  # a change of a rank's speed that concerns the plan was followed
            }
        )
        return self.plan.batch_sizes != old

    def _forget_measured_before(self, step: int) -> None:
        """Drop the remembered windows of plans measured before `step` (and plans left with none)."""
        recent = {plan: [w for w in windows if w[0] >= step] for plan, windows in self._measured.items()}
        self._measured = {plan: windows for plan, windows in recent.items() if windows}

    def _measured_step_times(self) -> tuple[dict[tuple[int, ...], float], dict[tuple[int, ...], float]]:
        """Each remembered plan's mean step time over its windows, and the standard error of that mean.

        A window's steps are not independent samples: load that comes and goes lasts several steps, so the spread
        within a window understates how much the next window of the same plan differs. The error of one window
        is the larger of its within-window standard error and `step_noise` (the spread between windows of one
        plan), and shrinks with the square root of the plan's number of windows.
        """
        seconds_per_step, errors = {}, {}
        for plan, windows in self._measured.items():
            mean = statistics.fmean(seconds for _, seconds, _ in windows)
            within = max(error for _, _, error in windows)
            seconds_per_step[plan] = mean
            errors[plan] = max(within, (self.step_noise or 0.0) * mean) / math.sqrt(len(windows))
        return seconds_per_step, errors

    # --- what a user reads ----------------------------------------------------------------------------

    def stats(self) -> dict[str, list[float]]:
        """Per-rank share, speed (samples/s of forward and backward), fixed seconds per step and idle fraction.

        The idle fraction is over the last re-plan window: 1 - this rank's busy seconds per step over the
        busiest rank's (communication itself is not counted).
        """
        last = self.history[-1] if self.history else {}
        return {
            "share": self.plan.shares() if self.plan.batch_sizes else [],
            "speed": list(self.speeds),
            "fixed_seconds": list(self.fixed_seconds),
            "idle_fraction": list(last.get("idle_fraction", [])),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "batch_sizes": list(self.plan.batch_sizes),
            "speeds": list(self.speeds),
            "fixed_seconds": list(self.fixed_seconds),
            "history": list(self.history),
            "last_replan": self._last_replan,
            "noise": self.noise,
            "speed_noise": self.speed_noise,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the plan and the estimates.

        A checkpoint written before the fixed-cost model (no ``fixed_seconds``) holds speeds of forward time
        alone, a different unit: its plan is kept, but its speeds are not averaged with the new measurements.
        The measured step times of recent plans (and their spread, `step_noise`) are not saved: after a resume
        every proposal is tried anew.
        """
        self.plan.batch_sizes = list(state["batch_sizes"])
        speeds = list(state["speeds"])
        self.plan.speeds = list(speeds) or [1.0] * len(self.plan.batch_sizes)
        if "fixed_seconds" in state:
            self.speeds, self.fixed_seconds = speeds, list(state["fixed_seconds"])
        else:
            self.speeds, self.fixed_seconds = [], []
        self.history = list(state["history"])
        self._last_replan = int(state["last_replan"])
        # older checkpoints: learned anew; before `speed_noise`, `noise` was in speed units (close at balanced plans)
        self.noise = float(state.get("noise", NOISE_PRIOR))
        self.speed_noise = float(state.get("speed_noise", self.noise))


def follow_change(
    previous: float | None,
    measured: float,
    last: float | None,
    smoothing: float,
    sizes: tuple[int, ...] = (),
    threshold: float = CHANGE,
) -> tuple[float, bool]:
    """A rank's new speed estimate: the moving average, or the mean of the last two windows when both are more
    than `threshold` (relative) away from `previous` on the same side, within `CHANGE` of each other, and the
    plan does not explain it (then True: a lasting change, not noise).

    `sizes`: the rank's batch size in the window before the two, and in each of them. A rank measures faster
    with fewer samples under a cpu quota (it runs at full speed while it has quota left), and slower with more:
    a speed that moved the way its batch did in both windows may be the plan's doing, so it is only averaged in.
    """
    if previous is not None and last is not None and previous > 0 and len(sizes) == 3:
        deviations = ((measured - previous) / previous, (last - previous) / previous)
        faster, slower = all(d > threshold for d in deviations), all(d < -threshold for d in deviations)
        before, *during = sizes
        mean = (measured + last) / 2
        agreed = abs(measured - last) <= CHANGE * mean
        if (faster or slower) and agreed and not batch_explains(faster, (before,), during):
            return mean, True
    return smoothed(previous, measured, smoothing), False


def batch_explains(faster: bool, before: Sequence[int], after: Sequence[int]) -> bool:
    """Whether a rank's batch moved the way its speed did (under a cpu quota a rank measures faster with fewer
    samples): every batch `after` smaller than every one `before` for a faster rank, larger for a slower one.
    (A window with a larger batch that still measured faster is a recovery, whatever the other window ran.)"""
    return max(after) < min(before) if faster else min(after) > max(before)


def _step_deviations(plan: list[int], estimated: list[float], fixed: list[float], measured: list[float]) -> list[float]:
    """Per rank, how far its predicted time under `plan` moves from the estimated speed to the measured one, as a
    fraction of the predicted step (the slowest rank's time); [] where a speed is not positive."""
    if len(plan) != len(estimated) or not all(v > 0 for v in (*estimated, *measured)):
        return []
    step = predicted_step_seconds(plan, estimated, fixed)
    return [b * abs(1 / m - 1 / v) / step for b, v, m in zip(plan, estimated, measured, strict=True)]


def _step_time_summary(values: list[float]) -> tuple[float, float]:
    """The mean of `values` without those above `OUTLIER` times their median, and its standard error (0 for
    fewer than two); (0, 0) for none."""
    if not values:
        return 0.0, 0.0
    median = statistics.median(values)
    kept = [value for value in values if value <= OUTLIER * median]
    error = statistics.stdev(kept) / len(kept) ** 0.5 if len(kept) > 1 else 0.0
    return statistics.fmean(kept), error


def require_balancer(value: Any) -> ThroughputBalancer | None:
    """A `CostBalancer` alone becomes a balancer that never re-plans but assigns by cost; None stays None."""
    if value is None or isinstance(value, ThroughputBalancer):
        return value
    if isinstance(value, CostBalancer):
        return ThroughputBalancer(replan_every=2**62, cost=value)
    raise ConfigError("balancer", type(value).__name__, "must be a ThroughputBalancer or a CostBalancer")

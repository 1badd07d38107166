"""Per-rank shares of the global batch from measured speed: the functional core of ThroughputBalancer."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence


def _floored(
    count: int, total: float, minimum: float, solve: Callable[[list[int], float], dict[int, float]]
) -> tuple[dict[int, float], set[int]]:
    """Parts of `total`, each at least `minimum`: `solve(free, spare)` splits what the clamped ranks leave.

    A rank whose part falls below `minimum` is clamped to it and the others are solved again. The parts of the
    free ranks sum to the spare, which is at least `minimum` per free rank, so the loop ends.
    """
    if total < minimum * count:
        raise ValueError(f"cannot give {count} ranks at least {minimum} of {total}")
    clamped: set[int] = set()
    while True:
        free = [i for i in range(count) if i not in clamped]
        exact = solve(free, total - minimum * len(clamped))
        low = [i for i in free if exact[i] < minimum]
        if not low or len(low) == len(free):
            return exact, clamped
        clamped.update(low)


def split_by_weight(total: int, weights: Sequence[float], minimum: int = 0) -> list[int]:
    """Integers proportional to `weights` that sum to `total`, each at least `minimum` (largest remainders).

    Ranks whose proportional part falls below `minimum` get exactly `minimum`; the rest share what is left
    in proportion. Deterministic, so every rank computing it from the same numbers gets the same split.
    """

    def proportional(free: list[int], spare: float) -> dict[int, float]:
        weight_sum = sum(weights[i] for i in free)
        return {i: spare * weights[i] / weight_sum if weight_sum > 0 else spare / len(free) for i in free}

    exact, clamped = _floored(len(weights), total, minimum, proportional)
    spare = total - minimum * len(clamped)
    parts = {i: int(x) for i, x in exact.items()}
    by_remainder = sorted(exact, key=lambda i: (-(exact[i] - parts[i]), i))
    for i in by_remainder[: spare - sum(parts.values())]:
        parts[i] += 1
    return [minimum if i in clamped else parts[i] for i in range(len(weights))]


def equal_time_sizes(
    total: float, speeds: Sequence[float], fixed_seconds: Sequence[float], minimum: float = 0.0
) -> list[float]:
    """Real batch sizes, summing to `total` and each at least `minimum`, that give every rank the same step time.

    Rank i's step time is modelled as ``t_i(b) = fixed_seconds[i] + b / speeds[i]``: a per-step cost that does
    not depend on the batch (optimizer step, hooks, per-step overhead) plus a cost per sample. Splitting in
    proportion to speed alone equalises only the second part; a rank that is slow at everything also pays its
    fixed cost slowly, so it should get fewer samples than its speed share. Solving ``t_i(b_i) = T`` with
    ``sum(b_i) = total`` gives ``b_i = speeds[i] * (T - fixed_seconds[i])``. A rank whose size would fall below
    `minimum` (or that has speed 0) gets exactly `minimum` and the rest are solved again, as in `split_by_weight`.
    With all fixed costs 0 this is the split proportional to `speeds`.
    """
    count = len(speeds)
    if len(fixed_seconds) != count:
        raise ValueError(f"{count} speeds but {len(fixed_seconds)} fixed costs")

    def equal_time(free: list[int], spare: float) -> dict[int, float]:
        speed_sum = sum(speeds[i] for i in free)
        if speed_sum <= 0:  # nothing measured: equal parts
            return {i: spare / len(free) for i in free}
        level = (spare + sum(speeds[i] * fixed_seconds[i] for i in free)) / speed_sum
        return {i: speeds[i] * (level - fixed_seconds[i]) for i in free}

    exact, clamped = _floored(count, total, minimum, equal_time)
    return [float(minimum) if i in clamped else exact[i] for i in range(count)]


def plan_batch_sizes(
    global_batch: int,
    speeds: Sequence[float],
    min_share: float,
    current: Sequence[int] | None = None,
    tolerance: float = 0.0,
    fixed_seconds: Sequence[float] | None = None,
) -> list[int]:
    """Per-rank batch sizes that sum to `global_batch` and equalise each rank's predicted step time.

    `speeds` are samples per second of the work that grows with the batch; `fixed_seconds` each rank's work per
    step that does not (None: none), see `equal_time_sizes`. The real sizes are rounded by largest remainders.
    Each rank gets at least `min_share` of the global batch (and at least one sample), so a rank that measured
    slow once can still show it recovered. If every rank's proposed share is within `tolerance` (relative) of
    its current share, the current plan is kept, so shares do not oscillate with noise.
    """
    minimum = max(1, int(min_share * global_batch))
    fixed = list(fixed_seconds) if fixed_seconds is not None else [0.0] * len(speeds)
    exact = equal_time_sizes(global_batch, speeds, fixed, minimum)
    proposed = split_by_weight(global_batch, exact, minimum)
    comparable = current is not None and len(current) == len(proposed) and sum(current) == global_batch
    if comparable and all(abs(p - c) <= tolerance * c for p, c in zip(proposed, current or [], strict=True)):
        return list(current or [])
    return proposed


def predicted_step_seconds(sizes: Sequence[int], speeds: Sequence[float], fixed_seconds: Sequence[float]) -> float:
    """The step time the model predicts for `sizes`: the slowest rank's ``fixed + size / speed`` (inf: a rank
    with speed 0 and work)."""
    return max(
        f + (b / s if s > 0 else (float("inf") if b else 0.0))
        for b, s, f in zip(sizes, speeds, fixed_seconds, strict=True)
    )


def beyond_noise(
    current: Sequence[int],
    proposed: Sequence[int],
    speeds: Sequence[float],
    fixed_seconds: Sequence[float],
    noise: float,
) -> list[int]:
    """`proposed` if it is closer to the equal split than `current`, or if the model predicts it shortens the
    step by more than `noise` (relative); else `current`.

    `noise` is how far a window's measured speeds typically stray from the estimates: a smaller predicted gain
    may be an artefact of load that came and went, and an unequal split of equal ranks costs for sure. The
    equal split is the safe default, so a move back toward it needs no such proof.
    """
    if len(current) != len(proposed) or sum(current) != sum(proposed) or list(current) == list(proposed):
        return list(proposed)
    if closer_to_equal(current, proposed):
        return list(proposed)
    before = predicted_step_seconds(current, speeds, fixed_seconds)
    after = predicted_step_seconds(proposed, speeds, fixed_seconds)
    return list(proposed) if after < (1 - noise) * before else list(current)


def closer_to_equal(current: Sequence[int], proposed: Sequence[int]) -> bool:
    """Whether `proposed`'s largest departure from the equal split is smaller than `current`'s."""
    equal = sum(current) / len(current)
    return max(abs(p - equal) for p in proposed) < max(abs(c - equal) for c in current)


def agreed_by_windows(
    current: Sequence[int],
    proposed: Sequence[int],
    windows: Sequence[tuple[Sequence[float], Sequence[float]]],
    noise: float,
    needed: int = 2,
) -> list[int]:
    """`proposed` if it moves toward the equal split, or if each of the last `needed` `windows` (a window's own
    measured speeds and fixed seconds) alone predicts it shortens the step by more than `noise`; else `current`.

    The estimates are moving averages, and at the first re-plan they are one window: load that lands on one
    rank for a single window (a co-located job's burst) looks like a slow rank, and moving work off a rank that
    was not slow costs as much as the move promised. Load that lasts shows in two windows in a row; an
    imbalance that lasts is worth following a window later.
    """
    if list(proposed) == list(current) or len(current) != len(proposed) or closer_to_equal(current, proposed):
        return list(proposed)
    recent = windows[-needed:]
    if len(recent) < needed:
        return list(current)
    agree = all(beyond_noise(current, proposed, speeds, fixed, noise) == list(proposed) for speeds, fixed in recent)
    return list(proposed) if agree else list(current)


def prefer_measured(
    proposed: Sequence[int],
    seconds_per_step: Mapping[tuple[int, ...], float],
    errors: Mapping[tuple[int, ...], float] | None = None,
    z: float = 2.0,
) -> list[int]:
    """`proposed`, unless it ran recently and another plan that ran recently was measurably faster: then that
    plan.

    The step-time model is linear, and some effects are not: a rank held to a CPU quota runs at full speed
    while it has quota left, so given a little less work than it can sustain it measures faster than it is,
    and the model proposes giving it more again. `seconds_per_step` holds the measured wall time per step of
    the plans that ran in the last few windows (the same numbers on every rank); the measured step time, which
    is what a plan is for, then decides between plans the model keeps returning to. A proposal that has not
    run recently is always tried, so the model can still follow a real change of speed.

    `errors`: each plan's standard error of its window's mean step time. Under load that comes and goes, the
    fastest of several windows is the luckiest one, not the best plan: another plan must be faster by more than
    `z` times the standard error of the difference.
    """
    plan = tuple(proposed)
    seconds = seconds_per_step.get(plan)
    if seconds is None:
        return list(proposed)
    best = min(seconds_per_step, key=lambda other: (seconds_per_step[other], other))
    errors = errors or {}
    margin = z * math.hypot(errors.get(best, 0.0), errors.get(plan, 0.0))
    return list(best) if seconds_per_step[best] + margin < seconds else list(proposed)


def smoothed(previous: float | None, measured: float, smoothing: float) -> float:
    """Exponential moving average: `smoothing` of the old value, the rest from the new measurement."""
    return measured if previous is None else smoothing * previous + (1 - smoothing) * measured

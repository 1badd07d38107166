"""Per-rank shares of the global batch from measured speed: the functional core of ThroughputBalancer."""

from __future__ import annotations

from collections.abc import Sequence


def split_by_weight(total: int, weights: Sequence[float], minimum: int = 0) -> list[int]:
    """Integers proportional to `weights` that sum to `total`, each at least `minimum` (largest remainders).

    Ranks whose proportional part falls below `minimum` get exactly `minimum`; the rest share what is left
    in proportion. Deterministic, so every rank computing it from the same numbers gets the same split.
    """
    count = len(weights)
    if total < minimum * count:
        raise ValueError(f"cannot give {count} ranks at least {minimum} of {total}")
    clamped: set[int] = set()
    while True:
        free = [i for i in range(count) if i not in clamped]
        spare = total - minimum * len(clamped)
        weight_sum = sum(weights[i] for i in free)
        exact = {i: spare * weights[i] / weight_sum if weight_sum > 0 else spare / len(free) for i in free}
        low = [i for i in free if exact[i] < minimum]
        if not low:
            break
        clamped.update(low)
    parts = {i: int(x) for i, x in exact.items()}
    by_remainder = sorted(free, key=lambda i: (-(exact[i] - parts[i]), i))
    for i in by_remainder[: spare - sum(parts.values())]:
        parts[i] += 1
    return [minimum if i in clamped else parts[i] for i in range(count)]


def plan_batch_sizes(
    global_batch: int,
    speeds: Sequence[float],
    min_share: float,
    current: Sequence[int] | None = None,
    tolerance: float = 0.0,
) -> list[int]:
    """Per-rank batch sizes that sum to `global_batch`, proportional to `speeds` (samples per second).

    Each rank gets at least `min_share` of the global batch (and at least one sample), so a rank that
    measured slow once can still show it recovered. If every rank's proposed share is within `tolerance`
    (relative) of its current share, the current plan is kept, so shares do not oscillate with noise.
    """
    minimum = max(1, int(min_share * global_batch))
    proposed = split_by_weight(global_batch, speeds, minimum)
    comparable = current is not None and len(current) == len(proposed) and sum(current) == global_batch
    if comparable and all(abs(p - c) <= tolerance * c for p, c in zip(proposed, current or [], strict=True)):
        return list(current or [])
    return proposed


def smoothed(previous: float | None, measured: float, smoothing: float) -> float:
    """Exponential moving average: `smoothing` of the old value, the rest from the new measurement."""
    return measured if previous is None else smoothing * previous + (1 - smoothing) * measured

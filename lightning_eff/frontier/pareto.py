"""Pareto-optimal points: the trials no other trial beats on every objective at once."""

from __future__ import annotations

from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """Whether `a` is at least as good as `b` on every objective and better on one."""
    signs = [1.0 if direction == "minimize" else -1.0 for direction in directions]
    at_least = all(sign * x <= sign * y for x, y, sign in zip(a, b, signs, strict=True))
    better = any(sign * x < sign * y for x, y, sign in zip(a, b, signs, strict=True))
    return at_least and better


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the points that no other point dominates, in their original order.

    Equal points are all kept: two trials that scored the same are both on the front.
    """
    return [
        i
        for i, point in enumerate(points)
        if not any(dominates(other, point, directions) for j, other in enumerate(points) if j != i)
    ]

"""ThroughputBalancer and CostBalancer: what the strategy asks each step, and the state a resume restores."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from lightning_eff.balancing.planner import plan_batch_sizes, smoothed, split_by_weight
from lightning_eff.balancing.sampler import BatchPlan
from lightning_eff.validation import ConfigError, check, check_fraction, check_int

COSTS = ("tokens", "samples")


class CostBalancer:
    """Splits each global batch so that every rank's total cost, divided by its speed, is as equal as possible.

    For variable-length samples an equal sample count is not equal work. Alone it assumes equal speeds;
    inside `ThroughputBalancer(cost=CostBalancer(...))` it uses the measured ones.

    Args:
        cost: ``"tokens"`` (the length of a sample's first tensor, padding excluded when the dataset pads
            per batch) or a function ``cost_fn(sample) -> float``.
    """

    def __init__(self, cost: str | Callable[[Any], float] = "tokens") -> None:
        if isinstance(cost, str):
            check(cost in COSTS, "cost", cost, f"must be one of {', '.join(COSTS)} or a function of a sample")
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
    """Sizes each rank's share of the global batch to its measured compute speed.

    Speed is samples per second of forward and backward work, excluding time spent waiting in collectives,
    so a rank that waits for a slow peer does not look slow itself. Every `replan_every` optimizer steps the
    ranks exchange their speeds and all compute the same new plan.

    Args:
        replan_every: optimizer steps between re-plans.
        smoothing: weight of the previous speed estimate in the moving average, in [0, 1).
        min_share: smallest share of the global batch a rank gets, in (0, 1/world_size).
        tolerance: keep the current plan unless some rank's share would change by more than this (relative).
        cost: also balance the cost of variable-length samples (`CostBalancer`).
    """

    def __init__(
        self,
        replan_every: int = 50,
        smoothing: float = 0.8,
        min_share: float = 0.05,
        tolerance: float = 0.05,
        cost: CostBalancer | None = None,
    ) -> None:
        check_int("replan_every", replan_every, 1)
        check_fraction("smoothing", smoothing, low_open=False)
        check_fraction("min_share", min_share)
        check_fraction("tolerance", tolerance, low_open=False)
        self.replan_every = replan_every
        self.smoothing = smoothing
        self.min_share = min_share
        self.tolerance = tolerance
        self.cost = cost
        self.plan = BatchPlan(batch_sizes=[])
        self.speeds: list[float] = []
        self.history: list[dict[str, Any]] = []
        self._samples = 0
        self._busy_seconds = 0.0
        self._last_replan = 0

    # --- set-up ---------------------------------------------------------------------------------------

    def setup(self, global_batch_size: int, world_size: int) -> BatchPlan:
        """The plan for a run: restored from a checkpoint, or equal shares."""
        check(self.min_share < 1 / world_size, "min_share", self.min_share,
              f"must be < 1/world_size = {1 / world_size:.3g}")  # fmt: skip
        if len(self.plan.batch_sizes) != world_size or sum(self.plan.batch_sizes) != global_batch_size:
            self.plan.batch_sizes = split_by_weight(global_batch_size, [1.0] * world_size, minimum=1)
            self.plan.speeds = [1.0] * world_size
        return self.plan

    # --- measuring and re-planning --------------------------------------------------------------------

    def record(self, samples: int, busy_seconds: float) -> None:
        """This rank's work in one optimizer step: samples trained and seconds of compute."""
        self._samples += samples
        self._busy_seconds += busy_seconds

    def maybe_replan(self, step: int, device: torch.device) -> bool:
        """At every `replan_every`-th step, exchange speeds and re-plan; the same on every rank (collective)."""
        if step == 0 or step % self.replan_every or step == self._last_replan:
            return False
        self._last_replan = step
        local = torch.tensor([float(self._samples), self._busy_seconds], dtype=torch.float64, device=device)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        gathered = [torch.zeros_like(local) for _ in range(world)]
        if world > 1:
            dist.all_gather(gathered, local)
        else:
            gathered = [local]
        samples = [float(t[0]) for t in gathered]
        busy = [float(t[1]) for t in gathered]
        self._samples, self._busy_seconds = 0, 0.0
        measured = [s / b if b > 0 else 0.0 for s, b in zip(samples, busy, strict=True)]
        if not all(speed > 0 for speed in measured):
            return False
        previous = self.speeds if len(self.speeds) == world else [None] * world
        self.speeds = [smoothed(p, m, self.smoothing) for p, m in zip(previous, measured, strict=True)]
        global_batch = sum(self.plan.batch_sizes)
        old = list(self.plan.batch_sizes)
        self.plan.batch_sizes = plan_batch_sizes(global_batch, self.speeds, self.min_share, old, self.tolerance)
        self.plan.speeds = list(self.speeds)
        slowest = max(busy)
        self.history.append(
            {
                "step": step,
                "batch_sizes": list(self.plan.batch_sizes),
                "speeds": list(self.speeds),
                "busy_seconds": busy,
                "idle_fraction": [1 - b / slowest if slowest > 0 else 0.0 for b in busy],
            }
        )
        return self.plan.batch_sizes != old

    # --- what a user reads ----------------------------------------------------------------------------

    def stats(self) -> dict[str, list[float]]:
        """Per-rank share, speed (samples/s of compute) and idle fraction over the last re-plan window."""
        last = self.history[-1] if self.history else {}
        return {
            "share": self.plan.shares() if self.plan.batch_sizes else [],
            "speed": list(self.speeds),
            "idle_fraction": list(last.get("idle_fraction", [])),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "batch_sizes": list(self.plan.batch_sizes),
            "speeds": list(self.speeds),
            "history": list(self.history),
            "last_replan": self._last_replan,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plan.batch_sizes = list(state["batch_sizes"])
        self.speeds = list(state["speeds"])
        self.plan.speeds = list(self.speeds) or [1.0] * len(self.plan.batch_sizes)
        self.history = list(state["history"])
        self._last_replan = int(state["last_replan"])


def require_balancer(value: Any) -> ThroughputBalancer | None:
    """A `CostBalancer` alone becomes a balancer that never re-plans but assigns by cost; None stays None."""
    if value is None or isinstance(value, ThroughputBalancer):
        return value
    if isinstance(value, CostBalancer):
        return ThroughputBalancer(replan_every=2**62, cost=value)
    raise ConfigError("balancer", type(value).__name__, "must be a ThroughputBalancer or a CostBalancer")

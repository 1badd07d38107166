"""Sparsity as a pure function of the optimizer step.

Because the schedule depends on nothing but the step, a resumed run lands on exactly the sparsity the
uninterrupted run had at that step (Lightning's ModelPruning applies an `amount` to the weights still
unpruned, so a resumed run drifts to a different final sparsity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("cubic", "linear", "exponential", "one_shot")


@dataclass(frozen=True)
class SparsitySchedule:
    """When and how far to prune.

    Sparsity is 0 before `start_step`, `initial_sparsity` at it, and `target_sparsity` from `end_step` on.
    Between them it changes only every `update_every` steps (and at `end_step`), following `kind`:

    - ``cubic`` (Zhu & Gupta 2017): s = s_f + (s_i - s_f) (1 - progress)^3, prunes fast early, slowly late;
    - ``linear``: s = s_i + (s_f - s_i) progress;
    - ``exponential``: the fraction of remaining weights pruned per update is constant;
    - ``one_shot``: the target at `start_step`.
    """

    target_sparsity: float
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int = 1000
    update_every: int = 100
    kind: str = "cubic"

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule={self.kind!r}: must be one of {', '.join(SCHEDULES)}")
        if not 0 <= self.initial_sparsity <= self.target_sparsity < 1:
            raise ValueError("need 0 <= initial_sparsity <= target_sparsity < 1")
        if self.end_step <= self.start_step and self.kind != "one_shot":
            raise ValueError(f"end_step={self.end_step} must be > start_step={self.start_step}")
        if self.update_every < 1:
            raise ValueError(f"update_every={self.update_every} must be >= 1")

    def last_update_step(self, step: int) -> int | None:
        """The most recent step <= `step` at which the sparsity changed, or None before `start_step`."""
        if step < self.start_step:
            return None
        if self.kind == "one_shot" or step >= self.end_step:
            return self.start_step if self.kind == "one_shot" else self.end_step
        return self.start_step + (step - self.start_step) // self.update_every * self.update_every

    def sparsity_at(self, step: int) -> float:
        """The sparsity the targeted weights should have after optimizer step `step`."""
        update = self.last_update_step(step)
        if update is None:
            return 0.0
        if self.kind == "one_shot":
            return self.target_sparsity
        progress = (update - self.start_step) / (self.end_step - self.start_step)
        start, target = self.initial_sparsity, self.target_sparsity
        if self.kind == "linear":
            return start + (target - start) * progress
        if self.kind == "cubic":
            return target + (start - target) * (1.0 - progress) ** 3
        # exponential: remaining density decays geometrically from (1 - start) to (1 - target)
        return 1.0 - (1.0 - start) * math.exp(progress * math.log((1.0 - target) / (1.0 - start)))

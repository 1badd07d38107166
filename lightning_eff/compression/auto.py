"""`Auto`: times a dense allreduce against a candidate compressor for a few steps, then keeps the faster one.

The timing policy (probe windows, the slowest rank's median step time, the margin) lives here with `_median`.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_eff.compression.base import Compressor, Dense
from lightning_eff.compression.local_sgd import LocalSGD
from lightning_eff.compression.powersgd import PowerSGD
from lightning_eff.compression.transport import BucketLayout, Collectives, synchronize
from lightning_eff.validation import check, check_int, check_number

log = logging.getLogger(__name__)


def _median(seconds: list[float]) -> float:
    return statistics.median(seconds) if seconds else math.inf


@dataclass(eq=False)
class Auto(Compressor):
    """Compression only where it pays: times a dense allreduce and `candidate`, then keeps the faster for good.

    For `probe_steps` steps each it times this rank's work inside the hook (communication plus compression, the
    device synchronized) with a dense allreduce and then with the candidate. Ranks agree on the slowest rank's
    median step time, and the candidate is kept only if it is faster by more than `margin`. Until then it sends
    dense. The candidate probe starts no earlier than the candidate's `compress_from`, so PowerSGD's dense warm-up
    is never mistaken for compression, and step 0 (DDP's bucket rebuild, first allocations) is never timed.
    The decision and the measurements are state, so a resumed run keeps its choice. Dropping the candidate drops
    what its error feedback still held: one probe's worth of gradient, once.

    Args:
        candidate: the compressor to try; default ``PowerSGD()``.
        probe_steps: steps timed for each of dense and candidate, >= 1.
        margin: the relative speed-up the candidate must beat, in [0, 1).

    Example::

        Auto(candidate=PowerSGD(rank=4, start_step=100), probe_steps=20)  # decides at step 120
    """

    name: ClassVar[str] = "auto"
    candidate: Compressor = field(default_factory=PowerSGD)
    probe_steps: int = 20
    margin: float = 0.05
    decision: str = field(default="undecided", init=False)
    measured_seconds: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    dense_seconds: list[float] = field(default_factory=list, init=False, repr=False)
    candidate_seconds: list[float] = field(default_factory=list, init=False, repr=False)
    dense: Dense = field(default_factory=Dense, init=False, repr=False)

    def __post_init__(self) -> None:
        check(
            isinstance(self.candidate, Compressor) and not isinstance(self.candidate, (Auto, LocalSGD)),
            "candidate",
            self.candidate,
            "must be a compressor other than Auto or LocalSGD (which averages parameters, not buckets), e.g. "
            "PowerSGD(rank=4)",
        )
        check_int("probe_steps", self.probe_steps, 1)
        check_number("margin", self.margin, "must be in [0, 1)", lambda margin: 0 <= margin < 1)

    @property
    def probe_start(self) -> int:
        """The first (dense) probe step."""
        return max(1, self.candidate.compress_from - self.probe_steps)

    @property
    def decide_step(self) -> int:
        """The step whose first bucket settles the decision."""
        return self.probe_start + 2 * self.probe_steps

    def needs_finite_input(self, step: int) -> bool:
        return False  # the compressor it hands the bucket to guards itself

    def compressed_mean(self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int) -> Tensor:
        if self.decision == "undecided" and step >= self.decide_step:
            self._decide(comm)
        if self.decision != "undecided":
            winner = self.candidate if self.decision == "candidate" else self.dense
            return winner.allreduce_mean(buffer, layout, comm, step)
        if step < self.probe_start:
            return self.dense.allreduce_mean(buffer, layout, comm, step)
        candidate_start = self.probe_start + self.probe_steps
        compressor: Compressor
        if step < candidate_start:
            compressor, seconds, slot = self.dense, self.dense_seconds, step - self.probe_start
        else:
            compressor, seconds, slot = self.candidate, self.candidate_seconds, step - candidate_start
        synchronize(buffer)
        start = time.perf_counter()
        result = compressor.allreduce_mean(buffer, layout, comm, step)
        synchronize(result)
        seconds.extend([0.0] * (slot + 1 - len(seconds)))
        seconds[slot] += time.perf_counter() - start
        return result

    def _decide(self, comm: Collectives) -> None:
        medians = torch.tensor([_median(self.dense_seconds), _median(self.candidate_seconds)], dtype=torch.float64)
        dense_seconds, candidate_seconds = comm.all_reduce(medians, dist.ReduceOp.MAX).tolist()
        self.measured_seconds = {"dense": dense_seconds, "candidate": candidate_seconds}
        self.decision = "candidate" if candidate_seconds < dense_seconds * (1 - self.margin) else "dense"
        log.info(
            "Auto compression: dense %.3f ms/step, %s %.3f ms/step -> %s",
            dense_seconds * 1e3,
            self.candidate.name,
            candidate_seconds * 1e3,
            self.decision,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "decision": self.decision,
            "measured_seconds": dict(self.measured_seconds),
            "dense_seconds": list(self.dense_seconds),
            "candidate_seconds": list(self.candidate_seconds),
            "candidate": self.candidate.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.decision = state["decision"]
        self.measured_seconds = dict(state["measured_seconds"])
        self.dense_seconds = list(state["dense_seconds"])
        self.candidate_seconds = list(state["candidate_seconds"])
        self.candidate.load_state_dict(state["candidate"])

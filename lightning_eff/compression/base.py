"""The `Compressor` interface, and `Dense`, the plain allreduce mean it is measured against.

A compressor performs the whole averaging of one DDP gradient bucket across ranks: it is handed the bucket's flat
buffer, its `BucketLayout` (which parameter lies where) and a `Collectives` object (its only way to talk to other
ranks), and returns the average over ranks, identical on every rank.

A compressor whose `overlaps` is true also has an asynchronous form, `allreduce_mean_async`: it starts its
collectives (`async_op=True`) and returns a future whose stages follow one another with `Collectives.then`, so the
hook returns at once and the backward pass goes on while the bucket travels. Both forms run the same stages in the
same order, so their results and bytes are identical; the others run synchronously inside the hook.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_eff.compression.transport import BucketLayout, Collectives
from lightning_eff.validation import check_bool as check_bool  # the compressors' bool check, shared


class Compressor(ABC):
    """One way of averaging a gradient bucket across ranks; subclasses send fewer bytes than a dense allreduce.

    Subclasses implement `compressed_mean`; `allreduce_mean` wraps it with the non-finite guard. Those that set
    `overlaps` also implement `compressed_mean_async`, which `allreduce_mean_async` wraps with the same guard.
    """

    name: ClassVar[str]
    overlaps: ClassVar[bool] = False  # has an asynchronous form (`compressed_mean_async`)

    @property
    def compress_from(self) -> int:
        """The first step at which this compressor compresses (earlier steps go dense)."""
        return 0

    def needs_finite_input(self, step: int) -> bool:
        """Whether inf/NaN at this step would corrupt its state or its arithmetic (then the bucket goes dense)."""
        return True

    def allreduce_mean(self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int) -> Tensor:
        """The average of `buffer` over ranks (same shape and dtype), identical on every rank; may reuse `buffer`.

        A bucket with inf/NaN on any rank is sent dense and leaves the state alone: one bad step (say an fp16
        overflow that a GradScaler will skip) must not poison error feedback for the rest of the run.
        `comm.nonfinite` tells the caller that happened.
        """
        if self.needs_finite_input(step) and not comm.all_finite(buffer):
            comm.nonfinite = True
            return comm.mean(buffer)
        return self.compressed_mean(buffer, layout, comm, step)

    def allreduce_mean_async(
        self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int
    ) -> torch.futures.Future[Tensor]:
        """`allreduce_mean` as a future: started here, finished by stages that follow its collectives.

        The non-finite guard is the same 4-byte MAX allreduce, awaited before anything else is sent, so the bytes,
        the state and the result are those of `allreduce_mean`; only the waiting moves off the backward pass.
        Without an asynchronous form (`overlaps` false) this runs `allreduce_mean` and returns its result done.
        """
        if not self.overlaps:
            return comm.completed(self.allreduce_mean(buffer, layout, comm, step))
        if not self.needs_finite_input(step):
            return self.compressed_mean_async(buffer, layout, comm, step)

        def guarded(finite: bool) -> torch.futures.Future[Tensor]:
            if finite:
                return self.compressed_mean_async(buffer, layout, comm, step)
            comm.nonfinite = True
            return comm.mean_async(buffer)

        return comm.then(comm.all_finite_async(buffer), guarded)

    @abstractmethod
    def compressed_mean(self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int) -> Tensor:
        """The averaged bucket, for a finite `buffer`."""

    def compressed_mean_async(
        self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int
    ) -> torch.futures.Future[Tensor]:
        """`compressed_mean` as a future, for compressors that set `overlaps`."""
        raise NotImplementedError(f"{type(self).__name__} has no asynchronous form (overlaps is false)")

    def state_dict(self) -> dict[str, Any]:
        """This rank's state (tensors on CPU); ranks differ, so each rank's must be saved."""
        return {"name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"compression state was saved by {state.get('name')!r}, this compressor is {self.name!r}")


@dataclass(eq=False)
class Dense(Compressor):
    """Plain allreduce mean: the reference that compressors are measured against, and `Auto`'s fallback."""

    name: ClassVar[str] = "dense"
    overlaps: ClassVar[bool] = True

    def needs_finite_input(self, step: int) -> bool:
        return False

    def compressed_mean(self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int) -> Tensor:
        return comm.mean(buffer)

    def compressed_mean_async(
        self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int
    ) -> torch.futures.Future[Tensor]:
        return comm.mean_async(buffer)

"""`PowerSGD`: a low-rank approximation of each gradient matrix by one power iteration per step, with error feedback."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_eff.compression.base import check_bool
from lightning_eff.compression.error_feedback import ErrorFeedback
from lightning_eff.compression.transport import BucketLayout, Collectives, PerParameterState, shared_seed
from lightning_eff.validation import check, check_int


@dataclass(eq=False)
class _Round:
    """One bucket's power iteration between its two collectives."""

    buffer: Tensor
    dense: list[Tensor]  # views of the gradients sent dense
    matrices: list[tuple[str, Tensor, Tensor]]  # name, gradient view, float32 matrix + residual
    p_shapes: list[torch.Size]
    first: Tensor  # the first collective's payload: dense elements / world_size, then every P
    ps: list[Tensor] = field(default_factory=list)  # the orthonormalized Ps, once the first collective is in


@dataclass(eq=False)
class PowerSGD(ErrorFeedback):
    """Rank-`rank` approximation of each gradient matrix by power iteration (Vogels et al., 2019).

    Each gradient of dim >= 2 is a (rows, cols) matrix M; where rank x (rows + cols) < rows x cols, P = M Q is
    allreduced (together with the bucket's other, dense, elements), orthonormalized (QR, float32), Q = M^T P is
    allreduced, and the average is approximated by P Q^T / world_size. Steps before `start_step` are dense.
    Its asynchronous form chains the two collectives as futures (as torch's `powerSGD_hook` does), so they
    overlap with the backward pass; the synchronous form runs the same stages, so both give identical results.

    Args:
        rank: rank of the approximation; bytes per matrix are rank x (rows + cols).
        start_step: first compressed step; >= 2 with error feedback (torch's rule: the first steps run dense).
        error_feedback: carry M - P Q^T into the next step.
        warm_start: reuse last step's Q (one power iteration per step refines it); else a fresh random Q.
        seed: seed of the random initial Q, identical on every rank.
    """

    name: ClassVar[str] = "powersgd"
    overlaps: ClassVar[bool] = True
    rank: int = 4
    start_step: int = 100
    error_feedback: bool = True
    warm_start: bool = True
    seed: int = 0
    residuals: PerParameterState = field(default_factory=PerParameterState, init=False, repr=False)
    qs: PerParameterState = field(default_factory=PerParameterState, init=False, repr=False)

    def __post_init__(self) -> None:
        check_int("rank", self.rank, 1)
        check_int("start_step", self.start_step, 0)
        check_bool("error_feedback", self.error_feedback)
        check_bool("warm_start", self.warm_start)
        check_int("seed", self.seed, 0)
        check(
            self.start_step >= 2 or not self.error_feedback,
            "start_step",
            self.start_step,
            "must be >= 2 with error_feedback=true (the first steps run dense, as in torch's PowerSGD)",
        )

    @property
    def compress_from(self) -> int:
        return self.start_step

    def needs_finite_input(self, step: int) -> bool:
        return step >= self.start_step

    def compresses(self, shape: Sequence[int]) -> bool:
        """Whether a gradient of this shape is sent as P and Q (else it goes dense)."""
        if len(shape) < 2:
            return False
        rows = shape[0]
        cols = math.prod(shape) // rows
        return self.rank * (rows + cols) < rows * cols

    def compressed_mean(self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int) -> Tensor:
        if step < self.start_step:
            return comm.mean(buffer)
        work = self._project_p(buffer, layout, comm, step)
        second = self._project_q(work, comm.all_reduce(work.first), comm)
        if second is None:
            return buffer
        return self._decompress(work, comm.all_reduce(second), comm)

    def compressed_mean_async(
        self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int
    ) -> torch.futures.Future[Tensor]:
        if step < self.start_step:
            return comm.mean_async(buffer)
        work = self._project_p(buffer, layout, comm, step)

        def after_p(first: Tensor) -> torch.futures.Future[Tensor]:
            second = self._project_q(work, first, comm)
            if second is None:
                return comm.completed(buffer)
            return comm.then(comm.all_reduce_async(second), lambda q: comm.completed(self._decompress(work, q, comm)))

        return comm.then(comm.all_reduce_async(work.first), after_p)

    def _project_p(self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int) -> _Round:
        """P = M Q for every compressed matrix, and the first collective's payload: dense elements, then the Ps."""
        dense: list[Tensor] = []
        matrices: list[tuple[str, Tensor, Tensor]] = []
        for name, grad in zip(layout.names, layout.split(buffer), strict=True):
            if self.compresses(grad.shape):
                matrices.append((name, grad, self._matrix(name, grad)))
            else:
                dense.append(grad)
        ps = [matrix @ self._q(name, matrix, step) for name, _, matrix in matrices]
        # One collective carries the dense elements and every P: two collectives per bucket, not three.
        first = torch.cat(
            [grad.reshape(-1) / comm.world_size for grad in dense] + [p.reshape(-1).to(buffer.dtype) for p in ps]
        )
        return _Round(buffer, dense, matrices, [p.shape for p in ps], first)

    def _project_q(self, work: _Round, first: Tensor, comm: Collectives) -> Tensor | None:
        """Dense elements into place, the summed Ps orthonormalized, Q = M^T P: the second payload (None: no
        matrix in this bucket)."""
        dense_numel = sum(grad.numel() for grad in work.dense)
        dense_part, p_part = first.split([dense_numel, first.numel() - dense_numel])
        for grad, piece in zip(work.dense, dense_part.split([grad.numel() for grad in work.dense]), strict=True):
            grad.copy_(piece.view(grad.shape))
        if not work.matrices:
            return None
        work.ps = [
            torch.linalg.qr(piece.view(shape).to(torch.float32)).Q
            for piece, shape in zip(
                p_part.split([math.prod(shape) for shape in work.p_shapes]), work.p_shapes, strict=True
            )
        ]
        qs = [matrix.T @ p for (_, _, matrix), p in zip(work.matrices, work.ps, strict=True)]
        return torch.cat([q.reshape(-1).to(work.buffer.dtype) for q in qs])

    def _decompress(self, work: _Round, second: Tensor, comm: Collectives) -> Tensor:
        """P Q^T / world_size into the bucket; Q (warm start) and the residual M - P Q^T kept."""
        sizes = [matrix.shape[1] * p.shape[1] for (_, _, matrix), p in zip(work.matrices, work.ps, strict=True)]
        for (name, grad, matrix), p, piece in zip(work.matrices, work.ps, second.split(sizes), strict=True):
            q = piece.view(matrix.shape[1], -1).to(torch.float32).div_(comm.world_size)
            approximation = p @ q.T
            if self.warm_start:
                self.qs.put(name, q)
            self._keep_residual(name, matrix.sub_(approximation))
            grad.copy_(approximation.view(grad.shape))
        return work.buffer

    def _matrix(self, name: str, grad: Tensor) -> Tensor:
        """The gradient as a float32 (rows, cols) matrix, plus this rank's residual."""
        return self._add_residual(name, grad.reshape(grad.shape[0], -1).to(torch.float32, copy=True))

    def _q(self, name: str, matrix: Tensor, step: int) -> Tensor:
        """The Q to multiply with: last step's (warm start) or a fresh random one, the same on every rank."""
        cols = matrix.shape[1]
        if self.warm_start:
            q = self.qs.get(name, matrix.device, torch.float32, (cols, self.rank))
            if q is not None:
                return q
        generator = torch.Generator().manual_seed(shared_seed(self.seed, name, step if not self.warm_start else 0))
        return torch.randn(cols, self.rank, generator=generator).to(matrix.device)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "q": self.qs.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.qs.load_state_dict(state["q"])

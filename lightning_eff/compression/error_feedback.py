"""Error feedback shared by the lossy compressors: add last step's residual, keep this step's, save and load them.

A residual is what this rank's input held that its contribution did not (residual = input - contributed); carried
into the next step, nothing is lost for good, only delayed. Residuals are float32 and kept per parameter name, in
the shape the compressor works in: the parameter's own for Int8 and TopK, PowerSGD's (rows, cols) matrix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_eff.compression.base import Compressor
from lightning_eff.compression.transport import BucketLayout, PerParameterState


class ErrorFeedback(Compressor):
    """A compressor that can carry what it did not send into the next step (residual = input - contributed)."""

    error_feedback: bool
    residuals: PerParameterState

    def _add_residual(self, name: str, tensor: Tensor) -> Tensor:
        """`tensor` (float32) plus this rank's residual for `name`, added in place."""
        if self.error_feedback:
            residual = self.residuals.get(name, tensor.device, tensor.dtype, tensor.shape)
            if residual is not None:
                tensor.add_(residual)
        return tensor

    def _keep_residual(self, name: str, residual: Tensor) -> None:
        """Keep `residual` (float32) for `name`'s next step."""
        if self.error_feedback:
            self.residuals.put(name, residual)

    def _with_residuals(self, buffer: Tensor, layout: BucketLayout) -> Tensor:
        """A float32 copy of `buffer` plus this rank's residuals."""
        corrected = buffer.to(torch.float32, copy=True)
        for name, view in zip(layout.names, layout.split(corrected), strict=True):
            self._add_residual(name, view)
        return corrected

    def _keep_residuals(self, residual: Tensor, layout: BucketLayout) -> None:
        """Keep each parameter's part of the bucket-shaped `residual` (views of it, not copies)."""
        for name, view in zip(layout.names, layout.split(residual), strict=True):
            self._keep_residual(name, view)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "residuals": self.residuals.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.residuals.load_state_dict(state["residuals"])

"""The one way a callback adds a term to the training loss (distillation, regularizers, auxiliary losses).

A callback implements `LossContributor` and calls `attach_loss_terms(trainer)` in its `setup`. From then on,
every training step adds the sum of every contributor's `loss_term` to the loss:

- automatic optimization: to the loss that `training_step` returns (a tensor, or a dict's ``"loss"``), before
  Lightning divides it for gradient accumulation and before the strategy's `backward` (where
  `EfficientDDPStrategy`'s balancer weights it per rank), so a term is treated exactly like the module's own
  loss; a step that returns None stays skipped;
- manual optimization: to the loss of the first `manual_backward` call of each `training_step` (once per step,
  so a second backward, say a GAN's other network, is left alone).

Why wrap the strategy's `training_step` and `backward` (instance attributes, which Lightning's loops look up
on `trainer.strategy`): it works with every strategy and loop and leaves the user's module untouched, so a
deep copy of the module (QAT's conversion, an export) carries nothing of the trainer. The term is computed in
the precision plugin's step context (autocast under mixed precision) after the module's forward; a term made
from a frozen model held outside the module tree (a teacher) never trips DDP's unused-parameter check.
`loss_term` may call `pl_module.log`: it runs inside Lightning's `training_step` hook. `detach_loss_terms`
(call it in `teardown`) restores the strategy's own methods.

Example::

    class L2Penalty(L.Callback):
        def setup(self, trainer, pl_module, stage):
            attach_loss_terms(trainer)

        def loss_term(self, trainer, pl_module, batch, batch_idx):
            return 1e-4 * sum(p.pow(2).sum() for p in pl_module.parameters())

        def teardown(self, trainer, pl_module, stage):
            detach_loss_terms(trainer)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import lightning as L
from torch import Tensor

_ROUTER = "_lightning_eff_loss_terms"


@runtime_checkable
class LossContributor(Protocol):
    """A callback that adds a term to every training step's loss (see the module docstring)."""

    def loss_term(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> Tensor | None:
        """The term to add for this batch (None: nothing this step). Called after the module's forward."""
        ...


class _LossTermRouter:
    """Wraps one strategy's `training_step` and `backward` to add the contributors' terms."""

    def __init__(self, trainer: L.Trainer) -> None:
        self.trainer = trainer
        strategy = trainer.strategy
        self.originals = {name: strategy.__dict__.get(name) for name in ("training_step", "backward")}
        self.training_step: Callable[..., Any] = strategy.training_step
        self.backward: Callable[..., Any] = strategy.backward
        self._batch: tuple[Any, int] | None = None  # the running training_step's batch until its terms are added

    def wrapped_training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs.get("batch")
        batch_idx = args[1] if len(args) > 1 else kwargs.get("batch_idx", 0)
        self._batch = (batch, int(batch_idx))
        try:
            output = self.training_step(*args, **kwargs)
            if self._batch is None or not self.trainer.lightning_module.automatic_optimization:
                return output
            if isinstance(output, Tensor):
                return output + self._terms(output)
            if isinstance(output, dict) and isinstance(output.get("loss"), Tensor):
                return {**output, "loss": output["loss"] + self._terms(output["loss"])}
            return output  # None skips the step; anything else Lightning itself rejects
        finally:
            self._batch = None

    def wrapped_backward(self, closure_loss: Tensor, *args: Any, **kwargs: Any) -> Any:
        if self._batch is not None:  # inside training_step: manual optimization's manual_backward
            closure_loss = closure_loss + self._terms(closure_loss)
        return self.backward(closure_loss, *args, **kwargs)

    def _terms(self, loss: Tensor) -> Tensor | float:
        """The sum of every contributor's term for the running step (once per step)."""
        assert self._batch is not None
        batch, batch_idx = self._batch
        self._batch = None
        pl_module = self.trainer.lightning_module
        total: Tensor | float = 0.0
        with self.trainer.strategy.precision_plugin.train_step_context():
            for callback in self.trainer.callbacks:  # type: ignore[attr-defined]
                if isinstance(callback, LossContributor):
                    term = callback.loss_term(self.trainer, pl_module, batch, batch_idx)
                    if term is not None:
                        total = total + term.to(loss.dtype)
        return total


def attach_loss_terms(trainer: L.Trainer) -> None:
    """Route the trainer's training steps through its `LossContributor` callbacks (idempotent)."""
    strategy = trainer.strategy
    if _ROUTER in strategy.__dict__:
        return
    router = _LossTermRouter(trainer)
    strategy.__dict__[_ROUTER] = router
    strategy.__dict__["training_step"] = router.wrapped_training_step
    strategy.__dict__["backward"] = router.wrapped_backward


def detach_loss_terms(trainer: L.Trainer) -> None:
    """Undo `attach_loss_terms` (a no-op if it was not attached)."""
    strategy = trainer.strategy
    router = strategy.__dict__.pop(_ROUTER, None)
    if router is None:
        return
    for name, original in router.originals.items():
        if original is None:
            strategy.__dict__.pop(name, None)
        else:
            strategy.__dict__[name] = original

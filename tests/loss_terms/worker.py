"""A 2-process Lightning DDP run with a batch-dependent penalty added by a callback or by the module itself.

Run as `python -m tests.loss_terms.worker OUT VARIANT ACCUMULATE`; Lightning re-launches it once per
rank. Each rank writes `OUT/rank<r>.json` with its final weights and the batch sizes it trained on.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_eff import EfficientDDPStrategy
from lightning_eff.balancing import ThroughputBalancer
from lightning_eff.distributed import destroy_process_group_at_exit
from lightning_eff.loss_terms import attach_loss_terms, detach_loss_terms
from lightning_eff.tasks import DigitsDataModule

PENALTY = 0.5


def penalty(module: LinearDigits, features: Tensor) -> Tensor:
    """A term that depends on the rank's own batch, so it matters whether it is weighted with the loss."""
    return PENALTY * module.linear(features.flatten(1)).pow(2).mean()


class LinearDigits(L.LightningModule):
    """Softmax regression on the digits; `own_penalty` adds the L2 term inside training_step."""

    def __init__(self, own_penalty: bool) -> None:
        super().__init__()
        self.own_penalty = own_penalty
        self.linear = nn.Linear(64, 10)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        features, labels = batch
        loss = nn.functional.cross_entropy(self.linear(features.flatten(1)), labels)
        return loss + penalty(self, features) if self.own_penalty else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PenaltyTerm(L.Callback):
    """The same L2 term, through the loss extension point."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        attach_loss_terms(trainer)

    def loss_term(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> Tensor:
        assert isinstance(pl_module, LinearDigits)
        return penalty(pl_module, batch[0])

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        detach_loss_terms(trainer)


class BatchSizes(L.Callback):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.sizes.append(len(args[1][1]))


def main() -> None:
    out, variant, accumulate = sys.argv[1], sys.argv[2], int(sys.argv[3])
    destroy_process_group_at_exit()
    L.seed_everything(0, verbose=False)
    # A fixed unequal plan (never re-planned): the balancer weights each rank's loss by its sample count.
    balancer = ThroughputBalancer(replan_every=10**9)
    balancer.load_state_dict(
        {"batch_sizes": [40, 24], "speeds": [2.0, 1.0], "fixed_seconds": [0.0, 0.0], "history": [], "last_replan": 0}
    )
    sizes = BatchSizes()
    callbacks: list[L.Callback] = [sizes] + ([PenaltyTerm()] if variant == "callback" else [])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=EfficientDDPStrategy(balancer=balancer),
        max_steps=6,
        accumulate_grad_batches=accumulate,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = LinearDigits(own_penalty=variant == "module")
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    result = {"weights": [float(x) for p in model.parameters() for x in p.detach().flatten()], "sizes": sizes.sizes}
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()

"""2-process DDP with every capability, where rank 1's loss is NaN for a few steps.

Run as `python -m tests.faults.nonfinite_worker OUT`; Lightning re-launches it for rank 1. The module skips an
optimizer step whose gradients are not finite, as a GradScaler would; everything else is left to Lightning.
Each rank writes `OUT/rank<r>.pt` with what the test checks.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_eff import EfficientDDPStrategy, GradualPruning
from lightning_eff.balancing import ThroughputBalancer
from lightning_eff.compression import NonFiniteGradientWarning, PowerSGD
from lightning_eff.distributed import destroy_process_group_at_exit
from lightning_eff.tasks import DigitsDataModule, DigitsMLP

POISONED_STEPS = range(4, 8)


class NaNOnRank1(DigitsMLP):
    def __init__(self, hidden_sizes: list[int]) -> None:
        super().__init__(hidden_sizes=hidden_sizes)
        self.skipped_steps: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.global_rank == 1 and self.trainer.global_step in POISONED_STEPS:
            loss = loss * float("nan")
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        optimizer_closure()  # forward and backward (DDP's allreduce spreads the NaN to every rank)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if all(torch.isfinite(g).all() for g in grads):
            optimizer.step()
        else:
            self.skipped_steps.append(self.trainer.global_step)


def main() -> None:
    out = sys.argv[1]
    destroy_process_group_at_exit()
    L.seed_everything(0, verbose=False)
    pruning = GradualPruning(target_sparsity=0.5, update_every=2, end_step=12)
    strategy = EfficientDDPStrategy(
        compression=PowerSGD(rank=2, start_step=2), balancer=ThroughputBalancer(replan_every=3, warmup_steps=0)
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=16,
        callbacks=[pruning],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = NaNOnRank1(hidden_sizes=[64])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NonFiniteGradientWarning)
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    assert strategy.communication is not None and strategy.communication.hook is not None
    result = {
        "skipped_steps": list(model.skipped_steps),
        "weights_finite": all(torch.isfinite(p).all().item() for p in model.parameters()),
        "compressor_state": strategy.communication.hook.state_dict()["compressor"],
        "nonfinite_buckets": strategy.compression_stats.total.nonfinite_buckets,
        "nonfinite_warnings": sum(issubclass(w.category, NonFiniteGradientWarning) for w in caught),
        "balance": strategy.balance_stats,
        "replans": len(strategy.balancer.history) if strategy.balancer is not None else 0,
        "sparsity": pruning.sparsity,
        "masks": pruning.masks,
        "train_loss": float(trainer.callback_metrics["train_loss"]),
    }
    torch.save(result, f"{out}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()

"""Adding lightning_eff to an existing Lightning script: the only lines that change are the Trainer's.

This is a plain Lightning script with its own model and data (scikit-learn's digits). lightning_eff's
callbacks go into `callbacks=[...]` and its strategy into `strategy=...`; `main()` and `suite_strategy()`
below are where they are built. It trains on 2 CPU processes (gloo) with gradual
pruning, quantization-aware training (converted to int4 weights at the end), PowerSGD gradient compression
and throughput-balanced batches.
Run: `.venv/bin/python examples/existing_trainer.py`.
"""

from __future__ import annotations

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_eff import EfficientDDPStrategy, GradualPruning, QuantizationAwareTraining
from lightning_eff.balancing import ThroughputBalancer
from lightning_eff.compression import PowerSGD


class MyClassifier(L.LightningModule):
    """The user's own model: nothing in it knows about lightning_eff."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = nn.functional.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def digits_loader() -> DataLoader:
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    return DataLoader(TensorDataset(images, torch.tensor(digits.target)), batch_size=64, shuffle=True)


def suite_strategy() -> L.pytorch.strategies.Strategy:
    """lightning_eff's strategy: DDP with PowerSGD-compressed gradients and batches sized to each rank's speed."""
    return EfficientDDPStrategy(
        compression=PowerSGD(rank=4, start_step=10),
        balancer=ThroughputBalancer(replan_every=10),
    )


def main() -> None:
    L.seed_everything(0)
    # lightning_eff's callbacks: 60% of the Linear weights pruned on a cubic schedule, then QAT (int4 weights).
    pruning = GradualPruning(target_sparsity=0.6, update_every=10)
    qat = QuantizationAwareTraining("int8_dynamic_act_int4_weight", start_step=150)
    trainer = L.Trainer(
        max_epochs=15,
        accelerator="cpu",
        devices=2,
        callbacks=[pruning, qat],
        strategy=suite_strategy(),
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(MyClassifier(), train_dataloaders=digits_loader())
    if trainer.is_global_zero:
        assert qat.quantized_model is not None  # converted on rank 0 at the end of fit
        print(f"quantized={type(qat.quantized_model.get_submodule('net.1')).__name__}")
        print(f"sparsity={pruning.sparsity:.3f}")
        print(f"final train_loss={float(trainer.callback_metrics['train_loss']):.4f}")


if __name__ == "__main__":
    main()

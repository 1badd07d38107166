"""A 2-process Lightning DDP run (gloo, plain ``strategy="ddp"``) with KnowledgeDistillation.

Run as `python -m tests.distillation.ddp_worker OUT`; Lightning re-launches it once per rank. The student is
distilled through the LightningModule's own forward (which DDP's forward redirection also calls, with
training_step's arguments) and through an intermediate layer narrower than the teacher's, so a learned
projection is trained too: every parameter the loss reaches must get its gradient on every rank, or DDP
(without find_unused_parameters) fails. Each rank writes `OUT/rank<r>.json` with its final student weights.
"""

from __future__ import annotations

import json
import sys

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_eff.distillation import PROJECTIONS, KnowledgeDistillation
from lightning_eff.distributed import destroy_process_group_at_exit


def mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 4))


class Student(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(6)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        features, labels = batch
        return nn.functional.cross_entropy(self(features), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    out = sys.argv[1]
    destroy_process_group_at_exit()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    teacher = mlp(12)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 8, generator=generator), torch.randint(0, 4, (64,), generator=generator))
    distill = KnowledgeDistillation(teacher, weight=1.0, layers={"net.0": "0"})
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=4,
        callbacks=[distill],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = Student()
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=8))
    result = {
        "weights": {k: v.flatten().tolist() for k, v in model.state_dict().items()},
        "steps": distill.steps,
        "projected": {k: list(v) for k, v in distill.projected.items()},
        "projections": sorted(getattr(model, PROJECTIONS)),
    }
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()

"""GradualPruning under 2-process gloo DDP (Lightning re-launches this module per rank).

`python -m tests.pruning.ddp_worker OUT` writes `OUT.rank<N>`: the mask checksum, the sparsity, the number of
mask updates and the sum of the weights, for the ranks to be compared.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch

from lightning_eff import GradualPruning
from lightning_eff.tasks import DigitsDataModule, DigitsMLP


def train() -> tuple[DigitsMLP, GradualPruning, L.Trainer]:
    L.seed_everything(0, verbose=False)
    callback = GradualPruning(target_sparsity=0.8, update_every=4, end_step=12)
    model = DigitsMLP(hidden_sizes=[64, 64])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=16,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=DigitsDataModule())
    return model, callback, trainer


def summary(model: torch.nn.Module, callback: GradualPruning) -> str:
    """What every rank must agree on: mask checksum, sparsity, update count and weights."""
    pattern = torch.cat([p.detach().reshape(-1) == 0 for p in model.parameters()])
    checksum = int((pattern.nonzero().reshape(-1) * 7919 % 1000003).sum())
    total = float(sum(p.sum() for p in model.parameters()))
    return f"{checksum} {callback.sparsity:.6f} {len(callback.history)} {total:.6f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", help="output prefix; each rank writes OUT.rank<N>")
    args = parser.parse_args()
    model, callback, trainer = train()
    with open(f"{args.out}.rank{trainer.global_rank}", "w") as handle:
        handle.write(summary(model, callback))


if __name__ == "__main__":
    main()

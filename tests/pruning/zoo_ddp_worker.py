"""GradualPruning on a zoo model under 2-process gloo DDP.

`python -m tests.pruning.zoo_ddp_worker OUT [MODEL] [GRANULARITY]` (default resnet, channels) writes
`OUT.rank<N>`: a checksum of the groups and masks, the number of groups, the pruned entries and the masks, for
the ranks to be compared. Each rank trains on another batch, so only rank 0's broadcast (example inputs, masks)
makes them agree.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_eff import GradualPruning
from tests.zoo.models import ZOO_BY_NAME, ZooTask


class RankBatches(Dataset):
    def __init__(self, name: str, rank: int) -> None:
        self.name, self.rank = name, rank

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> object:
        return ZOO_BY_NAME[self.name].batch(index + 100 * self.rank)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", help="output prefix; each rank writes OUT.rank<N>")
    parser.add_argument("model", nargs="?", default="resnet", choices=sorted(ZOO_BY_NAME))
    parser.add_argument("granularity", nargs="?", default="channels", choices=["channels", "unstructured"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    callback = GradualPruning(granularity=args.granularity, target_sparsity=0.5, update_every=2, end_step=4)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, callbacks=[callback], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)  # fmt: skip
    task = ZooTask(args.model)
    rank = int(__import__("os").environ.get("LOCAL_RANK", "0"))
    trainer.fit(task, DataLoader(RankBatches(args.model, rank), batch_size=None))
    groups = callback.plan.groups if callback.plan is not None else []
    names = " ".join(g.name for g in groups)
    pattern = torch.cat([callback.masks[key].reshape(-1) for key in sorted(callback.masks)])
    checksum = int((pattern.nonzero().reshape(-1) * 7919 % 1000003).sum()) + sum(map(ord, names))
    pruned = int(pattern.sum())
    with open(f"{args.out}.rank{trainer.global_rank}", "w") as handle:
        handle.write(f"{checksum} {len(groups)} {pruned} {len(callback.masks)}")


if __name__ == "__main__":
    main()

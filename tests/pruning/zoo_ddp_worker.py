"""GradualPruning on zoo models under 2-process gloo DDP, every (model, granularity) case in one launch.

`python -m tests.pruning.zoo_ddp_worker OUT [MODELS] [GRANULARITIES]` (comma-separated; default every zoo
model and channels,unstructured,n:m) writes `OUT.rank<N>`, one line per case: the model, the granularity, a
checksum of the groups and masks, the number of groups, the pruned entries and the number of masks, for the
ranks to be compared. Each rank trains on other batches, so only rank 0's broadcast (example inputs, masks)
makes them agree. One process group serves every case: Lightning's launcher starts rank 1 once, and each
later `fit` reuses the group, so the whole zoo costs one launch.
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_eff import GradualPruning
from tests.zoo.models import ZOO_BY_NAME, ZooTask

GRANULARITIES = ("channels", "unstructured", "n:m")


class RankBatches(Dataset):
    def __init__(self, name: str, rank: int) -> None:
        self.name, self.rank = name, rank

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> object:
        return ZOO_BY_NAME[self.name].batch(index + 100 * self.rank)


def pruning(granularity: str) -> GradualPruning:
    if granularity == "n:m":
        return GradualPruning(granularity="n:m", pattern="2:4", scope="layer", target_sparsity=0.5, update_every=2,
                              end_step=4)  # fmt: skip
    return GradualPruning(granularity=granularity, target_sparsity=0.5, update_every=2, end_step=4)


def run_case(model: str, granularity: str) -> str:
    """One short DDP fit; the line both ranks must agree on."""
    L.seed_everything(0, verbose=False)
    callback = pruning(granularity)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, callbacks=[callback], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)  # fmt: skip
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    trainer.fit(ZooTask(model), DataLoader(RankBatches(model, rank), batch_size=None))
    groups = callback.plan.groups if callback.plan is not None else []
    names = " ".join(g.name for g in groups)
    pattern = torch.cat([callback.masks[key].reshape(-1) for key in sorted(callback.masks)])
    checksum = int((pattern.nonzero().reshape(-1) * 7919 % 1000003).sum()) + sum(map(ord, names))
    pruned = int(pattern.numel() - pattern.count_nonzero())
    return f"{model} {granularity} {checksum} {len(groups)} {pruned} {len(callback.masks)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", help="output prefix; each rank writes OUT.rank<N>")
    parser.add_argument("models", nargs="?", default=",".join(ZOO_BY_NAME))
    parser.add_argument("granularities", nargs="?", default=",".join(GRANULARITIES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [run_case(model, granularity) for model in args.models.split(",")
             for granularity in args.granularities.split(",")]  # fmt: skip
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    with open(f"{args.out}.rank{rank}", "w") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

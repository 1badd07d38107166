"""FSDP2 runs of the small GPT under `EfficientModelParallelStrategy` (Lightning re-launches this module per rank).

`python -m tests.strategies.fsdp_worker OUT DEVICES SIZES COMPRESSION MAX_STEPS CKPT [MODE]` trains a tiny
`TinyGPT` (which shards its blocks with `fully_shard` in `configure_model`) on the text task with the per-rank
batch sizes SIZES (`12,4`; `equal` for the balancer's own plan; `none` for no balancer), COMPRESSION `none`,
`bf16` or `fp16`, from checkpoint CKPT or `-`; checkpoints every 4 steps under `OUT/ckpt`. With DEVICES=1 the
strategy is `EfficientDDPStrategy` on one process (no sharding): the reference a sharded run must equal.
MODE `slow` slows rank 1 (sleeps in forward and before the optimizer step) and re-plans every 4 steps;
`replan` re-plans every 4 steps without slowing a rank; `unweighted` turns the balancer's loss weighting off
(the control that shows the weighting matters).
Writes `OUT/rank<N>.json`: batch sizes seen, the gathered parameters, losses, loss weight, compression stats,
the balancer's state and which strategy ran.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.types import STEP_OUTPUT

from lightning_eff import EfficientDDPStrategy
from lightning_eff.balancing import ThroughputBalancer
from lightning_eff.balancing.balanced_training import BalancedTraining
from lightning_eff.sharding import full_tensor
from lightning_eff.strategies import EfficientModelParallelStrategy
from lightning_eff.tasks import TextDataModule, TinyGPT

QUIET: dict[str, Any] = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
GLOBAL_BATCH = 16


class Record(Callback):
    """The size and loss of every training batch this rank saw."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        assert isinstance(outputs, dict)
        self.sizes.append(len(batch[0]))
        self.losses.append(float(outputs["loss"]))


class SlowRank1GPT(TinyGPT):
    """Rank 1 is slow at the work that grows with the batch and at the fixed work around the optimizer step."""

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.global_rank == 1:
            time.sleep(0.002 * len(batch[0]))
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.global_rank == 1:
            time.sleep(0.03)


def make_balancer(sizes: str, replan: bool) -> ThroughputBalancer | None:
    if sizes == "none":
        return None
    if replan:
        return ThroughputBalancer(replan_every=4, smoothing=0.0, tolerance=0.0, min_share=0.1)
    balancer = ThroughputBalancer(replan_every=10**9)
    if sizes != "equal":
        plan = [int(size) for size in sizes.split(",")]
        balancer.load_state_dict({"batch_sizes": plan, "speeds": [], "history": [], "last_replan": 0})
    return balancer


def train(out: str, devices: int, sizes: str, compression: str, max_steps: int, ckpt: str, mode: str) -> None:
    torch.set_num_threads(1)
    slow = mode == "slow"
    replan = mode in ("slow", "replan")
    if mode == "unweighted":
        BalancedTraining.weighted = lambda self, loss: loss  # type: ignore[method-assign]
    balancer = make_balancer(sizes, replan)
    compressor = None if compression == "none" else compression
    strategy: EfficientDDPStrategy | EfficientModelParallelStrategy
    if devices == 1:
        strategy = EfficientDDPStrategy(balancer=balancer, compression=compressor)
    else:
        strategy = EfficientModelParallelStrategy(balancer=balancer, compression=compressor)
    L.seed_everything(0, verbose=False)
    record = Record()
    saver = ModelCheckpoint(dirpath=out + "/ckpt", save_top_k=-1, every_n_train_steps=4, filename="{step}")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        callbacks=[record, saver],
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **QUIET,
    )
    model_class = SlowRank1GPT if slow else TinyGPT
    model = model_class(n_layer=1, n_head=2, d_model=32, seq_len=16, lr=1e-2, warmup_steps=1)
    data = TextDataModule(seq_len=16, batch_size=GLOBAL_BATCH // devices, max_bytes=20_000)
    trainer.fit(model, datamodule=data, ckpt_path=None if ckpt == "-" else ckpt)
    params = [full_tensor(p.detach()).reshape(-1).tolist() for p in model.parameters()]  # a collective
    stats = strategy.compression_stats
    result = {
        "strategy": type(strategy).__name__,
        "sharded": any(type(p).__name__ == "DTensor" for p in model.parameters()),
        "sizes": record.sizes,
        "losses": record.losses,
        "params": params,
        "parameter_count": sum(len(p) for p in params),
        "weight": strategy.balancing.loss_weight if strategy.balancing is not None else None,
        "compression": {"steps": stats.steps, **stats.total.as_dict()},
        "balancer": balancer.state_dict() if balancer is not None else None,
    }
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as handle:
        json.dump(result, handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="directory for rank<N>.json and ckpt/")
    parser.add_argument("devices", type=int)
    parser.add_argument("sizes", help="per-rank batch sizes, comma-separated, `equal` or `none`")
    parser.add_argument("compression", choices=["none", "bf16", "fp16"])
    parser.add_argument("max_steps", type=int)
    parser.add_argument("ckpt", help="checkpoint to resume from, or -")
    parser.add_argument("mode", nargs="?", choices=["plain", "slow", "replan", "unweighted"], default="plain")
    args = parser.parse_args()
    train(args.out, args.devices, args.sizes, args.compression, args.max_steps, args.ckpt, args.mode)


if __name__ == "__main__":
    main()

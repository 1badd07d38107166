"""Load-balanced DDP runs on gloo processes (Lightning re-launches this module per rank).

`python -m tests.balancing.ddp_worker train OUT DEVICES SIZES COMPRESSION MAX_STEPS CKPT`: train with the
per-rank batch sizes SIZES (`96,32`, or `equal` for the balancer's own plan), COMPRESSION `none` or `powersgd`,
from checkpoint CKPT or `-`; writes `OUT/rank<N>.json` (batch sizes and epochs seen, parameters, loss weight,
compression ratio, plan) and checkpoints every 10 steps under `OUT/ckpt` (with `--epoch-steps N`: epochs cut to
N batches, a checkpoint at each epoch's end).

`python -m tests.balancing.ddp_worker measure OUT [COMPRESSION]`: 2 ranks, rank 1 slowed down, COMPRESSION `none`
or `fp16` (then with small buckets, so the comm hook runs, and blocks, inside backward); writes `OUT/rank<N>.json`
with the balancer's state and the number of gradient-timing hooks left after the run.

`python -m tests.balancing.ddp_worker fallback OUT`: 2 ranks whose model-proposed plan runs slower than the
equal one (a cost the timer cannot see); writes the balancer's state to `OUT/rank<N>.json`.
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
from lightning_eff.compression import PowerSGD
from lightning_eff.tasks import DigitsDataModule, DigitsMLP

QUIET: dict[str, Any] = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}


class Record(Callback):
    """The size, and the epoch, of every training batch this rank saw."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.epochs: list[int] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        self.sizes.append(len(batch[0]))
        self.epochs.append(trainer.current_epoch)


def train(
    out: str, devices: int, sizes: str, compression: str, max_steps: int, ckpt: str, epoch_steps: int | None = None
) -> dict[str, Any]:
    balancer = ThroughputBalancer(replan_every=10**9)
    if sizes != "equal":
        plan = [int(size) for size in sizes.split(",")]
        balancer.load_state_dict({"batch_sizes": plan, "speeds": [], "history": [], "last_replan": 0})
    compressor = PowerSGD(rank=2, start_step=2) if compression == "powersgd" else None
    strategy = EfficientDDPStrategy(balancer=balancer, compression=compressor)
    L.seed_everything(0, verbose=False)
    record = Record()
    every = epoch_steps or 10
    saver = ModelCheckpoint(dirpath=out + "/ckpt", save_top_k=-1, every_n_train_steps=every, filename="{step}")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        callbacks=[record, saver],
        limit_train_batches=epoch_steps,
        **QUIET,
    )
    model = DigitsMLP(hidden_sizes=[32])
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=128 // devices), ckpt_path=None if ckpt == "-" else ckpt)
    assert strategy.balancer is not None
    result = {
        "sizes": record.sizes,
        "epochs": record.epochs,
        "params": [p.detach().reshape(-1).tolist() for p in model.parameters()],
        "weight": strategy.balancing.loss_weight if strategy.balancing is not None else None,
        "ratio": strategy.compression_stats.total.ratio,
        "plan": strategy.balancer.plan.batch_sizes,
    }
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as handle:
        json.dump(result, handle)
    return result


class SlowRank1(DigitsMLP):
    """Rank 1 is slow at the work that grows with the batch and at the fixed work around the optimizer step."""

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.global_rank == 1:
            time.sleep(0.0005 * len(batch[0]))
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.global_rank == 1:
            time.sleep(0.05)


class HiddenCostOnRank0(SlowRank1):
    """Rank 1 is slow (the balancer sees it), and rank 0 pays 0.15 s after every step in which it has more than
    half the global batch, where the balancer's timer does not look (past the optimizer step): the plan the model
    proposes runs slower than the equal one, which only the measured step time shows."""

    def on_train_batch_end(self, outputs: STEP_OUTPUT, batch: Any, batch_idx: int) -> None:
        if self.global_rank == 0 and len(batch[0]) > 64:
            time.sleep(0.15)


def fallback(out: str) -> dict[str, Any]:
    balancer = ThroughputBalancer(replan_every=5, tolerance=0.0)  # the default smoothing: see `measure`
    strategy = EfficientDDPStrategy(balancer=balancer)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=36, enable_checkpointing=False, **QUIET
    )
    trainer.fit(HiddenCostOnRank0(hidden_sizes=[32]), datamodule=DigitsDataModule(batch_size=64))
    result = {"state": balancer.state_dict()}
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as handle:
        json.dump(result, handle)
    return result


def measure(out: str, compression: str) -> dict[str, Any]:
    # the default smoothing: with none, the noise is one window's deviation, and rank 0's few milliseconds of
    # busy time per step stray by tens of percent from one window to the next
    balancer = ThroughputBalancer(replan_every=5, tolerance=0.0)
    if compression == "none":
        strategy = EfficientDDPStrategy(balancer=balancer)
    else:  # 1 kB buckets: the hook of the first ones waits for rank 1 while this rank's backward is not done
        strategy = EfficientDDPStrategy(balancer=balancer, compression=compression, bucket_cap_mb=0.001)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=16, enable_checkpointing=False, **QUIET
    )
    trainer.fit(SlowRank1(hidden_sizes=[32]), datamodule=DigitsDataModule(batch_size=64))
    result = {
        "state": balancer.state_dict(),
        "hooks": strategy.balancing.timer.watched_parameters if strategy.balancing is not None else None,
    }
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as handle:
        json.dump(result, handle)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("train", help="train with fixed per-rank batch sizes")
    run.add_argument("out", help="directory for rank<N>.json and ckpt/")
    run.add_argument("devices", type=int)
    run.add_argument("sizes", help="per-rank batch sizes, comma-separated, or `equal`")
    run.add_argument("compression", choices=["none", "powersgd"])
    run.add_argument("max_steps", type=int)
    run.add_argument("ckpt", help="checkpoint to resume from, or -")
    run.add_argument("--epoch-steps", type=int, default=None, help="limit_train_batches; checkpoints at epoch ends")
    slow = commands.add_parser("measure", help="2 ranks, rank 1 slow: what the balancer measures")
    slow.add_argument("out", help="directory for rank<N>.json")
    slow.add_argument("compression", nargs="?", default="none", choices=["none", "fp16"])
    fall_back = commands.add_parser("fallback", help="2 ranks, the model's plan runs slower: the balancer's answer")
    fall_back.add_argument("out", help="directory for rank<N>.json")
    args = parser.parse_args()
    if args.command == "fallback":
        fallback(args.out)
    elif args.command == "train":
        train(args.out, args.devices, args.sizes, args.compression, args.max_steps, args.ckpt, args.epoch_steps)
    else:
        measure(args.out, args.compression)


if __name__ == "__main__":
    main()

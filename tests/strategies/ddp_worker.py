"""A 2-process gloo DDP training run with a chosen strategy (Lightning re-launches this module per rank).

`python -m tests.strategies.ddp_worker OUT KIND MAX_STEPS CKPT [ACCUMULATE [PRECISION]]` writes
`OUT/rank<N>.json`: the losses, the step counts, the compression statistics and the sum of the weights.
KIND is `lightning_fp16_hook` (Lightning's DDPStrategy with torch's fp16 hook), `fp16` or `powersgd` (our
strategy with that compressor), or any registered strategy name. CKPT is a checkpoint to resume from, or `-`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

from lightning_eff import EfficientDDPStrategy
from lightning_eff.compression import FP16, PowerSGD
from lightning_eff.distributed import destroy_process_group_at_exit
from lightning_eff.tasks import DigitsDataModule, DigitsMLP


class Record(Callback):
    """The training loss of every batch."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        assert isinstance(outputs, dict)
        self.losses.append(float(outputs["loss"]))


def make_strategy(kind: str) -> Strategy | str:
    if kind == "lightning_fp16_hook":
        return DDPStrategy(ddp_comm_hook=fp16_compress_hook)
    if kind == "fp16":
        return EfficientDDPStrategy(compression=FP16())
    if kind == "powersgd":
        return EfficientDDPStrategy(compression=PowerSGD(rank=2, start_step=3))
    return kind  # a registered name


def train(out: str, kind: str, max_steps: int, ckpt: str, accumulate: int, precision: str) -> dict[str, Any]:
    strategy = make_strategy(kind)
    destroy_process_group_at_exit()  # the Lightning-DDP peers need it too (gloo exit race)
    L.seed_everything(0, verbose=False)
    record = Record()
    saver = ModelCheckpoint(dirpath=out + "/ckpt", save_top_k=-1, every_n_train_steps=15, filename="{step}")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=max_steps,
        callbacks=[record, saver],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=accumulate,
        precision=precision,  # type: ignore[arg-type]  # a command-line string, checked by Lightning
    )
    trainer.fit(
        DigitsMLP(hidden_sizes=[64, 64]), datamodule=DigitsDataModule(), ckpt_path=None if ckpt == "-" else ckpt
    )
    stats = getattr(trainer.strategy, "compression_stats", None)
    result = {
        "losses": record.losses,
        "global_step": trainer.global_step,
        "strategy": type(trainer.strategy).__name__,
        "compressor": repr(getattr(trainer.strategy, "compressor", None)),
        "steps": stats.steps if stats else 0,
        "ratio": stats.total.ratio if stats else None,
        "bytes_dense": stats.total.bytes_dense if stats else 0,
        "weights": float(sum(p.double().sum() for p in trainer.lightning_module.parameters())),
    }
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as handle:
        json.dump(result, handle)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", help="directory for rank<N>.json and ckpt/")
    parser.add_argument("kind", help="lightning_fp16_hook, fp16, powersgd or a registered strategy name")
    parser.add_argument("max_steps", type=int)
    parser.add_argument("ckpt", help="checkpoint to resume from, or -")
    parser.add_argument("accumulate", type=int, nargs="?", default=1, help="accumulate_grad_batches")
    parser.add_argument("precision", nargs="?", default="32-true")
    args = parser.parse_args()
    train(args.out, args.kind, args.max_steps, args.ckpt, args.accumulate, args.precision)


if __name__ == "__main__":
    main()

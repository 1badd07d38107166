"""2-process DDP where rank 0 gets SIGTERM in the middle of a step, while rank 1 already waits in the allreduce.

Run as `python -m tests.faults.sigterm_worker OUT MODE [STRATEGY]`; Lightning re-launches it for rank 1. MODE
`synchronized` adds `SynchronizedSigterm`; `lightning` leaves Lightning's own handler (whose broadcast inside the
handler pairs with rank 1's allreduce: the job hangs). STRATEGY `ddp` (the default: the digits MLP, Int8
compression) or `fsdp2` (the small GPT sharded by `EfficientModelParallelStrategy`: rank 1 waits in a
collective of backward). Each rank writes `OUT/rank<r>.json`: the step it stopped after and how.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_eff import EfficientDDPStrategy, SynchronizedSigterm
from lightning_eff.compression import Int8
from lightning_eff.distributed import destroy_process_group_at_exit
from lightning_eff.strategies import EfficientModelParallelStrategy
from lightning_eff.tasks import DigitsDataModule, DigitsMLP, TextDataModule, TinyGPT

SIGNAL_AT_STEP = 5


class SignalRank0MidStep(L.Callback):
    """At `SIGNAL_AT_STEP` rank 0 waits before its backward (rank 1 reaches the allreduce), then SIGTERMs itself."""

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Any) -> None:
        if trainer.global_rank == 0 and trainer.global_step == SIGNAL_AT_STEP:
            time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    sharded = len(sys.argv) > 3 and sys.argv[3] == "fsdp2"
    destroy_process_group_at_exit()
    L.seed_everything(0, verbose=False)
    callbacks: list[L.Callback] = [SignalRank0MidStep()]
    if mode == "synchronized":
        callbacks.append(SynchronizedSigterm())
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=EfficientModelParallelStrategy() if sharded else EfficientDDPStrategy(compression=Int8()),
        max_steps=40,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    how = "finished"
    try:
        if sharded:  # TinyGPT shards its blocks with fully_shard in configure_model
            model = TinyGPT(n_layer=1, n_head=2, d_model=32, seq_len=16)
            trainer.fit(model, datamodule=TextDataModule(seq_len=16, batch_size=8, max_bytes=20_000))
        else:
            trainer.fit(DigitsMLP(hidden_sizes=[64]), datamodule=DigitsDataModule(batch_size=32))
    except SIGTERMException:
        how = "SIGTERMException"
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as file:
        json.dump({"stopped_after_step": trainer.global_step, "how": how}, file)


if __name__ == "__main__":
    main()

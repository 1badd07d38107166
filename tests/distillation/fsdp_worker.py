"""KnowledgeDistillation under FSDP2 (Lightning's `ModelParallelStrategy`, 2 gloo ranks), several checks, one launch.

`python -m tests.distillation.fsdp_worker OUT` runs in one process group (Lightning's launcher starts rank 1
once; each later `fit` reuses the group). The student is the small GPT (`TinyGPT`, each block its own FSDP2
unit); the teacher a wider GPT held by the callback, whole on every rank:

1. ``full``: 4 epochs of 2 fixed batches per rank, KL to the teacher plus an intermediate layer through a learned
   projection (32 -> 48), a sharded checkpoint per epoch; then `Trainer.test` (agreement on the test set), the
   exported `stripped_copy`, and `initial_teacher` of the sharded student;
2. ``resumed``: a fresh student, teacher and callback resumed from the checkpoint after epoch 2;
3. ``initial``: ``teacher="initial"`` on a fresh student (copied in `setup`, before ``configure_model`` shards);
4. a sharded teacher, refused in `setup`.

Every rank writes ``OUT/rank<N>.pt``: losses, weights (gathered), what the export and the teachers look like.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, Dataset

from lightning_eff.distillation import PROJECTIONS, KnowledgeDistillation, agreement_totals, initial_teacher
from lightning_eff.distributed import destroy_process_group_at_exit
from lightning_eff.sharding import full_tensor, is_sharded
from lightning_eff.tasks.gpt import TinyGPT
from lightning_eff.validation import ConfigError

BATCHES = 2  # per rank and epoch
SEQ = 16


def rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def tokens(index: int, of_rank: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(index + 100 * of_rank)
    sequence = torch.randint(0, 256, (4, SEQ + 1), generator=generator)
    return sequence[:, :-1], sequence[:, 1:]


class RankBatches(Dataset):
    """This rank's `BATCHES` fixed batches (``batch_size=None``); `offset` gives other ones (the test set)."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset

    def __len__(self) -> int:
        return BATCHES

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return tokens(index + self.offset, rank())


def student() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(n_layer=2, n_head=2, d_model=32, seq_len=SEQ, warmup_steps=1, lr=1e-2)


def teacher() -> TinyGPT:
    torch.manual_seed(1)
    model = TinyGPT(n_layer=2, n_head=2, d_model=48, seq_len=SEQ)
    with torch.no_grad():
        model.head.weight.mul_(20)  # confident: a fresh student is far from it
    return model


class Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.losses.append(float(trainer.callback_metrics["distillation/loss"]))


def fit(model: TinyGPT, callbacks: list[L.Callback], out: Path, ckpt: str | None = None) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=4,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=out,
    )
    trainer.fit(model, DataLoader(RankBatches(), batch_size=None), ckpt_path=ckpt)
    return trainer


def gathered(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer, whole (a collective)."""
    return {name: full_tensor(t).detach().clone() for name, t in model.state_dict().items()}


def main() -> None:
    out = Path(sys.argv[1])
    destroy_process_group_at_exit()
    torch.set_num_threads(1)
    result: dict[str, Any] = {}

    # 1. the whole run, checkpointed every epoch
    model, losses = student(), Losses()
    distill = KnowledgeDistillation(teacher(), loss="kl", weight=1.0, layers={"blocks.1": "blocks.1"})
    checkpoints = ModelCheckpoint(dirpath=out / "ckpt", every_n_epochs=1, save_top_k=-1)
    trainer = fit(model, [distill, losses, checkpoints], out)
    result["full"] = {"losses": losses.losses, "steps": distill.steps, "last_loss": float(distill.last_loss or 0),
                      "weights": gathered(model), "student_sharded": is_sharded(model),
                      "teacher_sharded": is_sharded(distill.teacher), "projected": dict(distill.projected)}  # fmt: skip
    trainer.test(model, DataLoader(RankBatches(offset=BATCHES), batch_size=None), verbose=False)
    result["test_agreement"] = distill.test_agreement
    exported = KnowledgeDistillation.stripped_copy(model)
    sample = tokens(0, rank())[0]
    with torch.no_grad():
        result["export"] = {
            "class": type(exported).__name__,
            "sharded": is_sharded(exported),
            "keys": sorted(exported.state_dict()),
            "has_projections": PROJECTIONS in dict(exported.named_children()),
            "model_still_has_projections": PROJECTIONS in dict(model.named_children()),
            "output": exported(sample),
            "sharded_output": model(sample),
        }
        # the test-set agreement, recomputed on rank 0 from both ranks' test batches with the exported student
        totals = torch.zeros(2, dtype=torch.float64)
        for of_rank in range(2):
            for index in range(BATCHES):
                inputs = tokens(index + BATCHES, of_rank)[0]
                totals += agreement_totals(exported(inputs), distill.teacher(inputs), "argmax")
        result["recomputed_agreement"] = float(totals[0] / totals[1])
    again = initial_teacher(model, drop=[PROJECTIONS])
    result["initial_of_sharded"] = {"sharded": is_sharded(again), "state": again.state_dict()}
    if trainer.is_global_zero:
        section = distill.report_section(trainer, out)
        result["report"] = section.summary

    # 2. resumed after epoch 2 with a fresh student, teacher and callback
    model, losses = student(), Losses()
    resumed = KnowledgeDistillation(teacher(), loss="kl", weight=1.0, layers={"blocks.1": "blocks.1"})
    ckpt = str(next((out / "ckpt").glob("epoch=1-*")))
    fit(model, [resumed, losses], out, ckpt=ckpt)
    result["resumed"] = {"losses": losses.losses, "steps": resumed.steps, "last_loss": float(resumed.last_loss or 0),
                         "weights": gathered(model)}  # fmt: skip

    # 3. teacher="initial": the fresh student's weights, copied before configure_model shards it
    model = student()
    before = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    initial = KnowledgeDistillation("initial", loss="kl", weight=1.0)
    trainer = fit(model, [initial], out)
    result["initial"] = {"before": before, "teacher": initial.teacher.state_dict(), "after": gathered(model),
                         "teacher_sharded": is_sharded(initial.teacher), "steps": initial.steps,
                         "teacher_trainable": any(p.requires_grad for p in initial.teacher.parameters())}  # fmt: skip

    # 4. a sharded teacher
    sharded = fully_shard(teacher(), mesh=init_device_mesh("cpu", (2,)))
    try:
        KnowledgeDistillation(sharded).setup(trainer, model, "fit")
    except ConfigError as error:
        result["sharded_teacher_error"] = str(error)
    torch.save(result, out / f"rank{rank()}.pt")


if __name__ == "__main__":
    main()

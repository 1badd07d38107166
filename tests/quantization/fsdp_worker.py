"""QuantizationAwareTraining under FSDP2 (`ModelParallelStrategy`) and under DDP, 2 gloo ranks, one launch.

`python -m tests.quantization.fsdp_worker OUT_DIR` runs, in one process group (Lightning's launcher starts rank 1
once; each later `fit` reuses the group):

- the small GPT (per-group int4 weights, int8 activations) under DDP, then under FSDP2 with an export, a
  sharded checkpoint per epoch and, after fit, `Trainer.test` and rank 0's report (as the app runs them),
  then under FSDP2 again resumed from the first epoch's checkpoint;
- the zoo's Hugging Face GPT-2 (HF `Conv1D`, [in, out] weights: FSDP2 shards the input dim, so per-row scales
  computed on a shard would differ) with int8 per-row weights, under DDP and FSDP2, its export checked after
  the first batch on the sharded model;
- the zoo's ResNet (int8 convs, each BatchNorm folded in: its running statistics are buffers, which FSDP2
  leaves per rank) under DDP and FSDP2.

Every rank trains on its own batches (same per-rank data under both strategies, so gradients average alike).
Rank 0 saves each converted model's state, its output on the first training batch and the report to
``OUT_DIR/results.pt``; every rank writes ``OUT_DIR/rank<N>.json``: what a fake-quantized layer saw in a
forward, a checksum of the buffers, the phase.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset

from lightning_eff.quantization import QuantizationAwareTraining
from lightning_eff.quantization.prepare import FAKE_QUANTIZED, FakeQuantizedLinear
from lightning_eff.sharding import fully_shard_blocks
from lightning_eff.tasks.gpt import TinyGPT
from tests.zoo.models import ZOO_BY_NAME, ZooTask, logits_of, loss_of

GPT_BATCHES = 3  # per rank and epoch
SEQ = 16


class GPTBatches(Dataset):
    """`GPT_BATCHES` fixed token batches of this rank (use with ``batch_size=None``)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __len__(self) -> int:
        return GPT_BATCHES

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(index + 100 * self.rank)
        tokens = torch.randint(0, 256, (4, SEQ + 1), generator=generator)
        return tokens[:, :-1], tokens[:, 1:]


class GPTData(L.LightningDataModule):
    """This rank's batches to train on, and 2 of them to test on (the report's test rows need a datamodule)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(GPTBatches(rank()), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(torch.utils.data.Subset(GPTBatches(rank()), [0, 1]), batch_size=None)


class ZooBatchesOfRank(Dataset):
    def __init__(self, name: str, rank: int, count: int) -> None:
        self.name, self.rank, self.count = name, rank, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> object:
        return ZOO_BY_NAME[self.name].batch(index + 100 * self.rank)


class ShardedZoo(ZooTask):
    """A zoo model as a user would shard it: each block its own FSDP2 unit, then the model as the root unit."""

    def configure_model(self) -> None:
        if self.device_mesh is not None:  # the model is the root unit: loss_of calls it, not self.forward
            fully_shard_blocks(self.model, blocks(self.entry.name, self.model), self.device_mesh["data_parallel"])

    def training_step(self, batch: tuple[dict[str, Tensor], Tensor], batch_idx: int) -> Tensor:
        return loss_of(self.entry, self, batch)  # through self.forward: the callback traces its export from that call


def blocks(name: str, model: Any) -> list[nn.Module]:
    if name == "gpt2":
        return list(model.transformer.h)
    return [*model.layer1, *model.layer2]  # resnet's BasicBlocks


def rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def trainer(strategy: str, callbacks: list[L.Callback], max_epochs: int, out: Path) -> L.Trainer:
    chosen: Any = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if strategy == "fsdp2" else "ddp"
    return L.Trainer(accelerator="cpu", devices=2, strategy=chosen, max_epochs=max_epochs, callbacks=callbacks,
                     logger=False, enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                     enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                     default_root_dir=out)  # fmt: skip


def seen_in_forward(module: nn.Module, layer: nn.Module, inputs: dict[str, Tensor]) -> list[Any]:
    """The type and shape of `layer`'s weight inside its forward (a forward on every rank: FSDP2 gathers)."""
    seen: list[Any] = []
    hook = layer.register_forward_pre_hook(
        lambda m, _args: seen.extend([type(m.weight).__name__, list(m.weight.shape)])
    )
    with torch.no_grad():
        module(**inputs)
    hook.remove()
    return seen


def buffers_checksum(module: nn.Module) -> float:
    return float(sum(b.double().sum() for b in module.buffers() if b.is_floating_point()))


def summary(
    callback: QuantizationAwareTraining, pl_module: nn.Module, layer: nn.Module, inputs: dict[str, Tensor]
) -> dict[str, Any]:
    """What both strategies must agree on, per rank."""
    return {
        "seen": seen_in_forward(pl_module, layer, inputs),
        "sharded": isinstance(layer.weight, DTensor),
        "buffers": buffers_checksum(pl_module),
        "phase": [callback.phase, callback.phase_changed_at],
    }


def converted(callback: QuantizationAwareTraining) -> dict[str, Any]:
    """Rank 0's converted model: its state, and its output on the first training batch (to check the export)."""
    model = callback.quantized_model
    assert model is not None and callback._example is not None
    args, kwargs = callback._example
    with torch.no_grad():
        output = logits_of(model(*args, **kwargs))
    return {"state": model.state_dict(), "example": callback._example, "output": output}


def run_gpt(strategy: str, out: Path, results: dict[str, Any], lines: dict[str, Any], resume: bool = False) -> None:
    L.seed_everything(0, verbose=False)
    name = f"gpt_{strategy}" + ("_resumed" if resume else "")
    export = str(out / f"{name}.pt2") if strategy == "fsdp2" and not resume else None
    callback = QuantizationAwareTraining("int8_dynamic_act_int4_weight", group_size=32, start_step=2,
                                         export_path=export)  # fmt: skip
    callbacks: list[L.Callback] = [callback]
    if strategy == "fsdp2" and not resume:
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_epochs=1, save_top_k=-1))
    model = TinyGPT(n_layer=2, n_head=2, d_model=64, seq_len=SEQ, warmup_steps=2)
    fitter = trainer(strategy, callbacks, 2, out)
    ckpt = str(next((out / "ckpt").glob("epoch=0-*"))) if resume else None
    fitter.fit(model, datamodule=GPTData(), ckpt_path=ckpt)
    layers = list(callback.layers)
    if export is not None:  # as the app does after fit: setup runs again, now on the sharded model
        fitter.test(model, datamodule=GPTData(), verbose=False)
    inputs = {"tokens": GPTBatches(rank())[0][0]}
    lines[name] = {
        **summary(callback, model, model.blocks[0].attn.qkv, inputs),
        "same_layers": callback.layers == layers,
    }
    assert isinstance(model.blocks[0].attn.qkv, FakeQuantizedLinear)
    if rank() == 0:
        report = callback.report_section(fitter, out)
        assert report is not None
        results[name] = {**converted(callback), "report": report.summary, "rows": report.rows, "export": export}


def run_zoo(name: str, scheme: str, strategy: str, out: Path, results: dict[str, Any], lines: dict[str, Any]) -> None:
    L.seed_everything(0, verbose=False)
    key = f"{name}_{strategy}"
    export = str(out / f"{key}.pt2") if strategy == "fsdp2" and name == "gpt2" else None
    callback = QuantizationAwareTraining(scheme, start_step=1, export_path=export)
    model = ShardedZoo(name)
    fitter = trainer(strategy, [callback], 1, out)
    fitter.fit(model, DataLoader(ZooBatchesOfRank(name, rank(), 3), batch_size=None))
    layer = model.model.transformer.h[0].attn.c_attn if name == "gpt2" else model.model.layer1[0].conv1
    assert isinstance(layer, FAKE_QUANTIZED)
    lines[key] = summary(callback, model, layer, ZOO_BY_NAME[name].batch(0)[0])
    if rank() == 0:
        results[key] = {**converted(callback), "export": export}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", help="output directory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    lines: dict[str, Any] = {}
    run_gpt("ddp", out, results, lines)
    run_gpt("fsdp2", out, results, lines)
    run_gpt("fsdp2", out, results, lines, resume=True)
    for strategy in ("ddp", "fsdp2"):
        run_zoo("gpt2", "int8_weight_only", strategy, out, results, lines)
    for strategy in ("ddp", "fsdp2"):
        run_zoo("resnet", "int8_dynamic", strategy, out, results, lines)
    (out / f"rank{rank()}.json").write_text(json.dumps(lines, indent=1))
    if rank() == 0:
        torch.save(results, out / "results.pt")


if __name__ == "__main__":
    main()

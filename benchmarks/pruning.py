"""GradualPruning vs Lightning's ModelPruning: quality at equal sparsity, step-time overhead, real speed-ups.

Both pruners run on the same model, data, steps and seed in one process; each part prints a table:

1. ``mlp``: digits MLP at 90% sparsity: test accuracy and achieved sparsity of dense, ModelPruning, ours.
2. ``gpt``: TinyGPT on the text task at 80% sparsity: validation loss of the three.
3. ``overhead``: median training-step time with no pruning, ModelPruning and ours, interleaved in rounds.
4. ``channels``: channel pruning at 50% then `shrink`: CPU inference speed and accuracy, masked vs shrunk.
5. ``gpu``: 2:4 pruning then torchao's semi-structured kernels vs dense (only with a CUDA device).
6. ``structured``: dependency-graph channel groups (`dependency.analyze`) pruned 50% and shrunk, on a ResNet
   and a BERT encoder: parameters, CPU inference masked vs shrunk, and digits accuracy of dense, structured and
   unstructured pruning at the same parameter count after the same training budget; the same three on the BERT
   (with a head) predicting masked bytes of CPython's help text: held-out masked-byte accuracy and loss.
7. ``torch_pruning``: Torch-Pruning's one-shot L1 50% (DepGraph) vs ours on the same models: parameters, speed,
   and whether the pruned model computes what its masked version does (skipped when `torch_pruning` is not
   installed: ``.venv/bin/pip install torch-pruning``; a benchmark-only peer, not a dependency).
8. ``packed``: bytes on disk of `sparse_format.save_sparse` vs dense `torch.save` at 50/80/90% unstructured
   sparsity, float32 and int8-converted.

ModelPruning gets every advantage the callback offers: L1 unstructured, global, the same Linear weights,
a per-epoch amount that follows the same cubic schedule and ends exactly at the target, no lottery-ticket
reset, and its reparametrization removed at the end of fit before sparsity is counted.

Usage:
    python benchmarks/pruning.py [--quick] [--seeds N] [--json PATH]
        [--only mlp,gpt,overhead,channels,gpu,structured,torch_pruning,packed]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from harness import (
    REPO,
    Goal,
    StepRecorder,
    command_line,
    finish,
    fit,
    machine_facts,
    mean,
    median,
    parse_choices,
    print_table,
    progress,
    quiet_lightning,
    report_goals,
    run_parts,
    time_interleaved,
    write_json,
)
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_eff.pruning import GradualPruning
from lightning_eff.pruning.masks import zero_fraction
from lightning_eff.tasks import DigitsDataModule, DigitsMLP, TextDataModule, TinyGPT
from lightning_eff.tasks.loading import split_sizes
from lightning_eff.tasks.text import corpus_bytes

PARTS = ("mlp", "gpt", "overhead", "channels", "gpu", "structured", "torch_pruning", "packed")
VARIANTS = ("dense", "model_pruning", "ours")
PRUNE_FRACTION = 0.75  # both pruners reach the target after this share of training
MLP_SPARSITY = 0.9
GPT_SPARSITY = 0.8
CHANNEL_SPARSITY = 0.5
Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Plan:
    """Sizes of one run; `--quick` shrinks every part but keeps each a real comparison."""

    seeds: int
    mlp_epochs: int
    mlp_update_every: int
    gpt_seq_len: int
    gpt_batch_size: int
    gpt_max_bytes: int | None
    gpt_steps: int
    gpt_epoch_steps: int  # limit_train_batches: ModelPruning prunes once per such epoch
    gpt_update_every: int
    overhead_rounds: int
    overhead_epochs: int  # timed epochs per variant and round, after one warm-up epoch
    channels_epochs: int
    inference_rounds: int
    inference_iterations: int  # per model and round
    gpu_width: int
    gpu_layers: int
    gpu_steps: int
    structured_width: int  # ResNet base width
    structured_steps: int  # digits training steps per variant
    structured_image: int  # side of the upsampled digits images trained on
    bert_hidden: int
    bert_layers: int
    bert_seq: int
    bert_steps: int  # masked-byte training steps per variant (6c)
    bert_batch: int  # windows of bert_seq bytes per step (6c)
    packed_width: int  # hidden width of the digits MLP whose state_dict is saved


FULL = Plan(
    seeds=3,
    mlp_epochs=30,
    mlp_update_every=5,
    gpt_seq_len=64,
    gpt_batch_size=32,
    gpt_max_bytes=None,
    # At 600 steps both pruners end about 10% above dense: too short for this 0.4M-weight GPT to recover
    # from 80% pruning; `--gpt-steps 1500` gives ours +3.0%, ModelPruning +4.1%. 600 keeps the full run short.
    gpt_steps=600,
    gpt_epoch_steps=25,
    gpt_update_every=10,
    overhead_rounds=4,
    overhead_epochs=3,
    channels_epochs=30,
    inference_rounds=10,
    inference_iterations=30,
    gpu_width=1024,
    gpu_layers=4,
    gpu_steps=300,
    structured_width=32,
    structured_steps=300,
    structured_image=16,
    bert_hidden=128,
    bert_layers=4,
    bert_seq=64,
    bert_steps=300,
    bert_batch=16,
    packed_width=1024,
)
QUICK = Plan(
    seeds=1,
    mlp_epochs=15,
    mlp_update_every=3,
    gpt_seq_len=32,
    gpt_batch_size=16,
    gpt_max_bytes=100_000,
    gpt_steps=150,
    gpt_epoch_steps=10,
    gpt_update_every=5,
    overhead_rounds=3,
    overhead_epochs=2,
    channels_epochs=10,
    inference_rounds=4,
    inference_iterations=10,
    gpu_width=256,
    gpu_layers=2,
    gpu_steps=40,
    structured_width=16,
    structured_steps=60,
    structured_image=16,
    bert_hidden=64,
    bert_layers=2,
    bert_seq=32,
    bert_steps=150,
    bert_batch=16,
    packed_width=256,
)


# --- training and measuring ----------------------------------------------------------------------------


def cubic_epoch_amounts(target: float, epochs: int) -> list[float]:
    """ModelPruning's per-epoch amounts for the cubic schedule sampled at epoch ends, ending exactly at `target`.

    torch prunes `amount` of the weights still unpruned, so the amount of epoch k is the share of the
    survivors that must go: 1 - (1 - s_k) / (1 - s_{k-1}); the product of (1 - amount) is 1 - target.
    """
    sparsity = [target * (1 - (1 - (k + 1) / epochs) ** 3) for k in range(epochs)]
    return [1 - (1 - now) / (1 - before) for now, before in zip(sparsity, [0.0, *sparsity[:-1]], strict=True)]


def pruning_callbacks(
    variant: str, model: nn.Module, target: float, epochs: int, update_every: int
) -> list[L.Callback]:
    """The pruner of `variant`: both prune all Linear weights by global L1 magnitude, cubically, to `target`
    by 75% of training; ModelPruning at epoch ends, ours every `update_every` optimizer steps."""
    if variant == "dense":
        return []
    ours = GradualPruning(target_sparsity=target, update_every=update_every, schedule="cubic", scope="global")
    if variant == "ours":
        return [ours]
    targets = [t.module for t in ours.check_model(model)]
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    assert targets == linears, f"GradualPruning targets {targets}, expected every Linear {linears}"
    amounts = cubic_epoch_amounts(target, max(1, int(PRUNE_FRACTION * epochs)))
    return [
        ModelPruning(
            pruning_fn="l1_unstructured",
            parameters_to_prune=[(model.get_submodule(name), "weight") for name in targets],
            use_global_unstructured=True,
            amount=lambda epoch: amounts[epoch] if epoch < len(amounts) else 0.0,
            use_lottery_ticket_hypothesis=False,
            make_pruning_permanent=True,
        )
    ]


def linear_sparsity(model: nn.Module) -> float:
    """Share of exact zeros over all Linear weights, once no pruning reparametrization is left."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if any(hasattr(module, "weight_orig") for module in linears):
        raise RuntimeError("ModelPruning's weight_orig/weight_mask are still attached: pruning is not permanent")
    return zero_fraction([module.weight for module in linears])


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, metric: Metric) -> float:
    """`metric` averaged over every sample of `loader`."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for inputs, targets in loader:
        total += float(metric(model(inputs.to(device)), targets.to(device))) * len(targets)
        count += len(targets)
    return total / count


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == labels).float().mean()


def next_byte_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def compare_pruners(
    build: Callable[[], tuple[L.LightningModule, L.LightningDataModule]],
    score: Callable[[L.LightningModule, L.LightningDataModule], float],
    target: float,
    epochs: int,
    update_every: int,
    seeds: Sequence[int],
    **limits: Any,
) -> dict[str, dict[str, list[float]]]:
    """Train dense, ModelPruning and ours from the same seed for each seed; score, sparsity and fit seconds."""
    results: dict[str, dict[str, list[float]]] = {
        key: {v: [] for v in VARIANTS} for key in ("score", "sparsity", "fit_s")
    }
    for seed in seeds:
        for variant in VARIANTS:
            L.seed_everything(seed, verbose=False)
            model, data = build()
            callbacks = pruning_callbacks(variant, model, target, epochs, update_every)
            results["fit_s"][variant].append(fit(model, data, callbacks, **limits)[1])
            results["score"][variant].append(score(model, data))
            results["sparsity"][variant].append(linear_sparsity(model))
            progress(f"  seed {seed} {variant}: score {results['score'][variant][-1]:.4f}")
    return results


# --- the parts -----------------------------------------------------------------------------------------


def run_mlp(plan: Plan, seeds: Sequence[int]) -> dict[str, Any]:
    def build() -> tuple[L.LightningModule, L.LightningDataModule]:
        return DigitsMLP(hidden_sizes=[256, 256]), DigitsDataModule()

    def test_accuracy(model: L.LightningModule, data: L.LightningDataModule) -> float:
        return 100 * evaluate(model, data.test_dataloader(), accuracy)

    results = compare_pruners(
        build, test_accuracy, MLP_SPARSITY, plan.mlp_epochs, plan.mlp_update_every, seeds, max_epochs=plan.mlp_epochs
    )
    score, sparsity = results["score"], results["sparsity"]
    print_table(
        f"1. digits MLP [256, 256], {MLP_SPARSITY:.0%} sparsity, {plan.mlp_epochs} epochs, seeds {list(seeds)}",
        ["variant", "test acc % (mean)", "per seed", "sparsity", "fit s (median)"],
        [
            [v, f"{mean(score[v]):.2f}", " ".join(f"{a:.2f}" for a in score[v]), f"{mean(sparsity[v]):.4f}",
             f"{median(results['fit_s'][v]):.1f}"]
            for v in VARIANTS
        ],
    )  # fmt: skip
    ours, dense, baseline = mean(score["ours"]), mean(score["dense"]), mean(score["model_pruning"])
    goals = report_goals(
        Goal("ours within 1.0 point of dense", f"ours {ours:.2f}, dense {dense:.2f}", dense - ours <= 1.0),
        Goal("ours not below ModelPruning", f"ours {ours:.2f}, ModelPruning {baseline:.2f}", ours >= baseline),
    )
    return {"test_accuracy_pct": score, "sparsity": sparsity, "fit_s": results["fit_s"], "goals": goals}


def gpt_model(plan: Plan) -> TinyGPT:
    return TinyGPT(n_layer=2, n_head=4, d_model=128, seq_len=plan.gpt_seq_len)


def text_data(plan: Plan) -> TextDataModule:
    return TextDataModule(seq_len=plan.gpt_seq_len, batch_size=plan.gpt_batch_size, max_bytes=plan.gpt_max_bytes)


def run_gpt(plan: Plan, seeds: Sequence[int]) -> dict[str, Any]:
    def build() -> tuple[L.LightningModule, L.LightningDataModule]:
        return gpt_model(plan), text_data(plan)

    def val_loss(model: L.LightningModule, data: L.LightningDataModule) -> float:
        return evaluate(model, data.val_dataloader(), next_byte_loss)

    epochs = plan.gpt_steps // plan.gpt_epoch_steps
    results = compare_pruners(
        build, val_loss, GPT_SPARSITY, epochs, plan.gpt_update_every, seeds,
        max_steps=plan.gpt_steps, limit_train_batches=plan.gpt_epoch_steps,
    )  # fmt: skip
    score, sparsity = results["score"], results["sparsity"]
    dense = mean(score["dense"])
    print_table(
        f"2. TinyGPT (2 layers, d=128, seq {plan.gpt_seq_len}), {GPT_SPARSITY:.0%} sparsity, {plan.gpt_steps} steps"
        f" in epochs of {plan.gpt_epoch_steps} ({int(PRUNE_FRACTION * epochs)} ModelPruning events,"
        f" ours every {plan.gpt_update_every} steps), seeds {list(seeds)}",
        ["variant", "val loss (mean)", "per seed", "vs dense", "sparsity", "fit s (median)"],
        [
            [v, f"{mean(score[v]):.4f}", " ".join(f"{x:.4f}" for x in score[v]), f"{mean(score[v]) / dense - 1:+.2%}",
             f"{mean(sparsity[v]):.4f}", f"{median(results['fit_s'][v]):.1f}"]
            for v in VARIANTS
        ],
    )  # fmt: skip
    ours, baseline = mean(score["ours"]), mean(score["model_pruning"])
    goals = report_goals(
        Goal("ours no worse than ModelPruning", f"ours {ours:.4f}, ModelPruning {baseline:.4f}", ours <= baseline),
        Goal("ours within 5% of dense", f"{ours / dense - 1:+.2%}", ours <= 1.05 * dense),
    )
    return {"val_loss": score, "sparsity": sparsity, "fit_s": results["fit_s"], "goals": goals}


def run_overhead(plan: Plan) -> dict[str, Any]:
    """Step time with masks present: the first epoch (before ModelPruning's first pruning) is not timed."""
    data = text_data(plan)
    epochs = 1 + plan.overhead_epochs
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for round_index in range(plan.overhead_rounds):
        for variant in VARIANTS:
            L.seed_everything(0, verbose=False)
            model = gpt_model(plan)
            timer = StepRecorder(skip_steps=plan.gpt_epoch_steps)  # last: the pruners' work falls in its span
            callbacks = pruning_callbacks(variant, model, GPT_SPARSITY, epochs, plan.gpt_update_every)
            fit(model, data, [*callbacks, timer], max_steps=epochs * plan.gpt_epoch_steps,
                limit_train_batches=plan.gpt_epoch_steps)  # fmt: skip
            seconds[variant] += timer.seconds
        progress(f"  round {round_index + 1}/{plan.overhead_rounds} done")
    dense_median, dense_mean = median(seconds["dense"]), mean(seconds["dense"])
    print_table(
        f"3. training step time, TinyGPT as in 2 ({GPT_SPARSITY:.0%} target), pruning under way,"
        f" {plan.overhead_rounds} interleaved rounds",
        ["variant", "steps", "median ms", "vs dense", "mean ms", "vs dense"],
        [
            [v, len(seconds[v]), f"{1e3 * median(seconds[v]):.2f}", f"{median(seconds[v]) / dense_median:.3f}x",
             f"{1e3 * mean(seconds[v]):.2f}", f"{mean(seconds[v]) / dense_mean:.3f}x"]
            for v in VARIANTS
        ],
    )  # fmt: skip
    print(
        "timed: on_train_batch_start to the end of every callback's on_train_batch_end, after the first epoch;"
        f" ours recomputes masks inside that span every {plan.gpt_update_every} steps (in the mean, rarely in the"
        " median), ModelPruning prunes at epoch ends, outside it"
    )
    overhead = median(seconds["ours"]) / dense_median - 1
    goals = report_goals(Goal("ours at most 3% median step overhead", f"{overhead:+.1%}", overhead <= 0.03))
    return {
        "median_step_s": {v: median(seconds[v]) for v in VARIANTS},
        "mean_step_s": {v: mean(seconds[v]) for v in VARIANTS},
        "steps": {v: len(seconds[v]) for v in VARIANTS},
        "goals": goals,
    }


def run_channels(plan: Plan, seed: int) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    model, data = DigitsMLP(hidden_sizes=[1024, 1024]), DigitsDataModule()
    pruner = GradualPruning(
        target_sparsity=CHANNEL_SPARSITY, granularity="channels", scope="layer", update_every=plan.mlp_update_every
    )
    fit(model, data, [pruner], max_epochs=plan.channels_epochs)
    model.eval()
    shrunk, _ = pruner.shrink(model)
    shrunk.eval()
    models = {"masked": model, "shrunk": shrunk}
    test_accuracy = {name: 100 * evaluate(m, data.test_dataloader(), accuracy) for name, m in models.items()}
    assert data.test_set is not None
    images = data.test_set.tensors[0]  # type: ignore[attr-defined]
    with torch.inference_mode():
        max_difference = float((model(images) - shrunk(images)).abs().max())
    batch = images[:256]
    seconds = time_interleaved(
        {name: partial(m, batch) for name, m in models.items()}, plan.inference_rounds, plan.inference_iterations
    )
    parameters = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    widths = [layer.out_features for layer in shrunk.modules() if isinstance(layer, nn.Linear)]
    print_table(
        f"4. channels: digits MLP [1024, 1024], {CHANNEL_SPARSITY:.0%} of channels per layer, then shrink;"
        f" CPU inference, batch {len(batch)}, {plan.inference_rounds} interleaved rounds",
        ["model", "parameters", "test acc %", "median ms", "speed-up"],
        [
            [name, parameters[name], f"{test_accuracy[name]:.2f}", f"{1e3 * median(seconds[name]):.3f}",
             f"{median(seconds['masked']) / median(seconds[name]):.2f}x"]
            for name in models
        ],
    )  # fmt: skip
    print(f"shrunk Linear widths: {widths}; max |logit difference| masked vs shrunk: {max_difference:.2e}")
    speedup = median(seconds["masked"]) / median(seconds["shrunk"])
    goals = report_goals(
        Goal("shrunk at least 1.6x faster", f"{speedup:.2f}x", speedup >= 1.6),
        Goal(
            "identical test accuracy",
            f"masked {test_accuracy['masked']:.2f}, shrunk {test_accuracy['shrunk']:.2f}",
            test_accuracy["masked"] == test_accuracy["shrunk"],
        ),
    )
    return {
        "parameters": parameters,
        "test_accuracy_pct": test_accuracy,
        "median_inference_s": {name: median(s) for name, s in seconds.items()},
        "speedup": speedup,
        "shrunk_widths": widths,
        "max_logit_difference": max_difference,
        "goals": goals,
    }


def run_gpu(plan: Plan, seed: int) -> dict[str, Any]:
    """2:4 pruning with GradualPruning, then torchao's semi-structured kernels vs the same weights dense, fp16."""
    if not torch.cuda.is_available():
        print("\n5. GPU 2:4 semi-structured sparsity: skipped: no CUDA device")
        return {"skipped": "no CUDA device"}
    from torchao.sparsity import semi_sparse_weight, sparsify_

    seq_len, batch_size = 128, 32
    data = TextDataModule(seq_len=seq_len, batch_size=batch_size)
    trained: dict[str, TinyGPT] = {}
    pruner = GradualPruning(target_sparsity=0.5, granularity="n:m", pattern="2:4", update_every=10)
    for variant in ("dense", "2:4"):
        L.seed_everything(seed, verbose=False)
        model = TinyGPT(n_layer=plan.gpu_layers, n_head=plan.gpu_width // 64, d_model=plan.gpu_width, seq_len=seq_len)
        fit(model, data, [pruner] if variant == "2:4" else [], accelerator="gpu", max_steps=plan.gpu_steps)
        trained[variant] = model.to("cuda").half().eval()
    pruned_layers = {t.module for t in pruner.targets}

    def semi_structured(module: nn.Module, name: str) -> bool:
        # CUTLASS needs rows a multiple of 32 and columns of 64; cuSPARSELt less.
        rows, columns = module.weight.shape if isinstance(module, nn.Linear) else (1, 1)
        return name in pruned_layers and rows % 32 == 0 and columns % 64 == 0

    models = {"dense": trained["dense"], "2:4 masked": trained["2:4"], "2:4 sparse": copy.deepcopy(trained["2:4"])}
    sparsify_(models["2:4 sparse"], semi_sparse_weight(), filter_fn=semi_structured)
    loss = {name: evaluate(m, data.val_dataloader(), next_byte_loss) for name, m in models.items()}
    tokens = next(iter(data.val_dataloader()))[0].cuda()
    seconds = time_interleaved(
        {name: partial(m, tokens) for name, m in models.items()},
        plan.inference_rounds,
        plan.inference_iterations,
        sync=torch.cuda.synchronize,
    )
    print_table(
        f"5. GPU ({torch.cuda.get_device_name()}): TinyGPT {plan.gpu_layers} layers, d={plan.gpu_width},"
        f" {plan.gpu_steps} steps; fp16 inference, batch {batch_size}x{seq_len}",
        ["model", "val loss", "median ms", "speed-up vs dense"],
        [
            [name, f"{loss[name]:.4f}", f"{1e3 * median(seconds[name]):.3f}",
             f"{median(seconds['dense']) / median(seconds[name]):.2f}x"]
            for name in models
        ],
    )  # fmt: skip
    return {
        "device": torch.cuda.get_device_name(),
        "val_loss": loss,
        "median_inference_s": {name: median(s) for name, s in seconds.items()},
        "sparse_layers": sorted(pruned_layers),
    }


# --- structured pruning of dependency-graph groups, Torch-Pruning, packed files ------------------------------


def zoo() -> Any:
    """tests/zoo/models.py: the ResNet and BERT the capability tests use (a repository checkout is assumed)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.zoo import models

    return models


def resnet(plan: Plan, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return zoo().ResNet(width=plan.structured_width).eval()


def bert(plan: Plan, seed: int, vocab_size: int | None = None) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=vocab_size or zoo().VOCAB, hidden_size=plan.bert_hidden,
                        num_hidden_layers=plan.bert_layers, num_attention_heads=4,
                        intermediate_size=4 * plan.bert_hidden, max_position_embeddings=plan.bert_seq,
                        hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(seed)
    return BertModel(config, add_pooling_layer=False).eval()


def gpt2(plan: Plan, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return zoo().gpt2().eval()


def model_inputs(name: str, plan: Plan, batch: int) -> dict[str, torch.Tensor]:
    """Fixed inputs: 32x32 RGB images for the ResNet, random tokens for the language models."""
    generator = torch.Generator().manual_seed(1234)
    if name == "resnet":
        return {"x": torch.randn(batch, 3, 32, 32, generator=generator)}
    length = plan.bert_seq if name == "bert" else zoo().SEQ
    return {"input_ids": torch.randint(0, zoo().VOCAB, (batch, length), generator=generator)}


MODELS: dict[str, Callable[[Plan, int], nn.Module]] = {"resnet": resnet, "bert": bert, "gpt2": gpt2}
TIMING_BATCH = 32


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def apply_parameter_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the masked (True) entries of the named parameters, in place."""
    for name, parameter in model.named_parameters():
        if name in masks:
            parameter.masked_fill_(masks[name], 0.0)


@torch.inference_mode()
def outputs_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return zoo().logits_of(model(**inputs)).float()


def output_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Max |difference| relative to the reference's largest magnitude (inf when the shapes differ)."""
    if reference.shape != other.shape:
        return float("inf")
    return float((reference - other).abs().max() / reference.abs().max().clamp_min(1e-12))


def prune_and_shrink(model: nn.Module, example: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, Any]]:
    """Ours, one-shot: every prunable group of `analyze` masked at 50% by group L2 (in place), then shrunk."""
    from lightning_eff.pruning.dependency import analyze
    from lightning_eff.pruning.structured_shrink import group_masks, shrink_groups

    analysis = analyze(model, example)
    masks = group_masks(model, analysis.groups, CHANNEL_SPARSITY, scope="layer")
    apply_parameter_masks(model, masks)
    shrunk, _ = shrink_groups(model, analysis.groups, masks)
    facts = {
        "groups": [f"{g.kind}:{g.size}" for g in analysis.groups],
        "skipped": [f"{s.group.kind}:{s.group.size}: {s.reasons[0][:80]}" for s in analysis.skipped],
    }
    return shrunk.eval(), facts


def cubic_sparsity(target: float, step: int, end: int) -> float:
    return target * (1 - (1 - min(step, end) / end) ** 3)


def digits_images(side: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The digits train and test splits upsampled (bilinear) to side x side, the channel repeated to RGB."""
    data = DigitsDataModule()
    data.setup()

    def images(subset: Any) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, labels = subset.tensors
        pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False)
        return (pixels - 0.5).repeat(1, 3, 1, 1), labels

    return images(data.train_set), images(data.test_set)


def train_digits(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    seed: int,
    masks_at: Callable[[float], dict[str, torch.Tensor]] | None = None,
    update_every: int = 10,
) -> None:
    """AdamW on random batches of 64; with `masks_at`, masks recomputed every `update_every` steps at the cubic
    schedule's sparsity (reaching 50% at 75% of the steps) and applied after every optimizer step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    images, labels = train
    end = max(1, int(PRUNE_FRACTION * steps))
    masks: dict[str, torch.Tensor] = {}
    model.train()
    for step in range(1, steps + 1):
        batch = torch.randint(0, len(labels), (64,), generator=generator)
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if masks_at is not None:
            if step <= end and (step % update_every == 0 or step == end):
                masks = masks_at(cubic_sparsity(1.0, step, end))
            apply_parameter_masks(model, masks)
    model.eval()


@torch.inference_mode()
def images_accuracy(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    images, labels = test
    correct = sum(int((model(images[i : i + 256]).argmax(-1) == labels[i : i + 256]).sum())
                  for i in range(0, len(labels), 256))  # fmt: skip
    return 100 * correct / len(labels)


def structured_accuracy(plan: Plan, seed: int) -> dict[str, Any]:
    """Dense, structured (group masks -> shrink) and unstructured (global magnitude, same nonzero count as the
    shrunk model's parameters) ResNets trained on upsampled digits with the same steps, data order and seed."""
    from lightning_eff.pruning.dependency import analyze
    from lightning_eff.pruning.masks import unstructured_masks
    from lightning_eff.pruning.structured_shrink import group_masks, shrink_groups

    train, test = digits_images(plan.structured_image)
    example = {"x": train[0][:2]}
    accuracy_pct: dict[str, float] = {}
    nonzero: dict[str, int] = {}

    model = resnet(plan, seed)
    train_digits(model, train, plan.structured_steps, seed)
    accuracy_pct["dense"], nonzero["dense"] = images_accuracy(model, test), parameter_count(model)
    progress(f"  dense: {accuracy_pct['dense']:.2f}%")

    model = resnet(plan, seed)
    groups = analyze(model, example).groups
    train_digits(model, train, plan.structured_steps, seed,
                 lambda s: group_masks(model, groups, s * CHANNEL_SPARSITY, scope="layer"))  # fmt: skip
    shrunk, _ = shrink_groups(model, groups, group_masks(model, groups, CHANNEL_SPARSITY, scope="layer"))
    accuracy_pct["structured (masked)"] = images_accuracy(model, test)
    accuracy_pct["structured (shrunk)"] = images_accuracy(shrunk, test)
    nonzero["structured (masked)"] = sum(int(p.count_nonzero()) for p in model.parameters())
    nonzero["structured (shrunk)"] = parameter_count(shrunk)
    with torch.inference_mode():
        difference = output_difference(model(test[0]), shrunk(test[0]))
    progress(f"  structured: {accuracy_pct['structured (shrunk)']:.2f}%")

    model = resnet(plan, seed)
    weights = {n: p for n, p in model.named_parameters() if p.dim() > 1}
    others = parameter_count(model) - sum(p.numel() for p in weights.values())
    sparsity = 1 - (nonzero["structured (shrunk)"] - others) / sum(p.numel() for p in weights.values())

    def unstructured(fraction: float) -> dict[str, torch.Tensor]:
        return unstructured_masks({n: p.detach() for n, p in weights.items()}, fraction * sparsity, "global")

    train_digits(model, train, plan.structured_steps, seed, unstructured)
    accuracy_pct["unstructured"] = images_accuracy(model, test)
    nonzero["unstructured"] = sum(int(p.count_nonzero()) for p in model.parameters())
    progress(f"  unstructured ({sparsity:.1%} of conv/linear weights): {accuracy_pct['unstructured']:.2f}%")
    return {"accuracy_pct": accuracy_pct, "nonzero_parameters": nonzero, "unstructured_weight_sparsity": sparsity,
            "masked_vs_shrunk_difference": difference, "train_images": len(train[1]),
            "test_images": len(test[1])}  # fmt: skip


MASK_SHARE = 0.15  # share of the bytes of a window that are masked and predicted
MASK_TOKEN = 256  # one past the byte values


def masked_windows(data: torch.Tensor, starts: torch.Tensor, seq: int, seed: int) -> TensorDataset:
    """Windows of `seq` bytes at `starts`, `MASK_SHARE` of the positions drawn (seeded) and replaced by
    `MASK_TOKEN`; the targets are the bytes there and -100 (ignored by cross-entropy) elsewhere."""
    windows = data[starts[:, None] + torch.arange(seq)].long()
    masked = torch.rand(windows.shape, generator=torch.Generator().manual_seed(seed)) < MASK_SHARE
    return TensorDataset(windows.masked_fill(masked, MASK_TOKEN), windows.masked_fill(~masked, -100))


def masked_text(plan: Plan, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """The `pydoc_data` help text split as `TextDataModule` splits it: every training batch drawn up front
    (random offsets in the first 90%, so every variant sees the same batches in the same order) and the
    non-overlapping windows of the last 5% as the held-out test set, both masked with fixed seeds."""
    data = corpus_bytes()
    n_train, n_val, _ = split_sizes(len(data), 0.05, 0.05)
    windows = plan.bert_steps * plan.bert_batch
    starts = torch.randint(0, n_train - plan.bert_seq + 1, (windows,), generator=torch.Generator().manual_seed(seed))
    test_starts = torch.arange(n_train + n_val, len(data) - plan.bert_seq + 1, plan.bert_seq)
    return masked_windows(data, starts, plan.bert_seq, seed), masked_windows(data, test_starts, plan.bert_seq, 1234)


class MaskedBytesBert(L.LightningModule):
    """`bert(plan, seed)` over bytes plus a Linear head that predicts the masked bytes: an encoder's task on real
    text, trained by Lightning so GradualPruning prunes it as it would a user's model."""

    def __init__(self, plan: Plan, seed: int) -> None:
        super().__init__()
        self.encoder = bert(plan, seed, vocab_size=MASK_TOKEN + 1)
        self.head = nn.Linear(plan.bert_hidden, MASK_TOKEN)  # initialised from the RNG state `bert` seeded
        self.steps = plan.bert_steps

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids=input_ids).last_hidden_state)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, targets = batch
        return F.cross_entropy(self(tokens).flatten(0, 1), targets.flatten())

    def configure_optimizers(self) -> Any:
        """AdamW at 1e-3, 10% linear warm-up, then linear decay to 0: without warm-up this post-LayerNorm BERT
        stays at predicting the commonest byte (2e-3 does even with it)."""
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=1e-4)
        factor = partial(warmup_then_decay, warm=max(1, self.steps // 10), steps=self.steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def warmup_then_decay(step: int, warm: int, steps: int) -> float:
    return min((step + 1) / warm, max(0.0, (steps - step) / max(1, steps - warm)))


class FixedBatches(L.LightningDataModule):
    """Training batches in the order drawn (`masked_text`), so every variant trains on the same ones."""

    def __init__(self, train: TensorDataset, batch_size: int) -> None:
        super().__init__()
        self.train, self.batch_size = train, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=False)


@torch.inference_mode()
def masked_scores(model: nn.Module, test: TensorDataset) -> tuple[float, float, torch.Tensor]:
    """Accuracy % and mean cross-entropy over the masked bytes of `test`, and all the logits (for comparing)."""
    model.eval()
    logits = torch.cat([model(tokens) for tokens, _ in DataLoader(test, batch_size=128)])
    targets = test.tensors[1]
    chosen = targets != -100
    correct = (logits.argmax(-1) == targets)[chosen].float().mean()
    return 100 * float(correct), float(F.cross_entropy(logits[chosen], targets[chosen])), logits


def bert_text_accuracy(plan: Plan, seed: int) -> dict[str, Any]:
    """Dense, structured (GradualPruning channels at 50%, then `shrink`) and unstructured (GradualPruning global,
    same nonzero count as the shrunk model's parameters) BERTs trained on masked bytes with the same batches."""
    train, test = masked_text(plan, seed)
    update_every = max(1, plan.bert_steps // 40)
    accuracy_pct: dict[str, float] = {}
    loss: dict[str, float] = {}
    nonzero: dict[str, int] = {}
    parameters: dict[str, int] = {}
    fit_s: dict[str, float] = {}

    def train_variant(variant: str, callbacks: list[L.Callback]) -> MaskedBytesBert:
        L.seed_everything(seed, verbose=False)
        model = MaskedBytesBert(plan, seed)
        fit_s[variant] = fit(model, FixedBatches(train, plan.bert_batch), callbacks, max_steps=plan.bert_steps)[1]
        return model

    def score(variant: str, model: nn.Module) -> torch.Tensor:
        accuracy_pct[variant], loss[variant], logits = masked_scores(model, test)
        nonzero[variant] = sum(int(p.count_nonzero()) for p in model.parameters())
        parameters[variant] = parameter_count(model)
        progress(f"  BERT {variant}: {accuracy_pct[variant]:.2f}%, loss {loss[variant]:.4f}")
        return logits

    score("dense", train_variant("dense", []))
    structured = GradualPruning(target_sparsity=CHANNEL_SPARSITY, granularity="channels", scope="layer",
                                update_every=update_every)  # fmt: skip
    model = train_variant("structured", [structured])
    shrunk, _ = structured.shrink(model)
    masked_logits = score("structured (masked)", model)
    shrunk_logits = score("structured (shrunk)", shrunk)
    fit_s["structured (masked)"] = fit_s["structured (shrunk)"] = fit_s.pop("structured")
    assert structured.plan is not None
    groups = [f"{g.kind}:{g.size}" for g in structured.plan.groups]

    # As for the ResNet: the shrunk model's parameters, less the parameters unstructured pruning leaves dense
    # (embeddings, biases, LayerNorms), over the weights it prunes. The word embedding's padding row (byte 0, not
    # in the text) stays zero in every variant, so nonzero counts equal too.
    model = MaskedBytesBert(plan, seed)
    targets = GradualPruning().check_model(model)
    weights = {name for t in targets for name in (t.weight, *t.coupled)}
    total = sum(p.numel() for n, p in model.named_parameters() if n in weights)
    sparsity = 1 - (parameters["structured (shrunk)"] - (parameter_count(model) - total)) / total
    pruner = GradualPruning(target_sparsity=sparsity, update_every=update_every, scope="global")
    score("unstructured", train_variant("unstructured", [pruner]))
    return {"accuracy_pct": accuracy_pct, "loss": loss, "nonzero_parameters": nonzero, "parameters": parameters,
            "fit_s": fit_s,
            "unstructured_weight_sparsity": sparsity, "unstructured_layers": [t.module for t in targets],
            "groups": groups, "masked_vs_shrunk_difference": output_difference(masked_logits, shrunk_logits),
            "train_windows": len(train), "test_windows": len(test), "masked_test_bytes":
            int((test.tensors[1] != -100).sum()), "update_every": update_every}  # fmt: skip


def run_structured(plan: Plan, seed: int) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    speed: dict[str, dict[str, Any]] = {}
    for name in ("resnet", "bert"):
        model = MODELS[name](plan, seed)
        shrunk, facts = prune_and_shrink(model, model_inputs(name, plan, 2))
        inputs = model_inputs(name, plan, TIMING_BATCH)
        difference = output_difference(outputs_of(model, inputs), outputs_of(shrunk, inputs))
        seconds = time_interleaved({"masked": partial(model, **inputs), "shrunk": partial(shrunk, **inputs)},
                                   plan.inference_rounds, plan.inference_iterations // 3 or 1)  # fmt: skip
        speed[name] = {
            "parameters": {"before": parameter_count(model), "after": parameter_count(shrunk)},
            "median_inference_s": {k: median(v) for k, v in seconds.items()},
            "speedup": median(seconds["masked"]) / median(seconds["shrunk"]),
            "max_relative_difference": difference,
            **facts,
        }
        progress(f"  {name}: {speed[name]['speedup']:.2f}x")
    shapes = {"resnet": f"ResNet width {plan.structured_width}, batch {TIMING_BATCH}x3x32x32",
              "bert": f"BERT hidden {plan.bert_hidden}, {plan.bert_layers} layers, intermediate"
                      f" {4 * plan.bert_hidden}, batch {TIMING_BATCH}x{plan.bert_seq}"}  # fmt: skip
    print_table(
        f"6a. structured: {CHANNEL_SPARSITY:.0%} of every dependency-graph group (layer scope, group L2), then"
        f" shrink_groups; CPU inference, 1 thread, {plan.inference_rounds} interleaved rounds",
        ["model", "params before", "params after", "masked ms", "shrunk ms", "speed-up", "max rel diff"],
        [
            [shapes[name], r["parameters"]["before"], r["parameters"]["after"],
             f"{1e3 * r['median_inference_s']['masked']:.2f}", f"{1e3 * r['median_inference_s']['shrunk']:.2f}",
             f"{r['speedup']:.2f}x", f"{r['max_relative_difference']:.1e}"]
            for name, r in speed.items()
        ],
    )  # fmt: skip
    for name, r in speed.items():
        print(f"{name}: groups pruned {r['groups']}; not pruned: {r['skipped']}")
    progress("  training dense, structured and unstructured ResNets on digits")
    trained = structured_accuracy(plan, seed)
    accuracy_pct, nonzero = trained["accuracy_pct"], trained["nonzero_parameters"]
    print_table(
        f"6b. ResNet width {plan.structured_width} on digits upsampled to {plan.structured_image}x"
        f"{plan.structured_image} (RGB by repetition; {trained['train_images']} train, {trained['test_images']}"
        f" test), {plan.structured_steps} AdamW steps of 64 each; pruned variants reach the target cubically by"
        f" {PRUNE_FRACTION:.0%} of the steps, masks after every step",
        ["variant", "nonzero params", "test acc %"],
        [[variant, nonzero[variant], f"{accuracy_pct[variant]:.2f}"] for variant in accuracy_pct],
    )  # fmt: skip
    print(
        f"unstructured: global magnitude over conv/linear weights at {trained['unstructured_weight_sparsity']:.1%},"
        " the share that leaves as many nonzero parameters as the shrunk model has"
    )
    structured = accuracy_pct["structured (shrunk)"]
    progress("  training dense, structured and unstructured BERTs on masked bytes")
    text = bert_text_accuracy(plan, seed)
    print_table(
        f"6c. BERT hidden {plan.bert_hidden}, {plan.bert_layers} layers, + Linear head, masked bytes (15%, one"
        f" [MASK] token) of CPython's pydoc_data help text; {plan.bert_steps} AdamW steps of {plan.bert_batch}x"
        f"{plan.bert_seq} bytes each ({text['train_windows']} windows at random offsets in the first 90%, the same"
        f" for every variant), tested on {text['test_windows']} windows of the last 5% ({text['masked_test_bytes']}"
        f" masked bytes); GradualPruning in the fit, every {text['update_every']} steps, cubic to"
        f" {PRUNE_FRACTION:.0%} of the steps",
        ["variant", "parameters", "nonzero params", "masked-byte acc %", "masked-byte loss", "fit s"],
        [[variant, text["parameters"][variant], text["nonzero_parameters"][variant],
          f"{text['accuracy_pct'][variant]:.2f}", f"{text['loss'][variant]:.4f}", f"{text['fit_s'][variant]:.1f}"]
         for variant in text["accuracy_pct"]],
    )  # fmt: skip
    print(
        f"structured: granularity='channels' at {CHANNEL_SPARSITY:.0%} (layer scope) of the groups {text['groups']},"
        f" then GradualPruning.shrink; unstructured: global magnitude over the Linear weights (head included) at"
        f" {text['unstructured_weight_sparsity']:.1%}, the share that leaves as many nonzero parameters as the"
        f" shrunk model has; max |logit difference| masked vs shrunk: {text['masked_vs_shrunk_difference']:.1e}"
        " of the largest"
    )
    bert_masked, bert_shrunk = text["accuracy_pct"]["structured (masked)"], text["accuracy_pct"]["structured (shrunk)"]
    bert_loss = text["loss"]
    torch.set_num_threads(threads)
    goals = report_goals(
        *[Goal(f"{name}: shrunk at least 1.6x faster than masked at {CHANNEL_SPARSITY:.0%}",
               f"{r['speedup']:.2f}x", r["speedup"] >= 1.6) for name, r in speed.items()],
        Goal("masked and shrunk ResNet: identical test accuracy",
             f"masked {accuracy_pct['structured (masked)']:.2f}, shrunk {structured:.2f}",
             accuracy_pct["structured (masked)"] == structured),
        Goal("masked and shrunk BERT: identical metric (accuracy equal, loss within 1e-4)",
             f"accuracy masked {bert_masked:.2f}, shrunk {bert_shrunk:.2f}; loss masked"
             f" {bert_loss['structured (masked)']:.4f}, shrunk {bert_loss['structured (shrunk)']:.4f}",
             bert_masked == bert_shrunk
             and abs(bert_loss["structured (masked)"] - bert_loss["structured (shrunk)"]) <= 1e-4),
        Goal("BERT structured (shrunk) vs unstructured at equal nonzero parameters (no goal)",
             f"accuracy {bert_shrunk - text['accuracy_pct']['unstructured']:+.2f} points, loss"
             f" {bert_loss['structured (shrunk)'] - bert_loss['unstructured']:+.4f}; dense"
             f" {text['accuracy_pct']['dense']:.2f}%, {bert_loss['dense']:.4f}", None),
    )  # fmt: skip
    return {"speed": speed, **trained, "bert_text": text, "goals": goals}


def torch_pruning_one_shot(
    tp: Any, model: nn.Module, example: dict[str, torch.Tensor], ignored: list[str]
) -> tuple[nn.Module, nn.Module, list[str]]:
    """Torch-Pruning's MagnitudePruner (L1, 50%, one step) on a copy of `model`; the pruned copy, the original
    with the same entries zeroed (its masked version), and the module types whose pruning it could not mirror."""
    pruned, masked = copy.deepcopy(model), copy.deepcopy(model)
    names = {id(module): name for name, module in pruned.named_modules()}
    pruner = tp.pruner.MagnitudePruner(
        pruned, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=CHANNEL_SPARSITY,
        ignored_layers=[pruned.get_submodule(name) for name in ignored],
    )  # fmt: skip
    records = []
    for group in pruner.step(interactive=True):
        for dep, indices in group:
            module = dep.target.module
            if id(module) in names:
                handler = getattr(dep.handler, "__name__", str(dep.handler))
                records.append((names[id(module)], "out" in handler, [int(getattr(i, "idx", i)) for i in indices]))
        group.prune()
    unmirrored = set()
    with torch.no_grad():
        for name, out, indices in records:
            module = masked.get_submodule(name)
            index = torch.tensor(indices, dtype=torch.long)
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                module.weight.index_fill_(0 if out else 1, index, 0.0)
                if out and module.bias is not None:
                    module.bias.index_fill_(0, index, 0.0)
            elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                module.weight.index_fill_(0, index, 0.0)
                module.bias.index_fill_(0, index, 0.0)
            elif isinstance(module, nn.Embedding):
                module.weight.index_fill_(1, index, 0.0)
            else:
                unmirrored.add(type(module).__name__)
    last_norm = [name for name, out, _ in records if isinstance(masked.get_submodule(name), nn.LayerNorm)]
    pruned.kept_output = None  # type: ignore[assignment]
    if last_norm:  # the hidden width was pruned: compare the output columns kept
        gone = {i for name, _, indices in records if name == last_norm[-1] for i in indices}
        width = masked.get_submodule(last_norm[-1]).weight.shape[0]
        pruned.kept_output = torch.tensor([i for i in range(width) if i not in gone])  # type: ignore[assignment]
    return pruned.eval(), masked.eval(), sorted(unmirrored)


def run_torch_pruning(plan: Plan, seed: int) -> dict[str, Any]:
    try:
        import torch_pruning as tp
    except ImportError as error:
        message = f"torch_pruning not importable ({error}); install it with .venv/bin/pip install torch-pruning"
        print(f"\n7. Torch-Pruning comparison: skipped: {message}")
        return {"skipped": message}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    version = getattr(tp, "__version__", "?")
    ignored = {"resnet": ["fc"], "bert": [], "gpt2": ["lm_head"]}
    results: dict[str, dict[str, Any]] = {}
    for name, ignore in ignored.items():
        model = MODELS[name](plan, seed)
        example, inputs = model_inputs(name, plan, 2), model_inputs(name, plan, TIMING_BATCH)
        reference = outputs_of(model, inputs)
        row: dict[str, Any] = {"parameters_before": parameter_count(model)}
        calls: dict[str, Callable[[], object]] = {"dense": partial(model, **inputs)}
        ours_masked = copy.deepcopy(model)
        try:
            ours, _ = prune_and_shrink(ours_masked, example)
            row["ours"] = {"parameters": parameter_count(ours),
                           "masked_vs_pruned": output_difference(outputs_of(ours_masked, inputs),
                                                                 outputs_of(ours, inputs))}  # fmt: skip
            calls["ours"] = partial(ours, **inputs)
        except Exception as error:
            row["ours"] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
        try:
            pruned, masked, unmirrored = torch_pruning_one_shot(tp, model, example, ignore)
            with torch.inference_mode():
                output = outputs_of(pruned, inputs)
            expected = outputs_of(masked, inputs)
            kept = getattr(pruned, "kept_output", None)
            if kept is not None and output.shape[-1] == len(kept):
                expected = expected[..., kept]
            row["torch_pruning"] = {
                "parameters": parameter_count(pruned),
                "output_shape": list(output.shape),
                "dense_output_shape": list(reference.shape),
                "masked_vs_pruned": output_difference(expected, output),
                "unmirrored_modules": unmirrored,
            }
            calls["torch_pruning"] = partial(pruned, **inputs)
        except Exception as error:
            row["torch_pruning"] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
        seconds = time_interleaved(calls, plan.inference_rounds, plan.inference_iterations // 3 or 1)
        for variant in ("ours", "torch_pruning"):
            if variant in calls:
                row[variant]["speedup"] = median(seconds["dense"]) / median(seconds[variant])
        results[name] = row
        progress(f"  {name} done")

    def cells(row: dict[str, Any], variant: str) -> list[str]:
        result = row[variant]
        if "error" in result:
            return ["failed", "-", "-"]
        difference = result["masked_vs_pruned"]
        match = "yes" if difference < 1e-4 else "no (shape)" if difference == float("inf") else "no"
        return [str(result["parameters"]), f"{result['speedup']:.2f}x", f"{match} {difference:.1e}"]

    print_table(
        f"7. one-shot 50%: Torch-Pruning {version} MagnitudePruner (L1, pruning_ratio {CHANNEL_SPARSITY},"
        f" ignored: final classifier) vs ours (analyze + group_masks + shrink_groups); CPU, 1 thread,"
        f" batch {TIMING_BATCH}; 'matches masked': max |pruned - masked| / max |masked| < 1e-4",
        ["model", "params dense", "TP params", "TP speed-up", "TP matches masked", "ours params", "ours speed-up",
         "ours matches masked"],
        [[name, row["parameters_before"], *cells(row, "torch_pruning"), *cells(row, "ours")]
         for name, row in results.items()],
    )  # fmt: skip
    for name, row in results.items():
        for variant in ("torch_pruning", "ours"):
            if "error" in row[variant]:
                print(f"{name}: {variant} failed: {row[variant]['error']}")
        if (
            "output_shape" in row["torch_pruning"]
            and row["torch_pruning"]["output_shape"] != row["torch_pruning"]["dense_output_shape"]
        ):
            print(f"{name}: Torch-Pruning changed the output shape {row['torch_pruning']['dense_output_shape']} ->"
                  f" {row['torch_pruning']['output_shape']} (compared on the output columns it kept)")  # fmt: skip
    ours_exact = all(row["ours"].get("masked_vs_pruned", 1.0) < 1e-4 for row in results.values())
    torch.set_num_threads(threads)
    goals = report_goals(
        Goal("ours: every shrunk model computes what its masked version does",
             ", ".join(f"{n} {r['ours']['masked_vs_pruned']:.1e}" if "masked_vs_pruned" in r["ours"] else f"{n} failed"
                       for n, r in results.items()),
             ours_exact),
    )  # fmt: skip
    return {"torch_pruning_version": version, "models": results, "goals": goals}


def file_bytes(save: Callable[[Path], object]) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "weights.pt"
        save(path)
        return path.stat().st_size


def run_packed(plan: Plan, seed: int) -> dict[str, Any]:
    """File sizes of a digits MLP's state_dict, magnitude-pruned (all Linear weights, global), as saved."""
    from lightning_eff.pruning.masks import unstructured_masks
    from lightning_eff.pruning.sparse_format import load_sparse, save_sparse
    from lightning_eff.quantization import SCHEMES, convert
    from lightning_eff.quantization.prepare import swap_in_fake_quantized

    torch.manual_seed(seed)
    base = DigitsMLP(hidden_sizes=[plan.packed_width, plan.packed_width]).net
    rows, results = [], {}
    for sparsity in (0.0, 0.5, 0.8, 0.9):
        model = copy.deepcopy(base)
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        weights = {f"{n}.weight": model.get_submodule(n).weight.detach() for n in linears}
        apply_parameter_masks(model, unstructured_masks(weights, sparsity, "global"))
        converted = {}
        for kind, scheme, group_size in (("int8", "int8_weight_only", 128), ("int4", "int4_weight_only", 32)):
            quantized = copy.deepcopy(model)
            swap_in_fake_quantized(quantized, linears, SCHEMES[scheme], group_size)
            converted[kind] = convert(quantized)
        entry: dict[str, Any] = {}
        for kind, module in (("fp32", model), *converted.items()):
            state = module.state_dict()
            dense = file_bytes(lambda path, state=state: torch.save(state, path))
            packed = file_bytes(lambda path, state=state: save_sparse(state, path))
            with tempfile.TemporaryDirectory() as folder:
                restored = load_sparse(save_sparse(state, Path(folder) / "w.pt"))
            exact = all(torch.equal(restored[k], v) for k, v in state.items() if isinstance(v, torch.Tensor))
            entry[kind] = {"dense_bytes": dense, "packed_bytes": packed, "ratio": packed / dense, "round_trip": exact}
        results[f"{sparsity:.0%}"] = entry
        rows.append([f"{sparsity:.0%}",
                     *[value for kind in ("fp32", "int8", "int4") for value in
                       (entry[kind]["dense_bytes"], entry[kind]["packed_bytes"], f"{entry[kind]['ratio']:.3f}")],
                     "yes" if all(e["round_trip"] for e in entry.values()) else "NO"])  # fmt: skip
    parameters = parameter_count(base)
    print_table(
        f"8. packed files: digits MLP [{plan.packed_width}, {plan.packed_width}] ({parameters} parameters),"
        " global magnitude pruning of the Linear weights; torch.save(state_dict) vs save_sparse; int8 ="
        " int8_weight_only converted (group 128), int4 = int4_weight_only converted (group 32, two weights a byte)",
        ["sparsity", *[f"{kind} {what}" for kind in ("fp32", "int8", "int4")
                       for what in ("torch.save B", "packed B", "ratio")], "exact round trip"],
        rows,
    )  # fmt: skip
    goals = report_goals(
        *[Goal(f"fp32 packed at {s} sparsity at most (1 - sparsity) + 1/32 + 0.02 of torch.save",
               f"{results[s]['fp32']['ratio']:.3f}", results[s]["fp32"]["ratio"] <= 1 - int(s[:-1]) / 100 + 1 / 32
               + 0.02) for s in ("50%", "80%", "90%")],
        Goal("int4 packed at 90% sparsity at most half of its torch.save (a byte is zero when both its weights"
             " are: 81% of bytes; bitmap 1/8; the fp32 scales stay dense)", f"{results['90%']['int4']['ratio']:.3f}",
             results["90%"]["int4"]["ratio"] <= 0.5),
        Goal("every packed file loads back exactly", "",
             all(e[k]["round_trip"] for e in results.values() for k in ("fp32", "int8", "int4"))),
    )  # fmt: skip
    return {"parameters": parameters, "files": results, "goals": goals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run (under a minute)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds for parts 1 and 2 (default 3, quick 1)")
    parser.add_argument("--json", type=str, default=None, help="write the results here as JSON")
    parser.add_argument("--only", type=str, default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--gpt-steps", type=int, default=None, help="training steps of part 2 (default 600)")
    args = parser.parse_args()
    parts = parse_choices(args.only, PARTS, "--only", parser)
    plan = QUICK if args.quick else FULL
    if args.gpt_steps is not None:
        plan = dataclasses.replace(plan, gpt_steps=args.gpt_steps)
    seeds = list(range(args.seeds if args.seeds is not None else plan.seeds))
    quiet_lightning()

    command, machine = command_line(), machine_facts(f"{torch.get_num_threads()} torch threads")
    print(f"command: {command}\nmachine: {machine}\nplan: {'quick' if args.quick else 'full'}, seeds {seeds}")
    report: dict[str, Any] = {"command": command, "machine": machine, "plan": asdict(plan), "seeds": seeds}
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "mlp": lambda: run_mlp(plan, seeds),
        "gpt": lambda: run_gpt(plan, seeds),
        "overhead": lambda: run_overhead(plan),
        "channels": lambda: run_channels(plan, seeds[0] if seeds else 0),
        "gpu": lambda: run_gpu(plan, seeds[0] if seeds else 0),
        "structured": lambda: run_structured(plan, seeds[0] if seeds else 0),
        "torch_pruning": lambda: run_torch_pruning(plan, seeds[0] if seeds else 0),
        "packed": lambda: run_packed(plan, seeds[0] if seeds else 0),
    }
    run_parts({part: run for part, run in runs.items() if part in parts}, report, lambda: write_json(args.json, report))
    finish(report, args.json)


if __name__ == "__main__":
    main()

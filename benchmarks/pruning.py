"""GradualPruning vs Lightning's ModelPruning: quality at equal sparsity, step-time overhead, real speed-ups.

Both pruners run on the same model, data, steps and seed in one process; each part prints a table:

1. ``mlp``: digits MLP at 90% sparsity: test accuracy and achieved sparsity of dense, ModelPruning, ours.
2. ``gpt``: TinyGPT on the text task at 80% sparsity: validation loss of the three.
3. ``overhead``: median training-step time with no pruning, ModelPruning and ours, interleaved in rounds.
4. ``channels``: channel pruning at 50% then `shrink`: CPU inference speed and accuracy, masked vs shrunk.
5. ``gpu``: 2:4 pruning then torchao's semi-structured kernels vs dense (only with a CUDA device).

ModelPruning gets every advantage the callback offers: L1 unstructured, global, the same Linear weights,
a per-epoch amount that follows the same cubic schedule and ends exactly at the target, no lottery-ticket
reset, and its reparametrization removed at the end of fit before sparsity is counted.

Usage:
    python benchmarks/pruning.py [--quick] [--seeds N] [--json PATH] [--only mlp,gpt,overhead,channels,gpu]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import lightning as L
import torch
from harness import (
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
from torch.utils.data import DataLoader

from lightning_eff.pruning import GradualPruning, shrink
from lightning_eff.pruning.masks import zero_fraction
from lightning_eff.tasks import DigitsDataModule, DigitsMLP, TextDataModule, TinyGPT

PARTS = ("mlp", "gpt", "overhead", "channels", "gpu")
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
    shrunk = shrink(model).eval()
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
    }
    run_parts({part: run for part, run in runs.items() if part in parts}, report, lambda: write_json(args.json, report))
    finish(report, args.json)


if __name__ == "__main__":
    main()

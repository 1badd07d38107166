"""QuantizationAwareTraining vs post-training quantization and torchao: accuracy, step time, size, CPU speed.

lightning_eff and its peers run side by side in one process, on the same models, data, seeds and steps:

1. ``accuracy``: TinyGPT on the text task (the app's `text_gpt` model and data: 2 layers, d=128, seq 128,
   batch 32; 1200 steps where the app runs 300, see below) and a Linear-heavy digits MLP [1024, 1024] (400
   steps, the app's 20 epochs). Test loss (and bits per byte, or accuracy) of: float training; PTQ of that
   float model (`select_layers` + `swap_in_fake_quantized`, then `convert`); QAT with
   `QuantizationAwareTraining(scheme, start_step=...)`: its converted `quantized_model` and its fake-quantized
   training model. Same total steps for float and QAT. "recovery" = (PTQ loss - QAT loss) / (PTQ loss - float
   loss), the share of the PTQ degradation that QAT wins back. A control run (the float run's last 40% again,
   from the same checkpoint, in another data order) gives the noise floor: how far the final loss moves when
   only the trajectory changes. A recovery counts only where PTQ costs at least 3x that noise.
2. ``step_time``: median training-step time (forward, backward, AdamW) of the TinyGPT on one fixed batch
   (32x128): float, ours (`FakeQuantizedLinear` in its fake-quant phase, as the callback swaps it in) and
   torchao's QAT (`quantize_(model, QATConfig(scheme.torchao_config(32), step="prepare"))`) on the same layers;
   eager, and also under torch.compile with ``--compile`` (a few minutes more: 9 models to compile).
3. ``inference``: bytes of the converted weights and of the whole state_dict vs fp32, and median CPU inference
   time of the fp32 model (part 1's float model, seed 0), our converted model, torchao's PTQ model
   (`quantize_(copy, scheme.torchao_config(32))`) and ours written by `save_quantized` and read back by
   `load_quantized` (a `torch.export` program); GPT batch 32x128, digits batch 1024.
4. ``gpu``: an 8-layer, d=1024 GPT (seq 1024, batch 8, bf16 autocast, fused AdamW): step time of torchao's QAT
   int8-dyn-act/int4-weight and of ours vs float, eager and compiled. Only with a CUDA device.
5. ``cnn``: (a) median CPU inference time and bytes on disk (torch.save of the state_dict) of the zoo ResNet
   (`tests/zoo/models.py`, width 32, batch 32 of 32x32 images): fp32 eager, fp32 with BatchNorm fused
   (`torch.fx.experimental.optimization.fuse`, the fair float baseline), ours converted in each scheme (int8
   per-channel convs, BN folded; the dynamic schemes round each conv input to uint8 with one scale and
   convolve in oneDNN's int8 kernel, the weight-only ones dequantize once and convolve in fp32, about fp32's
   speed), torchao's PTQ (`quantize_` on every Conv2d
   and Linear; the configs it refuses on convs are printed with their error) and, as the reference of what a
   real int8 conv kernel gives on this CPU, torch.ao's static x86 int8 path (FX graph mode: conv+bn+relu fused,
   8 calibration batches). (b) PTQ vs QAT on digits: a width-16 ResNet on digits upsampled to 16x16, 400
   float steps; PTQ of that model; QAT (`QuantizationAwareTraining`) and a float control each continue it for
   150 steps; test loss and accuracy, recovered = (PTQ - QAT) / (PTQ - float), undetermined ("nothing to
   recover") where PTQ costs less than 3x |control - float|.
6. ``gpt2``: an HF GPT2LMHeadModel (n_embd 256, 4 layers, vocab 512; batch 8 x 128 tokens) converted in each
   scheme vs fp32 vs torchao's PTQ (of the same layers, HF Conv1Ds rewritten as nn.Linear: torchao quantizes
   Linears only; also `Int8DynamicActivationInt8WeightConfig`): median CPU inference time and bytes on disk;
   then the top 8 ops by self CPU time (`torch.profiler`) of fp32 and of ours int8_dynamic.

Why 1200 GPT steps: at the app's 300 steps (test loss 1.75) PTQ costs the int4 schemes 0.0014 nats, well
below the seed-to-seed spread of the float loss (0.011, 2 seeds), so no recovery can be measured
(``--gpt-steps 300`` shows it). At 1200 steps (loss 1.25) PTQ costs 0.012 nats. One seed by default, because
a 1200-step seed takes about 10 minutes here; ``--seeds 3`` takes about 30.

QAT recipe: train in float, then fake-quantize the last 40% of the steps (``--qat-start 0.6``), the usual
fine-tuning recipe. Tried at 1200 steps, seed 0: the last 40% recovered 181% (int8-dyn-act/int4) and 182%
(int4 weight-only), the last 20% 74% and 103%; at 300 steps fake quantization from 30% of the steps ended
worse than PTQ (it slows learning more than it fixes rounding in a model this far from converged). The float
phase of a QAT run is the float run's first steps, bit for bit, so each QAT run resumes from the float run's
checkpoint at `start_step` (the callback's own resume path, checked to give identical results) instead of
training them again. Every Linear but the output head is quantized (the callback's default), int4 schemes with
groups of 32.

Threads: one (``--threads 1``, the default) in every part. This 2-core machine is shared: with 2 threads a GPT
step took 0.10 s in one run and 1.5 s in the next (another process had started), with 1 thread 0.14 s in the
runs around them. Times are medians of interleaved rounds (every variant runs in every round), so machine
noise hits all of them alike. The default run takes about 10 minutes here (parts 1-3; parts 5 and 6 add about
2.5 minutes), ``--quick`` about 30 s (5 and 6: 10 s); ``--only gpu`` runs part 4 alone (on a GPU machine).

Usage:
    python benchmarks/quantization.py [--quick] [--seeds N] [--schemes a,b] [--gpt-steps N] [--qat-start F]
                                      [--threads N] [--compile]
                                      [--only accuracy,step_time,inference,gpu,cnn,gpt2]
                                      [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import io
import math
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
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
from torch import nn
from torch.nn import functional as F

from lightning_eff.quantization import SCHEMES, QuantizationAwareTraining, QuantScheme, convert
from lightning_eff.quantization.convert import quantized_layers, weight_bytes
from lightning_eff.quantization.export import load_quantized, save_quantized
from lightning_eff.quantization.prepare import plan_layers, select_layers, swap_in_fake_quantized
from lightning_eff.tasks import DigitsDataModule, DigitsMLP, TextDataModule, TinyGPT

PARTS = ("accuracy", "step_time", "inference", "gpu", "cnn", "gpt2")
TASKS = ("gpt", "digits")
GROUP_SIZE = 32
INT4_SCHEMES = ("int8_dynamic_act_int4_weight", "int4_weight_only")
GPU_SCHEME = "int8_dynamic_act_int4_weight"
RECOVERY_GOAL = 0.60
SPEEDUP_GOAL = 2.0
GPU_EAGER_GOAL, GPU_COMPILED_GOAL = 1.5, 1.10
CONTROL_SEED_OFFSET = 1000
NOISE_MARGIN = 3  # a recovery counts only where PTQ costs at least this many times the control's noise


@dataclass(frozen=True)
class Plan:
    """Sizes of one run; `--quick` shrinks every part but runs every CPU code path."""

    seeds: int
    gpt_steps: int
    gpt_seq_len: int
    gpt_batch_size: int
    gpt_max_bytes: int | None
    digits_hidden: tuple[int, ...]
    digits_steps: int
    digits_inference_batch: int
    step_rounds: int
    step_iterations: int  # per variant and round
    inference_rounds: int
    inference_iterations: int
    gpu_layers: int
    gpu_d_model: int
    gpu_seq_len: int
    gpu_batch_size: int
    gpu_rounds: int
    gpu_iterations: int
    cnn_width: int  # zoo ResNet base width, timed on cnn_batch x 3 x cnn_image x cnn_image
    cnn_image: int
    cnn_batch: int
    cnn_rounds: int
    cnn_iterations: int
    cnn_calibration_batches: int  # torch.ao's static int8 reference: observer batches
    digits_cnn_width: int  # the ResNet trained on digits (upsampled to digits_cnn_image) for the PTQ/QAT part
    digits_cnn_image: int
    digits_cnn_steps: int  # float training
    digits_cnn_qat_steps: int  # then QAT (and the float control) from that checkpoint
    gpt2_embd: int
    gpt2_layers: int
    gpt2_vocab: int
    gpt2_seq: int
    gpt2_batch: int
    gpt2_rounds: int
    gpt2_iterations: int
    profile_iterations: int


FULL = Plan(
    seeds=1,
    gpt_steps=1200,
    gpt_seq_len=128,
    gpt_batch_size=32,
    gpt_max_bytes=None,
    digits_hidden=(1024, 1024),
    digits_steps=400,
    digits_inference_batch=1024,
    step_rounds=5,
    step_iterations=3,
    inference_rounds=5,
    inference_iterations=4,
    gpu_layers=8,
    gpu_d_model=1024,
    gpu_seq_len=1024,
    gpu_batch_size=8,
    gpu_rounds=5,
    gpu_iterations=10,
    cnn_width=32,
    cnn_image=32,
    cnn_batch=32,
    cnn_rounds=7,
    cnn_iterations=3,
    cnn_calibration_batches=8,
    digits_cnn_width=16,
    digits_cnn_image=16,
    digits_cnn_steps=400,
    digits_cnn_qat_steps=150,
    gpt2_embd=256,
    gpt2_layers=4,
    gpt2_vocab=512,
    gpt2_seq=128,
    gpt2_batch=8,
    gpt2_rounds=7,
    gpt2_iterations=3,
    profile_iterations=5,
)
QUICK = Plan(
    seeds=1,
    gpt_steps=30,
    gpt_seq_len=64,
    gpt_batch_size=16,
    gpt_max_bytes=100_000,
    digits_hidden=(1024, 1024),
    digits_steps=40,
    digits_inference_batch=256,
    step_rounds=2,
    step_iterations=2,
    inference_rounds=2,
    inference_iterations=2,
    gpu_layers=2,
    gpu_d_model=256,
    gpu_seq_len=256,
    gpu_batch_size=4,
    gpu_rounds=2,
    gpu_iterations=3,
    cnn_width=16,
    cnn_image=16,
    cnn_batch=8,
    cnn_rounds=2,
    cnn_iterations=2,
    cnn_calibration_batches=2,
    digits_cnn_width=8,
    digits_cnn_image=8,
    digits_cnn_steps=30,
    digits_cnn_qat_steps=10,
    gpt2_embd=64,
    gpt2_layers=2,
    gpt2_vocab=128,
    gpt2_seq=32,
    gpt2_batch=2,
    gpt2_rounds=2,
    gpt2_iterations=2,
    profile_iterations=2,
)


# --- models, data, training ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A model and its data, built afresh for each run so every run starts from the same seed."""

    name: str
    title: str
    steps: int
    build_model: Callable[[], L.LightningModule]
    build_data: Callable[[], L.LightningDataModule]
    text: bool  # next-byte prediction (bits per byte) rather than classification (accuracy)


def tasks(plan: Plan) -> dict[str, Task]:
    gpt = Task(
        name="gpt",
        title=f"TinyGPT (2 layers, d=128, seq {plan.gpt_seq_len}, batch {plan.gpt_batch_size}), {plan.gpt_steps} steps",
        steps=plan.gpt_steps,
        build_model=lambda: TinyGPT(n_layer=2, n_head=4, d_model=128, seq_len=plan.gpt_seq_len),
        build_data=lambda: TextDataModule(
            seq_len=plan.gpt_seq_len, batch_size=plan.gpt_batch_size, max_bytes=plan.gpt_max_bytes
        ),
        text=True,
    )
    digits = Task(
        name="digits",
        title=f"digits MLP {list(plan.digits_hidden)} (batch 64), {plan.digits_steps} steps",
        steps=plan.digits_steps,
        build_model=lambda: DigitsMLP(hidden_sizes=list(plan.digits_hidden)),
        build_data=DigitsDataModule,
        text=False,
    )
    return {"gpt": gpt, "digits": digits}


@torch.inference_mode()
def test_scores(model: nn.Module, data: L.LightningDataModule, text: bool) -> dict[str, float]:
    """Mean cross-entropy over every test target, and bits per byte (text) or accuracy in % (digits).

    A plain loop rather than `measure.test_metrics`: it also scores torchao's models and the reloaded
    `torch.export` program, which are not LightningModules. Models are put in eval mode by the caller
    (an exported program refuses `.eval()`).
    """
    loss_sum, correct, count = 0.0, 0, 0
    for inputs, targets in data.test_dataloader():
        logits = model(inputs).float()
        loss_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        correct += int((logits.argmax(-1) == targets).sum())
        count += targets.numel()
    loss = loss_sum / count
    if text:
        return {"loss": loss, "bits_per_byte": loss / math.log(2)}
    return {"loss": loss, "accuracy_pct": 100 * correct / count}


def fake_quantized_copy(model: nn.Module, scheme: QuantScheme) -> nn.Module:
    """A copy of `model` with the callback's default layers swapped for fake-quantized ones (fake-quant on)."""
    copied = copy.deepcopy(model)
    swap_in_fake_quantized(copied, select_layers(copied, scheme, GROUP_SIZE), scheme, GROUP_SIZE)
    return copied


def torchao_filter(model: nn.Module, scheme: QuantScheme) -> Callable[[nn.Module, str], bool]:
    """torchao's `filter_fn` for the Linear layers our callback quantizes (every one but the head; torchao's
    configs take Linears only, so the embeddings our callback also quantizes stay float on its side)."""
    names = set(select_layers(model, scheme, GROUP_SIZE))
    return lambda module, fqn: fqn in names and isinstance(module, nn.Linear)


def torchao_quantized(model: nn.Module, scheme: QuantScheme) -> nn.Module:
    """torchao's post-training quantization of a copy of `model`, with the same scheme and layers as ours."""
    from torchao.quantization import quantize_

    copied = copy.deepcopy(model).eval()
    quantize_(copied, scheme.torchao_config(GROUP_SIZE), filter_fn=torchao_filter(copied, scheme))
    return copied


def torchao_qat_prepared(model: nn.Module, scheme: QuantScheme) -> nn.Module:
    """`model` with torchao's fake-quantized Linears (QATConfig prepare step) on our callback's layers."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(
        model, QATConfig(scheme.torchao_config(GROUP_SIZE), step="prepare"), filter_fn=torchao_filter(model, scheme)
    )
    return model


# --- 1. accuracy ---------------------------------------------------------------------------------------


def recovery(float_loss: float, ptq_loss: float, qat_loss: float) -> float:
    """Share of the PTQ degradation that QAT wins back (1 = QAT as good as float; > 1 = better than float)."""
    degradation = ptq_loss - float_loss
    return (ptq_loss - qat_loss) / degradation if degradation else math.nan


def run_task_accuracy(
    task: Task, schemes: Sequence[QuantScheme], seeds: Sequence[int], start_step: int, workdir: Path
) -> tuple[dict[str, Any], nn.Module]:
    """Float, PTQ and QAT scores of every scheme for every seed; also the seed-0 float model (for part 3)."""
    scores: dict[str, Any] = {
        "float": [],
        "control": [],
        **{s.name: {"ptq": [], "qat": [], "qat_fake_quant": []} for s in schemes},
    }
    first_float: nn.Module | None = None
    for seed in seeds:
        checkpoint = workdir / f"{task.name}-seed{seed}-step{start_step}.ckpt"
        L.seed_everything(seed, verbose=False)
        model, data = task.build_model(), task.build_data()
        save = [StepRecorder(checkpoint=(start_step, checkpoint))] if start_step else []  # where QAT takes over
        fit(model, data, save, max_steps=task.steps)
        model.eval()
        scores["float"].append(test_scores(model, data, task.text))
        if first_float is None:
            first_float = model
        L.seed_everything(seed, verbose=False)
        control = task.build_model()
        torch.manual_seed(seed + CONTROL_SEED_OFFSET)  # the DataModule takes its shuffle seed from here
        control_data = task.build_data()
        fit(control, control_data, [], checkpoint if start_step else None, max_steps=task.steps)
        scores["control"].append(test_scores(control.eval(), control_data, task.text))
        progress(
            f"  {task.name} seed {seed} float: test loss {scores['float'][-1]['loss']:.4f},"
            f" control {scores['control'][-1]['loss']:.4f}"
        )
        for scheme in schemes:
            ptq = convert(fake_quantized_copy(model, scheme))
            scores[scheme.name]["ptq"].append(test_scores(ptq, data, task.text))
            L.seed_everything(seed, verbose=False)
            qat_model, qat_data = task.build_model(), task.build_data()
            callback = QuantizationAwareTraining(scheme.name, group_size=GROUP_SIZE, start_step=start_step)
            fit(qat_model, qat_data, [callback], checkpoint if start_step else None, max_steps=task.steps)
            if callback.phase != "fake_quant" or callback.quantized_model is None:
                raise RuntimeError(f"QAT run of {scheme.name} ended in phase {callback.phase}, not converted")
            scores[scheme.name]["qat"].append(test_scores(callback.quantized_model, qat_data, task.text))
            scores[scheme.name]["qat_fake_quant"].append(test_scores(qat_model.eval(), qat_data, task.text))
            progress(
                f"  {task.name} seed {seed} {scheme.name}: PTQ {scores[scheme.name]['ptq'][-1]['loss']:.4f},"
                f" QAT {scores[scheme.name]['qat'][-1]['loss']:.4f}"
            )
        checkpoint.unlink(missing_ok=True)
    assert first_float is not None
    return scores, first_float


def summarize_accuracy(
    task: Task, schemes: Sequence[QuantScheme], scores: dict[str, Any], start_step: int, label: str
) -> dict[str, Any]:
    """Medians over seeds of each loss, of the degradations and of the per-seed recoveries; prints the table.

    The control (the float run's last steps again, from the same checkpoint, in another data order) measures
    how far the final loss moves from a changed trajectory alone: QAT changes the trajectory too, so a PTQ
    degradation within a few times that noise leaves the recovery undetermined, and it is flagged so.
    """
    float_losses = [s["loss"] for s in scores["float"]]
    control_losses = [s["loss"] for s in scores["control"]]
    noise = median([abs(c - f) for c, f in zip(control_losses, float_losses, strict=True)])
    extra = "bits_per_byte" if task.text else "accuracy_pct"
    extra_label = "bpb" if task.text else "acc %"
    float_extra = median([s[extra] for s in scores["float"]])
    rows, summary = [], {}
    for scheme in schemes:
        runs = scores[scheme.name]
        ptq, qat, fake = ([s["loss"] for s in runs[key]] for key in ("ptq", "qat", "qat_fake_quant"))
        per_seed = [recovery(f, p, q) for f, p, q in zip(float_losses, ptq, qat, strict=True)]
        degradation = median([p - f for p, f in zip(ptq, float_losses, strict=True)])
        entry: dict[str, Any] = {
            "float_loss": median(float_losses),
            "ptq_loss": median(ptq),
            "qat_loss": median(qat),
            "qat_fake_quant_loss": median(fake),
            "ptq_degradation": degradation,
            "qat_degradation": median([q - f for q, f in zip(qat, float_losses, strict=True)]),
            "recovery": median(per_seed),
            "recovery_per_seed": per_seed,
            "noise_floor": noise,
            "recovery_uncertainty": noise / degradation if degradation > 0 else None,
            "measurable": degradation >= NOISE_MARGIN * noise,
            f"float_{extra}": float_extra,
            f"ptq_{extra}": median([s[extra] for s in runs["ptq"]]),
            f"qat_{extra}": median([s[extra] for s in runs["qat"]]),
        }
        summary[scheme.name] = entry
        spread = entry["recovery_uncertainty"]
        uncertainty = "-" if spread is None else f"+-{spread:.0%}" if spread < 10 else "> +-999%"
        rows.append([
            scheme.name, f"{entry['float_loss']:.4f}", f"{entry['ptq_loss']:.4f}", f"{entry['qat_loss']:.4f}",
            f"{entry['qat_fake_quant_loss']:.4f}", f"{degradation:+.4f}", f"{entry['qat_degradation']:+.4f}",
            f"{entry['recovery']:.0%}" if entry["measurable"] else f"noise ({entry['recovery']:.0%})", uncertainty,
            " ".join(f"{r:.0%}" for r in per_seed), f"{entry[f'float_{extra}']:.3f}",
            f"{entry[f'ptq_{extra}']:.3f}", f"{entry[f'qat_{extra}']:.3f}",
        ])  # fmt: skip
    header = [
        "scheme", "float loss", "PTQ loss", "QAT loss", "QAT fake-q", "PTQ-float", "QAT-float", "recovery", "+-noise",
        "per seed", f"float {extra_label}", f"PTQ {extra_label}", f"QAT {extra_label}",
    ]  # fmt: skip
    print_table(
        f"{label}. {task.title}, fake quantization from step {start_step}: test set, medians over"
        f" {len(float_losses)} seed(s)",
        header,
        rows,
    )
    print(
        f"float test loss per seed: {' '.join(f'{x:.4f}' for x in float_losses)}; control (steps {start_step}-"
        f"{task.steps} again in another data order): {' '.join(f'{c:.4f}' for c in control_losses)},"
        f" noise floor |control - float| = {noise:.4f}.\nQAT loss: the converted model; QAT fake-q: the training"
        f" model. +-noise = noise floor / (PTQ - float); recovery is 'noise' where PTQ - float < {NOISE_MARGIN}x"
        " the noise floor"
    )
    return summary


def run_accuracy(
    plan: Plan, schemes: Sequence[QuantScheme], seeds: Sequence[int], qat_start: float
) -> tuple[dict[str, Any], dict[str, nn.Module]]:
    results: dict[str, Any] = {"qat_start_fraction": qat_start}
    trained: dict[str, nn.Module] = {}
    print(
        f"\n1. accuracy: float vs PTQ vs QAT, fake quantization from {qat_start:.0%} of the steps,"
        f" group size {GROUP_SIZE}, every Linear but the head quantized"
    )
    with tempfile.TemporaryDirectory(prefix="qat-bench-") as workdir:
        for label, (name, task) in zip(("1a", "1b"), tasks(plan).items(), strict=True):
            start_step = round(qat_start * task.steps)
            scores, trained[name] = run_task_accuracy(task, schemes, seeds, start_step, Path(workdir))
            results[name] = {
                "start_step": start_step,
                "scores": scores,
                "summary": summarize_accuracy(task, schemes, scores, start_step, label),
            }
    return results, trained


# --- 2. training step time -----------------------------------------------------------------------------


def training_step(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, compiled: bool) -> Callable[[], None]:
    """One forward, backward and AdamW step of `model` on a fixed batch, as a closure."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compiled else model

    def step() -> None:
        logits = forward(tokens)
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def qat_variants(
    build: Callable[[], nn.Module], schemes: Sequence[QuantScheme]
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Float, ours and torchao's QAT models of the same weights; torchao's refusals by variant name."""
    models: dict[str, nn.Module] = {"float": build()}
    refused: dict[str, str] = {}
    for scheme in schemes:
        ours = build()
        swap_in_fake_quantized(ours, select_layers(ours, scheme, GROUP_SIZE), scheme, GROUP_SIZE)
        models[f"ours {scheme.name}"] = ours
        try:
            models[f"torchao {scheme.name}"] = torchao_qat_prepared(build(), scheme)
        except Exception as error:  # a config QATConfig refuses is a result, printed as such
            refused[f"torchao {scheme.name}"] = f"{type(error).__name__}: {error}"
    return models, refused


def ratio_rows(
    seconds: dict[str, list[float]], refused: dict[str, str], schemes: Sequence[QuantScheme]
) -> list[list[str]]:
    """Rows of scheme, median ms and ratio to float of ours and torchao."""
    base = median(seconds["float"])
    rows = [["float", "-", f"{1e3 * base:.1f}", "1.00x", "-", "-"]]
    for scheme in schemes:
        ours = median(seconds[f"ours {scheme.name}"])
        peer_name = f"torchao {scheme.name}"
        peer = (
            [f"{1e3 * median(seconds[peer_name]):.1f}", f"{median(seconds[peer_name]) / base:.2f}x"]
            if (peer_name in seconds)
            else ["refused", "refused"]
        )
        rows.append(
            [scheme.name, str(len(seconds[f"ours {scheme.name}"])), f"{1e3 * ours:.1f}", f"{ours / base:.2f}x", *peer]
        )
    return rows


def run_step_time(plan: Plan, schemes: Sequence[QuantScheme], compile_too: bool) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    data = TextDataModule(seq_len=plan.gpt_seq_len, batch_size=plan.gpt_batch_size, max_bytes=plan.gpt_max_bytes)
    data.setup("fit")
    tokens, targets = next(iter(data.train_dataloader()))

    def build() -> nn.Module:
        torch.manual_seed(0)
        return TinyGPT(n_layer=2, n_head=4, d_model=128, seq_len=plan.gpt_seq_len)

    models, refused = qat_variants(build, schemes)
    for name, error in refused.items():
        print(f"{name}: refused: {error}")
    results: dict[str, Any] = {"refused": refused, "batch": list(tokens.shape)}
    modes = ["eager", "compiled"] if compile_too else ["eager"]
    if compile_too:
        torch._dynamo.config.recompile_limit = 64  # one compiled TinyGPT per variant, all alive at once
    for mode in modes:
        progress(f"  step time, {mode}: {len(models)} variants")
        calls = {name: training_step(model, tokens, targets, mode == "compiled") for name, model in models.items()}
        seconds = time_interleaved(
            calls, plan.step_rounds, plan.step_iterations, warmup=3 if mode == "compiled" else 1, inference=False
        )
        print_table(
            f"2. training step time on the CPU ({mode}), TinyGPT 2 layers d=128, fixed batch"
            f" {tuple(tokens.shape)}, forward+backward+AdamW, {plan.step_rounds} interleaved rounds",
            ["scheme", "steps", "ours ms", "ours/float", "torchao ms", "torchao/float"],
            ratio_rows(seconds, refused, schemes),
        )
        results[mode] = {name: median(values) for name, values in seconds.items()}
    return results


# --- 3. size and inference -----------------------------------------------------------------------------


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of `torch.save(model.state_dict())`: what a checkpoint of the model takes, torchao's subclasses too."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def bf16_cache_bytes(model: nn.Module) -> int:
    """Bytes of the bf16 weights our converted layers cache in memory after an eager forward (never saved)."""
    caches = [getattr(layer, "_bf16_weight", None) for layer in quantized_layers(model).values()]
    return sum(c.numel() * c.element_size() for c in caches if c is not None)


def inference_input(task: Task, data: L.LightningDataModule, plan: Plan) -> torch.Tensor:
    """GPT: one test batch of windows; digits: `digits_inference_batch` training images (the test set is smaller)."""
    if task.text:
        return next(iter(data.test_dataloader()))[0]
    assert isinstance(data, DigitsDataModule) and data.train_set is not None
    return data.train_set.tensors[0][: plan.digits_inference_batch]  # type: ignore[attr-defined]


def run_task_inference(
    task: Task, float_model: nn.Module, schemes: Sequence[QuantScheme], plan: Plan, workdir: Path
) -> dict[str, Any]:
    data = task.build_data()
    data.setup("fit")
    example = inference_input(task, data, plan)
    float_model = float_model.eval()
    models: dict[str, nn.Module] = {"fp32": float_model}
    sizes: dict[str, dict[str, float]] = {}
    fp32_bytes = serialized_bytes(float_model)
    for scheme in schemes:
        ours = convert(fake_quantized_copy(float_model, scheme))
        path = save_quantized(ours, workdir / f"{task.name}-{scheme.name}.pt2", (example,))
        models[f"ours {scheme.name}"] = ours
        models[f"ours reloaded {scheme.name}"] = load_quantized(path)
        models[f"torchao {scheme.name}"] = torchao_quantized(float_model, scheme)
        with torch.inference_mode():
            ours(example)  # builds the eager bf16 cache, counted below
        stored, fp32 = weight_bytes(ours)
        sizes[scheme.name] = {
            "weight_bytes": stored,
            "weight_bytes_fp32": fp32,
            "weight_ratio": stored / fp32,
            "state_dict_bytes_fp32": fp32_bytes,
            "state_dict_bytes_ours": serialized_bytes(ours),
            "state_dict_bytes_torchao": serialized_bytes(models[f"torchao {scheme.name}"]),
            "pt2_file_bytes": path.stat().st_size,
            "bf16_cache_bytes": bf16_cache_bytes(ours),
        }
        progress(f"  {task.name} {scheme.name}: converted, exported, reloaded, torchao quantized")
    scores = {name: test_scores(model, data, task.text) for name, model in models.items()}
    seconds = time_interleaved(
        {name: partial(model, example) for name, model in models.items()},
        plan.inference_rounds,
        plan.inference_iterations,
        warmup=2,
    )
    base = median(seconds["fp32"])
    rows = []
    for scheme in schemes:
        size = sizes[scheme.name]
        target = 1 / 6 if scheme.weight_bits == 4 else 1 / 3.5
        rows.append([
            scheme.name, f"{size['weight_ratio']:.3f}", f"1/{1 / size['weight_ratio']:.2f}", f"<= 1/{1 / target:.1f}",
            f"{size['state_dict_bytes_fp32'] / 1e6:.3f}", f"{size['state_dict_bytes_ours'] / 1e6:.3f}",
            f"{size['state_dict_bytes_torchao'] / 1e6:.3f}", f"{size['pt2_file_bytes'] / 1e6:.3f}",
            f"{size['bf16_cache_bytes'] / 1e6:.3f}",
        ])  # fmt: skip
    print_table(
        f"3a. {task.name}: converted size (quantized layers' weights vs the same in fp32; whole state_dict as"
        " torch.save writes it, MB)",
        ["scheme", "weights/fp32", "as fraction", "goal", "fp32 MB", "ours MB", "torchao MB", "ours .pt2 MB",
         "ours bf16 cache MB"],
        rows,
    )  # fmt: skip
    metric = "bits_per_byte" if task.text else "accuracy_pct"
    print_table(
        f"3b. {task.name}: CPU inference, input {tuple(example.shape)}, {plan.inference_rounds} interleaved rounds"
        f" (scores: test set, float model trained in part 1 or here, PTQ)",
        ["model", "median ms", "speed-up vs fp32", "test loss", metric],
        [
            [name, f"{1e3 * median(s):.2f}", f"{base / median(s):.2f}x", f"{scores[name]['loss']:.4f}",
             f"{scores[name][metric]:.3f}"]
            for name, s in seconds.items()
        ],
    )  # fmt: skip
    return {
        "input_shape": list(example.shape),
        "sizes": sizes,
        "median_inference_s": {name: median(s) for name, s in seconds.items()},
        "speedup": {name: base / median(s) for name, s in seconds.items()},
        "scores": scores,
    }


def run_inference(plan: Plan, schemes: Sequence[QuantScheme], trained: dict[str, nn.Module]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="qat-bench-") as workdir:
        for name, task in tasks(plan).items():
            if name not in trained:  # part 1 did not run: train the float model here, seed 0
                L.seed_everything(0, verbose=False)
                trained[name] = task.build_model()
                fit(trained[name], task.build_data(), max_steps=task.steps)  # type: ignore[arg-type]
                progress(f"  {name}: float model trained for part 3")
            results[name] = run_task_inference(task, trained[name], schemes, plan, Path(workdir))
    return results


# --- 4. GPU --------------------------------------------------------------------------------------------


def run_gpu(plan: Plan) -> dict[str, Any]:
    """Step time of torchao's QAT and ours relative to float on a GPT-style model, bf16 autocast, eager and compiled."""
    title = (
        f"4. GPU training step time: GPT {plan.gpu_layers} layers, d={plan.gpu_d_model}, seq {plan.gpu_seq_len},"
        f" batch {plan.gpu_batch_size}, bf16 autocast, fused AdamW, {GPU_SCHEME}"
    )
    if not torch.cuda.is_available():
        print(f"\n{title}: skipped: no CUDA device (torch.cuda.is_available() is False)")
        return {"skipped": "no CUDA device"}
    device = torch.device("cuda")
    scheme = SCHEMES[GPU_SCHEME]
    generator = torch.Generator().manual_seed(0)
    shape = (plan.gpu_batch_size, plan.gpu_seq_len)
    tokens = torch.randint(0, 256, shape, generator=generator).to(device)
    targets = torch.randint(0, 256, shape, generator=generator).to(device)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return TinyGPT(
            n_layer=plan.gpu_layers,
            n_head=plan.gpu_d_model // 64,
            d_model=plan.gpu_d_model,
            seq_len=plan.gpu_seq_len,
        ).to(device)

    models, refused = qat_variants(build, [scheme])
    if refused:
        raise RuntimeError(f"torchao's QATConfig refused {GPU_SCHEME} on CUDA: {refused}")

    def gpu_step(model: nn.Module, compiled: bool) -> Callable[[], None]:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        forward = torch.compile(model) if compiled else model

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = forward(tokens)
            F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    torch._dynamo.config.recompile_limit = 64  # one compiled model per variant
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for mode in ("eager", "compiled"):
        progress(f"  gpu {mode}: warm-up{' and compilation' if mode == 'compiled' else ''}, then timing")
        calls = {name: gpu_step(model, mode == "compiled") for name, model in models.items()}
        seconds = time_interleaved(
            calls, plan.gpu_rounds, plan.gpu_iterations, warmup=5, inference=False, sync=torch.cuda.synchronize
        )
        base = median(seconds["float"])
        results[mode] = {
            name: {"median_step_s": median(s), "vs_float": median(s) / base} for name, s in seconds.items()
        }
        print_table(
            f"{title} ({mode}, {torch.cuda.get_device_name()}, {plan.gpu_rounds} interleaved rounds)",
            ["variant", "steps", "median ms", "vs float"],
            [[name, len(s), f"{1e3 * median(s):.2f}", f"{median(s) / base:.2f}x"] for name, s in seconds.items()],
        )
    results["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return results


# --- 5. CNN: converted ResNet on the CPU, and PTQ vs QAT on digits ---------------------------------------


REPO = Path(__file__).resolve().parents[1]


def zoo() -> Any:
    """tests/zoo/models.py: the ResNet the capability tests use (a repository checkout is assumed)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.zoo import models

    return models


def ours_converted(model: nn.Module, scheme: QuantScheme, example: tuple[tuple[Any, ...], dict[str, Any]]) -> nn.Module:
    """Our PTQ of a copy of `model`: the callback's default plan (BatchNorms folded into convs), then `convert`."""
    copied = copy.deepcopy(model).eval()
    plan = plan_layers(copied, scheme, GROUP_SIZE, example=example)
    swap_in_fake_quantized(copied, plan.layers, scheme, GROUP_SIZE, plan.folded)
    return convert(copied)


def first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def torchao_cnn(model: nn.Module, config: Any, example: torch.Tensor) -> nn.Module:
    """torchao's PTQ of a copy of `model` with `config` on every Conv2d and Linear; raises where torchao cannot."""
    from torchao.quantization import quantize_

    copied = copy.deepcopy(model).eval()
    quantize_(copied, config, filter_fn=lambda module, fqn: isinstance(module, (nn.Conv2d, nn.Linear)))
    with torch.inference_mode():
        copied(example)
    return copied


def torch_ao_x86_int8(model: nn.Module, example: torch.Tensor, batches: int) -> nn.Module:
    """torch.ao's static int8 x86 path (FX graph mode: conv+bn+relu fused, observers calibrated, then converted).

    FX rather than eager mode: eager mode needs QuantStub/DeQuantStub and `FloatFunctional` for every residual
    add written into the model, and the zoo ResNet adds with `+`; FX inserts them from the traced graph.
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (example,))
    generator = torch.Generator().manual_seed(99)
    with torch.inference_mode():
        for _ in range(batches):
            prepared(torch.randn(example.shape, generator=generator))
    return convert_fx(prepared)


def timing_resnet(plan: Plan) -> nn.Module:
    """The zoo ResNet at `cnn_width`, with BatchNorm statistics from a few random batches (not the identity)."""
    torch.manual_seed(0)
    model = zoo().ResNet(width=plan.cnn_width).train()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(plan.cnn_batch, 3, plan.cnn_image, plan.cnn_image, generator=generator) * 2 + 0.5)
    return model.eval()


def speed_rows(
    seconds: dict[str, list[float]], outputs: dict[str, torch.Tensor], sizes: dict[str, int]
) -> list[list[str]]:
    """model, median ms, speed-up vs fp32, max |output - fp32|, MB on disk, fraction of fp32's bytes."""
    base = median(seconds["fp32"])
    return [
        [name, f"{1e3 * median(s):.2f}", f"{base / median(s):.2f}x",
         f"{float((outputs[name] - outputs['fp32']).abs().max()):.4f}",
         f"{sizes[name] / 1e6:.3f}", f"{sizes[name] / sizes['fp32']:.3f}"]
        for name, s in seconds.items()
    ]  # fmt: skip


def run_cnn_speed(plan: Plan, schemes: Sequence[QuantScheme]) -> dict[str, Any]:
    """5a: CPU inference of the converted ResNet vs fp32, fp32 with BN fused, torchao and torch.ao's int8 kernels."""
    from torch.fx.experimental.optimization import fuse
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    model = timing_resnet(plan)
    generator = torch.Generator().manual_seed(1)
    example = torch.randn(plan.cnn_batch, 3, plan.cnn_image, plan.cnn_image, generator=generator)
    models: dict[str, nn.Module] = {"fp32": model, "fp32 BN fused": fuse(copy.deepcopy(model))}
    for scheme in schemes:
        models[f"ours {scheme.name}"] = ours_converted(model, scheme, ((example[:2],), {}))
    refused: dict[str, str] = {}
    configs = {"torchao Int8DynamicActivationInt8WeightConfig": Int8DynamicActivationInt8WeightConfig()}
    configs.update({f"torchao {s.name}": s.torchao_config(GROUP_SIZE) for s in schemes})
    for name, config in configs.items():
        try:
            models[name] = torchao_cnn(model, config, example)
        except Exception as error:  # torchao refusing convs is a result, printed as such
            refused[name] = first_line(error)
    try:
        models["torch.ao x86 static int8 (reference)"] = torch_ao_x86_int8(model, example, plan.cnn_calibration_batches)
    except Exception as error:
        refused["torch.ao x86 static int8 (reference)"] = first_line(error)
    progress(f"  cnn: {len(models)} variants built, {len(refused)} refused; timing")
    with torch.inference_mode():
        outputs = {name: m(example) for name, m in models.items()}
    sizes = {name: serialized_bytes(m) for name, m in models.items()}
    seconds = time_interleaved(
        {name: partial(m, example) for name, m in models.items()}, plan.cnn_rounds, plan.cnn_iterations, warmup=2
    )
    print_table(
        f"5a. CNN CPU inference: zoo ResNet width {plan.cnn_width}, input {tuple(example.shape)}, 1 thread,"
        f" {plan.cnn_rounds} interleaved rounds x {plan.cnn_iterations}; ours: int8 per-channel convs with BN"
        " folded (every scheme); dynamic schemes: uint8 inputs (one scale) x int8 weights in oneDNN, weight-only"
        " schemes: dequantized once, fp32 convolution; torchao: quantize_ on every Conv2d and Linear",
        ["model", "median ms", "vs fp32", "max |out - fp32|", "MB on disk", "of fp32"],
        speed_rows(seconds, outputs, sizes),
    )
    for name, error in refused.items():
        print(f"{name}: refused on the convs: {error}")
    base = median(seconds["fp32"])
    return {
        "input_shape": list(example.shape),
        "median_inference_s": {name: median(s) for name, s in seconds.items()},
        "speedup": {name: base / median(s) for name, s in seconds.items()},
        "speedup_vs_fused": {name: median(seconds["fp32 BN fused"]) / median(s) for name, s in seconds.items()},
        "state_dict_bytes": sizes,
        "max_abs_output_diff": {name: float((o - outputs["fp32"]).abs().max()) for name, o in outputs.items()},
        "refused": refused,
    }


class ImageClassifier(L.LightningModule):
    """A CNN as a user's LightningModule: cross-entropy on (images, labels) batches, AdamW."""

    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-4)


def digits_images(side: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The digits train and test splits upsampled (bilinear) to side x side, the channel repeated to RGB."""
    data = DigitsDataModule()
    data.setup()

    def images(subset: Any) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, labels = subset.tensors
        if side != pixels.shape[-1]:
            pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False)
        return (pixels - 0.5).repeat(1, 3, 1, 1), labels

    return images(data.train_set), images(data.test_set)


@torch.inference_mode()
def images_scores(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    model.eval()
    logits = model(test[0])
    loss = float(F.cross_entropy(logits, test[1]))
    return {"loss": loss, "accuracy_pct": 100 * float((logits.argmax(-1) == test[1]).float().mean())}


def train_classifier(
    net: nn.Module, train: tuple[torch.Tensor, torch.Tensor], steps: int, lr: float, seed: int, callbacks: list[Any]
) -> ImageClassifier:
    L.seed_everything(seed, verbose=False)  # the same batches for the control and every QAT run
    data = L.LightningDataModule.from_datasets(train_dataset=torch.utils.data.TensorDataset(*train), batch_size=64)
    module = ImageClassifier(net, lr)
    fit(module, data, callbacks, max_steps=steps)
    return module.eval()


def run_cnn_accuracy(plan: Plan, schemes: Sequence[QuantScheme]) -> dict[str, Any]:
    """5b: float / PTQ / QAT test loss of a ResNet on digits; QAT and a float control continue the float checkpoint."""
    train, test = digits_images(plan.digits_cnn_image)
    torch.manual_seed(0)
    float_model = train_classifier(zoo().ResNet(width=plan.digits_cnn_width), train, plan.digits_cnn_steps, 2e-3, 0, [])
    net = float_model.net
    scores: dict[str, Any] = {"float": images_scores(net, test)}
    control = train_classifier(copy.deepcopy(net), train, plan.digits_cnn_qat_steps, 5e-4, 1, [])
    scores["control"] = images_scores(control, test)
    noise = abs(scores["control"]["loss"] - scores["float"]["loss"])
    progress(f"  cnn digits: float {scores['float']}, control {scores['control']}")
    rows, summary = [], {}
    example = ((test[0][:2],), {})
    for scheme in schemes:
        ptq = ours_converted(net, scheme, example)
        callback = QuantizationAwareTraining(scheme.name, group_size=GROUP_SIZE)
        train_classifier(copy.deepcopy(net), train, plan.digits_cnn_qat_steps, 5e-4, 1, [callback])
        if callback.quantized_model is None:
            raise RuntimeError(f"QAT run of {scheme.name} on the CNN ended without a converted model")
        entry = {
            "layers": len(quantized_layers(ptq)),
            "ptq": images_scores(ptq, test),
            "qat": images_scores(callback.quantized_model, test),
        }
        degradation = entry["ptq"]["loss"] - scores["float"]["loss"]
        entry["ptq_degradation"] = degradation
        entry["recovery"] = recovery(scores["float"]["loss"], entry["ptq"]["loss"], entry["qat"]["loss"])
        entry["measurable"] = degradation > 0 and degradation >= NOISE_MARGIN * noise
        summary[scheme.name] = entry
        verdict = f"{entry['recovery']:.0%}" if entry["measurable"] else f"nothing to recover ({entry['recovery']:.0%})"
        rows.append([
            scheme.name, str(entry["layers"]), f"{scores['float']['loss']:.4f}", f"{entry['ptq']['loss']:.4f}",
            f"{entry['qat']['loss']:.4f}", f"{scores['control']['loss']:.4f}", f"{degradation:+.4f}",
            f"{entry['qat']['loss'] - scores['control']['loss']:+.4f}", verdict,
            f"{scores['float']['accuracy_pct']:.2f}", f"{entry['ptq']['accuracy_pct']:.2f}",
            f"{entry['qat']['accuracy_pct']:.2f}", f"{scores['control']['accuracy_pct']:.2f}",
        ])  # fmt: skip
        progress(f"  cnn digits {scheme.name}: PTQ {entry['ptq']['loss']:.4f}, QAT {entry['qat']['loss']:.4f}")
    print_table(
        f"5b. CNN PTQ vs QAT: zoo ResNet width {plan.digits_cnn_width} on digits upsampled to"
        f" {plan.digits_cnn_image}x{plan.digits_cnn_image}, {plan.digits_cnn_steps} float steps, then"
        f" {plan.digits_cnn_qat_steps} QAT steps (control: the same steps in float); test set ({len(test[1])} images)",
        ["scheme", "layers", "float loss", "PTQ loss", "QAT loss", "control loss", "PTQ-float", "QAT-control",
         "recovered",
         "float acc %", "PTQ acc %", "QAT acc %", "control acc %"],
        rows,
    )  # fmt: skip
    print(
        f"recovered = (PTQ - QAT) / (PTQ - float) of the loss; noise floor |control - float| = {noise:.4f}; it is"
        f" 'nothing to recover' where PTQ - float < {NOISE_MARGIN}x that noise (int8 per-channel convs lose"
        " almost nothing here). layers: converted layers (convs, and the scheme's Linear: the head stays float)"
    )
    return {"scores": scores, "noise_floor": noise, "summary": summary}


def run_cnn(plan: Plan, schemes: Sequence[QuantScheme]) -> dict[str, Any]:
    print("\n5. CNN: converted ResNet (int8 per-channel convs, BatchNorm folded) on the CPU, and PTQ vs QAT")
    return {"speed": run_cnn_speed(plan, schemes), "accuracy": run_cnn_accuracy(plan, schemes)}


# --- 6. GPT-2: converted HF GPT-2 on the CPU, and where its time goes ------------------------------------


def hf_conv1d_as_linear(model: nn.Module) -> nn.Module:
    """A copy of `model` with every HF `Conv1D` replaced by the same `nn.Linear` (torchao quantizes Linears only)."""
    from transformers.pytorch_utils import Conv1D

    copied = copy.deepcopy(model)
    for name, module in list(copied.named_modules()):
        if isinstance(module, Conv1D):
            linear = nn.Linear(*module.weight.shape)
            linear.weight.data, linear.bias.data = module.weight.data.t().contiguous(), module.bias.data.clone()
            parent, _, child = name.rpartition(".")
            setattr(copied.get_submodule(parent), child, linear)
    return copied


def linear_in(names: set[str]) -> Callable[[nn.Module, str], bool]:
    """torchao's `filter_fn` for the Linears among `names` (the layers ours quantized, Conv1Ds now Linears)."""
    return lambda module, fqn: isinstance(module, nn.Linear) and fqn in names


def lm_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens).logits


def top_ops(model: nn.Module, tokens: torch.Tensor, iterations: int, count: int = 8) -> list[dict[str, Any]]:
    """The `count` ops with the most self CPU time over `iterations` forwards (after one warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        lm_logits(model, tokens)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as profiler:
            for _ in range(iterations):
                lm_logits(model, tokens)
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {"op": e.key, "calls_per_forward": e.count / iterations, "self_ms_per_forward": e.self_cpu_time_total / 1e3
         / iterations, "share": e.self_cpu_time_total / total}
        for e in events[:count]
    ]  # fmt: skip


def run_gpt2(plan: Plan, schemes: Sequence[QuantScheme]) -> dict[str, Any]:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=plan.gpt2_vocab, n_positions=plan.gpt2_seq, n_embd=plan.gpt2_embd,
                        n_layer=plan.gpt2_layers, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, plan.gpt2_vocab, (plan.gpt2_batch, plan.gpt2_seq), generator=generator)
    title = (f"GPT-2 (HF GPT2LMHeadModel, n_embd {plan.gpt2_embd}, {plan.gpt2_layers} layers,"
             f" vocab {plan.gpt2_vocab}), tokens {tuple(tokens.shape)}")  # fmt: skip
    print(f"\n6. {title}: converted vs fp32 vs torchao PTQ on the CPU")
    as_linear = hf_conv1d_as_linear(model)
    models: dict[str, nn.Module] = {"fp32": model}
    layers: dict[str, int] = {}
    for scheme in schemes:
        ours = ours_converted(model, scheme, ((), {"input_ids": tokens[:1]}))
        models[f"ours {scheme.name}"] = ours
        names = set(quantized_layers(ours))
        layers[scheme.name] = len(names)
        peer = copy.deepcopy(as_linear).eval()
        quantize_(peer, scheme.torchao_config(GROUP_SIZE), filter_fn=linear_in(names))
        models[f"torchao {scheme.name}"] = peer
    if any(s.name == "int8_dynamic" for s in schemes):
        names = set(quantized_layers(models["ours int8_dynamic"]))
        peer = copy.deepcopy(as_linear).eval()
        quantize_(peer, Int8DynamicActivationInt8WeightConfig(), filter_fn=linear_in(names))
        models["torchao Int8DynamicActivationInt8WeightConfig"] = peer
    progress(f"  gpt2: {len(models)} variants built; timing")
    with torch.inference_mode():
        outputs = {name: lm_logits(m, tokens) for name, m in models.items()}
    sizes = {name: serialized_bytes(m) for name, m in models.items()}
    seconds = time_interleaved(
        {name: partial(lm_logits, m, tokens) for name, m in models.items()},
        plan.gpt2_rounds,
        plan.gpt2_iterations,
        warmup=2,
    )
    print_table(
        f"6a. {title}: CPU inference, 1 thread, {plan.gpt2_rounds} interleaved rounds x {plan.gpt2_iterations};"
        " ours: every HF Conv1D and the position embedding quantized, the tied wte/lm_head float; torchao: the same"
        " Conv1Ds as nn.Linear (it quantizes Linears only)",
        ["model", "median ms", "vs fp32", "max |logit - fp32|", "MB on disk", "of fp32"],
        speed_rows(seconds, outputs, sizes),
    )
    profiled = {"fp32": model}
    if "ours int8_dynamic" in models:
        profiled["ours int8_dynamic"] = models["ours int8_dynamic"]
    profiles = {name: top_ops(m, tokens, plan.profile_iterations) for name, m in profiled.items()}
    for name, ops in profiles.items():
        print_table(
            f"6b. profile of {name}: top ops by self CPU time, {plan.profile_iterations} forwards",
            ["op", "calls/forward", "self ms/forward", "share"],
            [[o["op"], f"{o['calls_per_forward']:.0f}", f"{o['self_ms_per_forward']:.2f}", f"{o['share']:.1%}"]
             for o in ops],
        )  # fmt: skip
    base = median(seconds["fp32"])
    return {
        "tokens_shape": list(tokens.shape),
        "quantized_layers": layers,
        "median_inference_s": {name: median(s) for name, s in seconds.items()},
        "speedup": {name: base / median(s) for name, s in seconds.items()},
        "state_dict_bytes": sizes,
        "max_abs_logit_diff": {name: float((o - outputs["fp32"]).abs().max()) for name, o in outputs.items()},
        "profile_top_ops": profiles,
    }


# --- goals and main ------------------------------------------------------------------------------------


def collect_goals(report: dict[str, Any], schemes: Sequence[QuantScheme]) -> list[Goal]:
    """Every goal of the issue; undecided (n/a) where its part did not run or PTQ costs less than the noise."""
    goals = []
    accuracy = report.get("accuracy")
    for task in TASKS:
        for name in INT4_SCHEMES:
            if not any(s.name == name for s in schemes):
                continue
            entry = accuracy[task]["summary"][name] if accuracy else None
            measured = (
                f"{entry['recovery']:.0%} (PTQ-float {entry['ptq_degradation']:+.4f}, noise {entry['noise_floor']:.4f}"
                f"{')' if entry['measurable'] else f'; PTQ-float below {NOISE_MARGIN}x noise: undetermined)'}"
                if entry
                else "not run"
            )
            met = entry["recovery"] >= RECOVERY_GOAL if entry and entry["measurable"] else None
            goals.append(Goal(f"{task}: QAT recovers >= {RECOVERY_GOAL:.0%} of {name} PTQ loss", measured, met))
    inference = report.get("inference")
    for scheme in schemes:
        target = 1 / 6 if scheme.weight_bits == 4 else 1 / 3.5
        ratio = inference["gpt"]["sizes"][scheme.name]["weight_ratio"] if inference else None
        goals.append(Goal(f"{scheme.name}: weights <= 1/{1 / target:.1f} of fp32",
                          f"1/{1 / ratio:.2f}" if ratio else "not run",
                          ratio <= target if ratio else None))  # fmt: skip
    for scheme in schemes:
        speedups = {task: inference[task]["speedup"][f"ours {scheme.name}"] for task in TASKS} if inference else None
        measured = " ".join(f"{task} {s:.2f}x" for task, s in speedups.items()) if speedups else "not run"
        goals.append(Goal(f"{scheme.name}: converted GPT or digits >= {SPEEDUP_GOAL:.0f}x fp32 speed", measured,
                          max(speedups.values()) >= SPEEDUP_GOAL if speedups else None))  # fmt: skip
    gpu: dict[str, Any] = report.get("gpu") or {}
    ran = bool(gpu) and "skipped" not in gpu
    for mode, target in (("compiled", GPU_COMPILED_GOAL), ("eager", GPU_EAGER_GOAL)):
        ratio = gpu[mode][f"ours {GPU_SCHEME}"]["vs_float"] if ran else None
        goals.append(Goal(f"GPU: ours <= {target:.2f}x float step ({mode})",
                          f"{ratio:.2f}x" if ratio else "skipped (no CUDA)" if gpu else "not run",
                          ratio <= target if ratio else None))  # fmt: skip
    goals += cnn_gpt2_goals(report, schemes)
    return goals


CNN_SPEEDUP_GOAL = 2.0
GPT2_GOALS = {"int8_dynamic": 1.5, "int4_weight_only": 1.0}


def cnn_gpt2_goals(report: dict[str, Any], schemes: Sequence[QuantScheme]) -> list[Goal]:
    """Parts 5 and 6: converted CNN and GPT-2 speed vs fp32, and QAT recovery on the digits CNN."""
    goals = []
    cnn = report.get("cnn")
    speed = cnn["speed"] if cnn else None
    for scheme in schemes:
        name = f"ours {scheme.name}"
        measured = (f"{speed['speedup'][name]:.2f}x fp32 eager, {speed['speedup_vs_fused'][name]:.2f}x fp32 BN-fused"
                    if speed else "not run")  # fmt: skip
        goals.append(Goal(f"CNN: {scheme.name} converted ResNet >= {CNN_SPEEDUP_GOAL:.0f}x fp32 CPU inference",
                          measured, speed["speedup"][name] >= CNN_SPEEDUP_GOAL if speed else None))  # fmt: skip
    accuracy = cnn["accuracy"] if cnn else None
    for scheme in schemes:
        entry = accuracy["summary"][scheme.name] if accuracy else None
        measured = (
            f"{entry['recovery']:.0%} (PTQ-float {entry['ptq_degradation']:+.4f}, noise {accuracy['noise_floor']:.4f}"
            f"{')' if entry['measurable'] else '; nothing to recover: undetermined)'}"
            if entry and accuracy
            else "not run"
        )
        met = entry["recovery"] >= RECOVERY_GOAL if entry and entry["measurable"] else None
        goals.append(Goal(f"CNN digits: QAT recovers >= {RECOVERY_GOAL:.0%} of {scheme.name} PTQ loss", measured, met))
    gpt2 = report.get("gpt2")
    for name, target in GPT2_GOALS.items():
        if not any(s.name == name for s in schemes):
            continue
        ratio = gpt2["speedup"][f"ours {name}"] if gpt2 else None
        peer = gpt2["speedup"].get(f"torchao {name}") if gpt2 else None
        measured = f"{ratio:.2f}x (torchao {peer:.2f}x)" if ratio and peer else "not run"
        goals.append(Goal(f"GPT-2: {name} converted >= {target:.1f}x fp32 CPU inference", measured,
                          ratio >= target if ratio else None))  # fmt: skip
    return goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run of every CPU path (~2 min)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds of part 1 (default 1)")
    parser.add_argument("--schemes", type=str, default=",".join(SCHEMES), help="comma-separated subset of the schemes")
    parser.add_argument(
        "--qat-start",
        type=float,
        default=0.6,
        help="share of the steps in float before fake quantization (default 0.6)",
    )
    parser.add_argument(
        "--gpt-steps", type=int, default=None, help="GPT training steps in parts 1 and 3 (default 1200, quick 30)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--compile", action="store_true", help="part 2 also under torch.compile (slow on the CPU)")
    parser.add_argument("--only", type=str, default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--json", type=str, default=None, help="write every result here as JSON")
    args = parser.parse_args()
    parts = parse_choices(args.only, PARTS, "--only", parser)
    names = parse_choices(args.schemes, list(SCHEMES), "--schemes", parser)
    if not names:
        parser.error(f"--schemes: choose from {', '.join(SCHEMES)}")
    if not 0 <= args.qat_start < 1:
        parser.error("--qat-start: must be in [0, 1)")
    schemes = [SCHEMES[name] for name in names]
    plan = QUICK if args.quick else FULL
    if args.seeds is not None:
        plan = replace(plan, seeds=args.seeds)
    if args.gpt_steps is not None:
        plan = replace(plan, gpt_steps=args.gpt_steps)
    seeds = list(range(plan.seeds))
    torch.set_num_threads(args.threads)
    quiet_lightning()
    warnings.filterwarnings("ignore", module="torchao")

    import torchao

    command = command_line()
    machine = machine_facts(f"{torch.get_num_threads()} torch threads", f"torchao {torchao.__version__}")
    print(f"command: {command}\nmachine: {machine}\nplan: {'quick' if args.quick else 'full'}, seeds {seeds},"
          f" schemes {names}")  # fmt: skip
    report: dict[str, Any] = {"command": command, "machine": machine, "plan": asdict(plan), "seeds": seeds}
    trained: dict[str, nn.Module] = {}

    def accuracy() -> dict[str, Any]:
        results, models = run_accuracy(plan, schemes, seeds, args.qat_start)
        trained.update(models)
        return results

    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "accuracy": accuracy,
        "step_time": lambda: run_step_time(plan, schemes, args.compile),
        "inference": lambda: run_inference(plan, schemes, trained),
        "gpu": lambda: run_gpu(plan),
        "cnn": lambda: run_cnn(plan, schemes),
        "gpt2": lambda: run_gpt2(plan, schemes),
    }
    run_parts({part: run for part, run in runs.items() if part in parts}, report, lambda: write_json(args.json, report))
    print("\ngoals")
    report["goals"] = report_goals(*collect_goals(report, schemes))
    finish(report, args.json)


if __name__ == "__main__":
    main()

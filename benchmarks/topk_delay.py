"""Does the delay of the gradient explain TopK's loss gap? Top-k with error feedback, emulated in one process.

TopK at 110x fewer bytes ends the small GPT's 300-step run far above dense (README: compression). A coordinate
that top-k leaves behind waits in the error-feedback residual, so one explanation is delay. This benchmark
measures the delay and sets it beside the loss. It trains the app's small GPT (AdamW, batch 64, seed 0) in one
process, for each density in `--densities`:

- at each step, each parameter's gradient is added to its residual;
- the largest `density` share of the residual by magnitude is applied, and the rest stays;
- the first 50 steps follow TopK's warm-up (`dgc.warmup_density`: 0.25, 0.0625, ... down to `density`).

Density 1 is dense training. It leaves out DGC's compact payload, the other rank, and the all-gather: it
isolates what sparsifying the update does to training. Printed per density:
- the mean training loss over the last 100 steps in two halves;
- the share of coordinates never applied;
- the gradient-mass-weighted delay (steps between a gradient's arrival and its application, weighted by its
  magnitude);
- the share of all gradient mass still in the residual at the end.

If delay were the cause, the loss would trail dense's by about the delay.

    .venv/bin/python benchmarks/topk_delay.py                              # densities 1, 0.05, 0.009: ~3 min
    .venv/bin/python benchmarks/topk_delay.py --densities 1,0.2,0.05 --steps 300 --json delay.json
    .venv/bin/python benchmarks/topk_delay.py --densities 0.05,0.009 --select adam   # Adam-scaled selection
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Any

import torch
import torch.nn.functional as F
from harness import command_line, finish, machine_facts, parse_numbers, print_table, progress, write_json

from lightning_eff.compression.dgc import warmup_density
from lightning_eff.tasks import TextDataModule, TinyGPT

WARMUP_STEPS = 50  # conf/compression/topk.yaml


def train(density: float, steps: int, seed: int, select: str) -> dict[str, Any]:
    """Train with the top-`density` share of each parameter's error-feedback residual applied per step, chosen by
    magnitude or (``select="adam"``) by magnitude over a running RMS of the gradient, as Adam scales a step."""
    torch.manual_seed(seed)
    model = TinyGPT()
    setup = model.configure_optimizers()
    optimizer, schedule = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    data = TextDataModule(batch_size=64)
    data.setup("fit")
    batches = iter(data.train_dataloader())
    params = list(model.parameters())
    residual = [torch.zeros_like(p) for p in params]
    pending_mass = [torch.zeros_like(p) for p in params]  # |gradient| waiting in the residual
    pending_arrival = [torch.zeros_like(p) for p in params]  # sum of |gradient| x its arrival step
    applied = [torch.zeros_like(p, dtype=torch.bool) for p in params]
    mean_square = [torch.zeros_like(p) for p in params]  # for select="adam"
    losses: list[float] = []
    delayed_mass = sent_mass = 0.0
    for step in range(steps):
        try:
            tokens, targets = next(batches)
        except StopIteration:
            batches = iter(data.train_dataloader())
            tokens, targets = next(batches)
        optimizer.zero_grad()
        logits = model(tokens)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        share = warmup_density(step, density, WARMUP_STEPS)
        for p, r, mass, arrival, done, square in zip(
            params, residual, pending_mass, pending_arrival, applied, mean_square, strict=True
        ):
            assert p.grad is not None
            square.mul_(0.99).addcmul_(p.grad, p.grad, value=0.01)
            r += p.grad
            mass += p.grad.abs()
            arrival += p.grad.abs() * step
            flat = r.view(-1)
            score = flat.abs() if select == "magnitude" else flat.abs() / (square.view(-1).sqrt() + 1e-8)
            chosen = score.topk(max(1, math.ceil(share * flat.numel()))).indices
            chosen_mass = mass.view(-1)[chosen]
            delayed_mass += float((chosen_mass * step - arrival.view(-1)[chosen]).sum())
            sent_mass += float(chosen_mass.sum())
            update = torch.zeros_like(flat)
            update[chosen] = flat[chosen]
            flat[chosen] = 0
            mass.view(-1)[chosen] = 0
            arrival.view(-1)[chosen] = 0
            done.view(-1)[chosen] = True
            p.grad = update.view_as(p)
        losses.append(loss.item())
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            progress(f"density {density}: step {step}, train loss {loss.item():.3f}")
    left = sum(float(m.sum()) for m in pending_mass)
    tail = steps // 3
    return {
        "density": density,
        "select": select,
        "loss_late": statistics.mean(losses[-tail:]),
        "loss_before": statistics.mean(losses[-2 * tail : -tail]),
        "never_applied": sum(int((~d).sum()) for d in applied) / sum(p.numel() for p in params),
        "mass_weighted_delay": delayed_mass / sent_mass if sent_mass else 0.0,
        "mass_left": left / (left + sent_mass) if left + sent_mass else 0.0,
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--densities", default="1,0.05,0.009", help="comma-separated shares in (0, 1]")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--select",
        choices=("magnitude", "adam"),
        default="magnitude",
        help="rank the residual by magnitude (TopK's rule) or by magnitude over the gradient's RMS",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    densities = parse_numbers(args.densities, float, "--densities", parser)
    if not densities or any(not 0 < d <= 1 for d in densities):
        parser.error(f"--densities: each in (0, 1], got {densities}")
    if args.steps < 3 * WARMUP_STEPS:
        parser.error(f"--steps: at least {3 * WARMUP_STEPS}, so the last third lies past the warm-up")
    torch.set_num_threads(1)
    print(f"command: {command_line()}\nmachine: {machine_facts()}")
    report: dict[str, Any] = {"command": command_line(), "machine": machine_facts(), "runs": []}
    for density in densities:
        report["runs"].append(train(density, args.steps, args.seed, args.select))
        write_json(args.json, report)
    tail = args.steps // 3
    rows = [
        [f"{r['density']:g}", f"{r['loss_before']:.3f}", f"{r['loss_late']:.3f}", f"{r['never_applied']:.1%}",
         f"{r['mass_weighted_delay']:.1f}", f"{r['mass_left']:.1%}"]
        for r in report["runs"]
    ]  # fmt: skip
    print_table(
        f"top-k with error feedback by {args.select}, {args.steps} steps (train loss: means over steps "
        f"{args.steps - 2 * tail}-{args.steps - tail - 1} and {args.steps - tail}-{args.steps - 1})",
        ["density", "loss before", "loss last", "never applied", "delay (mass-weighted steps)", "mass left"],
        rows,
    )
    finish(report, args.json)


if __name__ == "__main__":
    main()

"""Is the all-at-once benchmark's loss gap the pruning method's, or the capacity that 90% sparsity leaves?

`benchmarks/headline.py` prunes 90% of the small GPT's weights, and pruning is the whole of its loss gap to dense
(README, the all-at-once row). This benchmark separates the method from the capacity. It trains these models the
same way, one after the other:

- ``dense``: the app's small GPT (`lightning-eff experiment=text_gpt`, d_model 128), dense: the reference;
- ``pruned``: the same model with headline.py's pruning (90% of the targeted weights, one global magnitude
  threshold, from 40% of the steps to 75%);
- ``d<W>``: a dense GPT that is only W wide (``model.d_model=W``, `--widths`), and so has fewer parameters.

All use headline.py's steps (600: where the dense model's validation loss stops falling), its epochs (50 steps)
and validation batches, and the same seed. Each runs as 2 gloo processes on unlimited loopback with no slow rank,
since only the loss counts here. Each row shows the model's nonzero parameters, counted in its last checkpoint,
and the held-out test loss from the app's `report.json`, with its gap to dense. Suppose the pruned model beats a
dense model with more nonzero parameters, and every dense model within 5% of the reference has far more. Then the
method is not what limits the loss: the capacity 90% leaves is.

    .venv/bin/python benchmarks/pruning_capacity.py                      # 6 runs, about 12 min on 2 cores
    .venv/bin/python benchmarks/pruning_capacity.py --widths 64,96 --json capacity.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from harness import (
    REPO,
    command_line,
    exit_on_sigterm,
    finish,
    job_env,
    machine_facts,
    parse_numbers,
    print_table,
    progress,
    write_json,
)
from headline import EPOCH_STEPS, LOSS_GOAL, PRUNE_START, SPARSITY, STEPS, VAL_BATCHES

WIDTHS = (48, 64, 96, 112)  # d_model must divide by the model's 4 heads


def app_overrides(run_dir: Path, seed: int, extra: list[str]) -> list[str]:
    """headline.py's training setup (steps, epochs, validation, seed) for one run, with `extra` on top."""
    return [
        "experiment=text_gpt",
        "trainer=ddp_cpu",
        "trainer.devices=2",
        f"run_dir={run_dir}",
        f"seed={seed}",
        f"trainer.max_steps={STEPS}",
        f"trainer.limit_train_batches={EPOCH_STEPS}",
        "trainer.val_check_interval=1.0",
        f"trainer.limit_val_batches={VAL_BATCHES}",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


def nonzero_parameters(run_dir: Path) -> tuple[int, int]:
    """(nonzero, all) parameters of the model in the run's last checkpoint (its state_dict is the parameters)."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    tensors = list(checkpoint["state_dict"].values())
    return sum(int(t.count_nonzero()) for t in tensors), sum(t.numel() for t in tensors)


def run(name: str, extra: list[str], workdir: Path, seed: int, port: int) -> dict[str, Any]:
    """Train one model with the app; its test loss and parameter counts."""
    run_dir = workdir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [str(Path(sys.executable).with_name("lightning-eff")), *app_overrides(run_dir, seed, extra)]
    started = time.monotonic()
    with open(run_dir / "log", "w") as log:
        done = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=job_env(port, PYTHONWARNINGS="ignore")
        )
    seconds = time.monotonic() - started
    if done.returncode != 0 or not (run_dir / "report.json").is_file():
        return {"error": f"exit {done.returncode}, see {run_dir / 'log'}", "seconds": seconds}
    summary = json.loads((run_dir / "report.json").read_text())["run"]["summary"]
    nonzero, parameters = nonzero_parameters(run_dir)
    return {
        "overrides": extra,
        "test_loss": summary["test_loss"],
        "global_step": summary["global_step"],
        "nonzero_parameters": nonzero,
        "parameters": parameters,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)),
                        help="d_model of the narrower dense models, comma-separated (multiples of 4)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", type=Path, default=None, help="run directories and logs (default: a new temp dir)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    widths = parse_numbers(args.widths, int, "--widths", parser)
    if any(width < 4 or width % 4 for width in widths):
        parser.error(f"--widths: each must be a positive multiple of 4 (the model's heads), got {widths}")
    exit_on_sigterm()
    workdir = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="pruning-capacity-"))
    print(f"command: {command_line()}\nmachine: {machine_facts()}")
    print(
        f"setup: the small GPT, {STEPS} steps ({EPOCH_STEPS} per epoch), 2 gloo processes, unlimited loopback, "
        f"seed {args.seed}; pruned: {SPARSITY:.0%} global magnitude from step {int(PRUNE_START * STEPS)}"
    )
    progress(f"run directories and logs: {workdir}")
    plans: dict[str, list[str]] = {
        "dense": [],
        "pruned": [
            "pruning=global_magnitude",
            f"pruning.target_sparsity={SPARSITY}",
            f"pruning.start_step={int(PRUNE_START * STEPS)}",
        ],
        **{f"d{width}": [f"model.d_model={width}"] for width in widths},
    }
    report: dict[str, Any] = {"command": command_line(), "machine": machine_facts(), "runs": {}}
    for index, (name, extra) in enumerate(plans.items()):
        progress(f"{name}: {' '.join(extra) or 'the reference'}")
        report["runs"][name] = result = run(name, extra, workdir, args.seed, 29800 + 10 * index)
        outcome = result.get("error") or f"test loss {result['test_loss']:.4f}"
        progress(f"{name}: {outcome} ({result['seconds']:.0f}s)")
        write_json(args.json, report)
    runs = {name: r for name, r in report["runs"].items() if "error" not in r}
    reference = runs.get("dense")
    rows = []
    for name, r in sorted(runs.items(), key=lambda item: -item[1]["nonzero_parameters"]):
        gap = r["test_loss"] / reference["test_loss"] - 1 if reference else None
        rows.append([name, f"{r['nonzero_parameters']:,}", f"{r['parameters']:,}", f"{r['test_loss']:.4f}",
                     f"{gap * 100:+.1f}%" if gap is not None else "n/a"])  # fmt: skip
        r["test_loss_vs_dense"] = gap
    print_table("test loss at the last step, by nonzero parameters", ["model", "nonzero", "parameters", "test loss",
                "vs dense"], rows)  # fmt: skip
    pruned = runs.get("pruned")
    if reference and pruned:
        narrower = [r for name, r in runs.items() if name in {f"d{width}" for width in widths}]
        beaten = [r for r in narrower if r["test_loss"] >= pruned["test_loss"]]
        within = [r for r in narrower if r["test_loss_vs_dense"] <= LOSS_GOAL]
        most_beaten = max((r["nonzero_parameters"] for r in beaten), default=None)
        fewest_within = min((r["nonzero_parameters"] for r in within), default=None)
        gap = pruned["test_loss_vs_dense"]
        print(f"\npruned: {pruned['nonzero_parameters']:,} nonzero parameters, {gap * 100:+.1f}% vs dense")
        print("it beats a dense model of " + (f"{most_beaten:,} parameters" if most_beaten else "none of the widths"))
        print(f"the smallest dense model within {LOSS_GOAL:.0%} of the reference has "
              + (f"{fewest_within:,} parameters" if fewest_within else "none among the widths"))  # fmt: skip
    finish(report, args.json)


if __name__ == "__main__":
    main()

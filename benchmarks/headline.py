"""The all-at-once benchmark (issue #15): every capability on one run of the app, against plain DDP.

The app's small GPT (`lightning-eff experiment=text_gpt`, 2 gloo processes on the CPU) is trained by each
configuration below as its own `lightning-eff` subprocess, one after the other, all under the same conditions:

- the link: both ranks run inside a network namespace whose loopback is limited to `--link` (100 Mbit/s;
  `scripts/netns-link up NAME RATE`, `exec`, `down`, as in `benchmarks/compression.py`), so every byte the ranks
  exchange crosses the slow link;
- one slow rank: rank r is pinned to core r, and rank 1 runs under a cgroup cpu quota of 50% of its core (as in
  `benchmarks/balancing.py`; where no cpu cgroup can be made, a busy loop pinned to core 1). Lightning starts
  rank 1 by running the command again, so the pinning and the quota are applied by a `sitecustomize.py` that this
  script puts on the job's PYTHONPATH (rank 1 is the process started with LOCAL_RANK=1);
- the same seed, global batch (32 per rank, 64 in all), steps and validation for every configuration. An epoch is
  cut to `--epoch-steps` optimizer steps (`trainer.limit_train_batches`) and validation runs at each epoch end
  (a checkpoint follows each validation), so the last validation is at the last step.

Configurations:

    dense           plain dense DDP (Lightning's DDPStrategy, nothing of lightning_eff): the peer
    all             pruning=global_magnitude (90%, from `--prune-start` of the steps to 75%),
                    quantization=int4_weight_only (QAT from 60% of the steps,
                    exported with `quantization.export_path`: the .pt2 and its packed sparse copy),
                    compression=`--compressor` (int8: of int8, local_sgd and powersgd the only one that costs this
                    model no loss at 600 steps; see COMPRESSOR),
                    balancing=throughput; interrupted once and resumed
    no_pruning      all without pruning            (each "no_" one is interrupted and resumed exactly like all,
    no_qat          all without QAT                 so it differs from all in that one capability)
    no_compression  all without gradient compression
    no_balancer     all without the ThroughputBalancer

The interruption: half an epoch after the run's first checkpoint at or past half the steps (half the time between
its last two checkpoints, so about half an epoch of steps is lost), rank 0 gets SIGTERM (the app's
`SynchronizedSigterm` passes it on to rank 1 and both stop after the same step; `--signal KILL` kills the whole
process group instead, a lost node), and after `--grace` seconds whatever is left of the job is killed. Then the
same command is run again (`resume=auto` with the same `run_dir`), which resumes from the newest whole checkpoint
with every plugin's state (README, "Failure and resume"). This is an interrupt-and-relaunch on one machine, not
the SLURM requeue path (`tests/slurm` tests that one). The peer runs uninterrupted: the conservative side for the
comparison.

Measured per configuration: wall seconds from the first launch to the end of the last (both launches, the
restart, validation, test, QAT conversion and export included), the test loss from the app's `report.json` (the
held-out test split, scored after the last step), the last validation loss and its step (the CSV log), and the
exported model's bytes on disk: every run writes `model.sparse.pt`, the model it would ship (the converted int4
model after QAT, pruned zeros bitmap-packed; the float model otherwise), through the frontier search's export
(`+frontier.*` overrides; no sweep, no early stopping): the dense run's file is the fp32 reference. Goals (the
issue's): exported model >= 10x smaller than fp32 dense, loss within 5% of dense, wall time <= 1/3 of plain DDP's.
The loss goal is decided on the test loss, not the validation loss: after a resume from the checkpoint written at
an epoch's end, the app's next epoch is only a couple of steps long, which shifts every later epoch end, so the
resumed runs' last validation falls a few steps before the last step (the test loss is at the last step for all).
Each capability's share of the gain is shown by dropping it: the gain (speed-up, size reduction) without it, and
its share of the log of the all-at-once gain, ``log(all / without) / log(all)`` (shares need not add up to 1: the
capabilities interact).

Needs root (network namespace, cgroup) and two CPU cores.

    .venv/bin/python benchmarks/headline.py                      # 600 steps, 6 configurations (about 35 min here)
    .venv/bin/python benchmarks/headline.py --quick              # a smoke run of the whole pipeline (tiny steps)
    .venv/bin/python benchmarks/headline.py --steps 300 --only dense,all --json headline.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from balancing import busy_core, choose_slowdown, quota_cgroup
from harness import (
    REPO,
    Goal,
    command_line,
    exit_on_sigterm,
    finish,
    job_env,
    kill_group,
    machine_facts,
    parse_choices,
    print_table,
    progress,
    report_goals,
    write_json,
)
from local_sgd import link_prefix

SMALLER_GOAL = 10.0  # exported bytes: fp32 dense / all-at-once
LOSS_GOAL = 0.05  # validation loss: within 5% of dense
SPEEDUP_GOAL = 3.0  # wall time: plain DDP / all-at-once
COMPRESSORS = ("powersgd", "local_sgd", "topk", "int8", "fp16", "bf16", "auto")
LINKS = ("100mbit", "1gbit", "none")
GLOBAL_BATCH = 64  # the app's text data: 32 per rank, 2 ranks
# Pruning starts after this fraction of the steps trained dense: magnitudes at random init say little about which
# weights matter (measured at 600 steps, pruning alone, 90%: test loss +33% from step 0 per layer, +20% global from
# 25%, +18% global from 42%; README, the all-at-once row)
PRUNE_START = 0.4
# The run's defaults (not --quick): 600 steps, where the dense model's validation loss stops falling here; a cut
# epoch of 50 steps with validation on 20 batches after each; 90% of the targeted weights pruned
STEPS = 600
EPOCH_STEPS = 50
VAL_BATCHES = 20
SPARSITY = 0.9
# The compressor: int8 (4x fewer bytes) costs this model nothing, where the ones that send fewer bytes cost loss
# (600 steps, global pruning from step 250 + int4 QAT, no slow rank, test loss: int8 1.506, local_sgd period 8
# 1.558, powersgd rank 16 1.568, rank 4 1.736, pruning alone 1.497; README, the all-at-once row)
COMPRESSOR = "int8"


@dataclass(frozen=True)
class Config:
    """One configuration: which capabilities are on, and whether it is interrupted once and resumed."""

    label: str
    pruning: bool
    qat: bool
    compression: bool
    balancer: bool
    interrupted: bool


CONFIGS: dict[str, Config] = {
    "dense": Config("plain DDP, dense (peer)", False, False, False, False, False),
    "all": Config("all at once", True, True, True, True, True),
    "no_pruning": Config("all but pruning", False, True, True, True, True),
    "no_qat": Config("all but QAT", True, False, True, True, True),
    "no_compression": Config("all but compression", True, True, False, True, True),
    "no_balancer": Config("all but the balancer", True, True, True, False, True),
}
CAPABILITY_OF = {
    "no_pruning": "pruning 90%",
    "no_qat": "int4 QAT",
    "no_compression": "compression",
    "no_balancer": "ThroughputBalancer",
}


@dataclass(frozen=True)
class Setup:
    """What every configuration shares."""

    steps: int
    epoch_steps: int
    sparsity: float
    prune_start: int  # the step pruning starts at (it reaches `sparsity` at 75% of the steps)
    prune_scope: str  # "global": one magnitude threshold across layers; "layer": each layer to `sparsity`
    qat_start: int
    compressor: str
    compression_start: int  # PowerSGD's dense steps first (its start_step)
    replan_every: int
    link: str
    val_batches: int
    test_batches: int | None
    seed: int
    signal: str
    grace: float
    launch_timeout: float


# rank r pinned to core r; rank 1 joins the quota cgroup (if any) before it imports torch
SITECUSTOMIZE = """\
import os

_rank = int(os.environ.get("LOCAL_RANK", "0"))
if os.environ.get("HEADLINE_PIN") == "1":
    os.sched_setaffinity(0, {_rank % os.cpu_count()})
_cgroup = os.environ.get("HEADLINE_SLOW_CGROUP")
if _cgroup and _rank == 1:
    with open(os.path.join(_cgroup, "cgroup.procs"), "w") as _file:
        _file.write(str(os.getpid()))
"""


def overrides(config: Config, setup: Setup, run_dir: Path) -> list[str]:
    """The `lightning-eff` command line's overrides for `config` (the same on both launches)."""
    args = [
        "experiment=text_gpt",
        "trainer=ddp_cpu",
        "trainer.devices=2",
        f"run_dir={run_dir}",
        "resume=auto",
        f"seed={setup.seed}",
        f"trainer.max_steps={setup.steps}",
        f"trainer.limit_train_batches={setup.epoch_steps}",
        "trainer.val_check_interval=1.0",  # at every (cut) epoch's end, so also at the last step
        f"trainer.limit_val_batches={setup.val_batches}",
        "trainer.enable_progress_bar=false",
        # the exported model, as a frontier trial writes it (no sweep: no study, no early stopping)
        "+frontier.quality=test_loss",
        "+frontier.quality_direction=minimize",
        "+frontier.early_stopping=false",
        "+frontier.skip_repeats=false",
        "+frontier.monitor=val_loss",
        "+frontier.monitor_direction=minimize",
        "+frontier.min_delta=0.01",
        "+frontier.warmup_steps=0",
        "+frontier.trial=null",
    ]
    if setup.test_batches is not None:
        args.append(f"trainer.limit_test_batches={setup.test_batches}")
    if config.pruning:
        args += [
            "pruning=global_magnitude" if setup.prune_scope == "global" else "pruning=gradual_magnitude",
            f"pruning.target_sparsity={setup.sparsity}",
            f"pruning.start_step={setup.prune_start}",
        ]
    if config.qat:
        args += [
            "quantization=int4_weight_only",
            f"quantization.start_step={setup.qat_start}",
            f"quantization.export_path={run_dir / 'quantized.pt2'}",
        ]
    if config.compression:
        args.append(f"compression={setup.compressor}")
        if setup.compressor == "powersgd":
            args.append(f"compression.start_step={setup.compression_start}")
    if config.balancer:
        args += ["balancing=throughput", f"balancing.replan_every={setup.replan_every}"]
    return args


def checkpoint_step(run_dir: Path) -> int:
    """The highest step of a finished checkpoint in the run directory (-1: none yet)."""
    steps = [
        int(m[1]) for path in (run_dir / "checkpoints").glob("*.ckpt") if (m := re.search(r"step=(\d+)", path.name))
    ]
    return max(steps, default=-1)


def launch(
    command: list[str], env: dict[str, str], log_path: Path, run_dir: Path, setup: Setup, interrupt_at: int | None
) -> dict[str, Any]:
    """Run one launch of the app to its end (or, with `interrupt_at`, until interrupted after the checkpoint at
    that step or later); its seconds, exit status and the step it was interrupted after."""
    started = time.monotonic()
    with open(log_path, "a") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
    interrupted_after: int | None = None
    seen: dict[int, float] = {}  # checkpoint step -> when it was first seen
    signal_at: float | None = None
    signalled_at = 0.0
    timed_out = False
    try:
        while process.poll() is None:
            time.sleep(0.25)
            now = time.monotonic()
            if now - started > setup.launch_timeout:
                timed_out = True
                break
            if interrupt_at is not None and signal_at is None:
                step = checkpoint_step(run_dir)
                seen.setdefault(step, now)
                if step >= interrupt_at:
                    # half an epoch after the checkpoint (the time between the last two): the steps since it are lost
                    earlier = [when for s, when in seen.items() if 0 <= s < step]
                    signal_at = now + 0.5 * (now - max(earlier)) if earlier else now
                    interrupted_after = step
            if interrupted_after is not None and signal_at is not None and not signalled_at and now >= signal_at:
                signalled_at = now
                progress(f"    half an epoch after the checkpoint at step {interrupted_after}: SIG{setup.signal}")
                with suppress(ProcessLookupError):
                    if setup.signal == "KILL":
                        os.killpg(process.pid, signal.SIGKILL)
                    else:
                        os.kill(process.pid, signal.SIGTERM)  # rank 0; it passes it on to rank 1
            if signalled_at and now - signalled_at > setup.grace:
                break  # not stopped within the grace: killed below, like a node that is taken away
    finally:
        kill_group(process, grace=0 if process.poll() is None else 10)
        process.wait()
    return {
        "seconds": time.monotonic() - started,
        "returncode": process.returncode,
        "interrupted_after_step": interrupted_after if signalled_at else None,
        "seconds_to_stop": time.monotonic() - signalled_at if signalled_at else None,
        "timed_out": timed_out,
    }


def read_report(run_dir: Path) -> dict[str, Any]:
    """The figures this benchmark takes from the app's `report.json`."""
    report = json.loads((run_dir / "report.json").read_text())
    run = report["run"]["summary"]
    figures: dict[str, Any] = {
        "test_loss": run.get("test_loss"),
        "global_step": run.get("global_step"),
        "parameters": run.get("parameters"),
        "model_size_bytes": run.get("model_size_bytes"),
        "train_seconds_per_step_last_launch": (
            run["train_step_seconds"] * GLOBAL_BATCH / run["train_samples"] if run.get("train_samples") else None
        ),
        "train_samples_last_launch": run.get("train_samples"),
        "fit_seconds_last_launch": run.get("fit_seconds"),
        "wall_seconds_last_launch": run.get("wall_seconds"),
        "exported_bytes": report.get("frontier", {}).get("summary", {}).get("model_bytes_on_disk"),
    }
    if "pruning" in report:
        figures["sparsity"] = report["pruning"]["summary"].get("achieved_sparsity")
    if "quantization" in report:
        summary = report["quantization"]["summary"]
        figures["qat_model_bytes_packed"] = summary.get("model_bytes_packed")
        figures["qat_model_bytes_quantized"] = summary.get("model_bytes_quantized")
        for row in report["quantization"].get("rows", []):
            if row.get("metric") == "test_loss":
                figures["test_loss_converted"] = row.get("converted")
    if "communication" in report:
        summary = report["communication"]["summary"]
        figures["compression_ratio"] = summary.get("compression_ratio")
        figures["bytes_sent_per_step"] = summary.get("bytes_sent_per_step")
    if "balance" in report:
        figures["batch_sizes"] = [row.get("batch_size") for row in report["balance"].get("rows", [])]
    exports = {path.name: path.stat().st_size for path in run_dir.glob("quantized*")}
    if exports:
        figures["qat_export_files"] = exports
    return figures


def validation_curve(run_dir: Path, epoch_steps: int) -> list[tuple[int, float]]:
    """(step, val loss) at every validation of the run, from its `metrics.csv` (the CSV logger's).

    Validation runs only at the (cut) epochs' ends; the logged step is that epoch's last step or the one before
    (depending on which callbacks log in that step), so it is rounded to the nearest multiple of `epoch_steps`
    (after a resume the epochs are shifted by a few steps; see the module docstring).
    """
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("val_loss")]
    return [(round(int(row["step"]) / epoch_steps) * epoch_steps, float(row["val_loss"])) for row in rows]


def run_config(name: str, config: Config, setup: Setup, workdir: Path, prefix: list[str], env: dict[str, str],
               port: int) -> dict[str, Any]:  # fmt: skip
    """One configuration: one launch, or two (interrupted, then resumed); its wall seconds and report figures."""
    run_dir = workdir / name
    run_dir.mkdir()
    command = [*prefix, sys.executable, "-m", "lightning_eff", *overrides(config, setup, run_dir)]
    log_path = workdir / f"{name}.log"
    interrupt_at = setup.steps // 2 if config.interrupted else None
    launches = []
    for attempt in range(2 if config.interrupted else 1):
        progress(f"  {name}: launch {attempt + 1}")
        result = launch(
            command,
            {**env, "MASTER_PORT": str(port + attempt)},
            log_path,
            run_dir,
            setup,
            interrupt_at if attempt == 0 else None,
        )
        launches.append(result)
        progress(f"  {name}: launch {attempt + 1} ended in {result['seconds']:.0f}s (exit {result['returncode']})")
        if result["timed_out"]:
            return {"error": f"launch {attempt + 1} ran past {setup.launch_timeout:.0f}s; see {log_path}",
                    "launches": launches}  # fmt: skip
        if attempt == 0 and config.interrupted and result["interrupted_after_step"] is None:
            return {"error": f"finished before it could be interrupted; see {log_path}", "launches": launches}
    if launches[-1]["returncode"] != 0 or not (run_dir / "report.json").is_file():
        return {"error": f"exit {launches[-1]['returncode']}, no report.json; see {log_path}", "launches": launches}
    figures = read_report(run_dir)
    if figures["global_step"] != setup.steps:
        return {"error": f"ended at step {figures['global_step']}, not {setup.steps}; see {log_path}",
                "launches": launches}  # fmt: skip
    resumed = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if "resume=auto:" in line]
    # the report's val_* figures are gone once the app has tested; the last validation is the CSV log's last
    # row (a resumed launch starts that log again)
    curve = validation_curve(run_dir, setup.epoch_steps)
    return {
        "wall_seconds": sum(result["seconds"] for result in launches),
        "launches": launches,
        "resume_lines": resumed,
        "val_curve": curve,
        **figures,
        "val_loss": curve[-1][1] if curve else None,
        "val_step": curve[-1][0] if curve else None,
    }


@contextmanager
def slow_rank(slowdown: str) -> Iterator[dict[str, str]]:
    """Rank 1 slowed for as long as the context lasts; the environment that applies it to a job."""
    if slowdown == "quota":
        with quota_cgroup() as path:
            yield {"HEADLINE_PIN": "1", "HEADLINE_SLOW_CGROUP": str(path)}
    elif slowdown == "busy":
        with busy_core(1):
            yield {"HEADLINE_PIN": "1"}
    else:
        yield {"HEADLINE_PIN": "1"}


def ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios to the peer, each capability's share of the gain, and the goals."""
    dense = results.get("dense")
    base = dense if dense is not None and "error" not in dense else None
    ok = {name: r for name, r in results.items() if "error" not in r}
    ratios: dict[str, dict[str, float | None]] = {}
    for name, r in ok.items():
        ratios[name] = {
            "speedup": base["wall_seconds"] / r["wall_seconds"] if base else None,
            "smaller": base["exported_bytes"] / r["exported_bytes"] if base and r.get("exported_bytes") else None,
            "test_loss_vs_dense": r["test_loss"] / base["test_loss"] - 1 if base and r.get("test_loss") else None,
        }
    rows = []
    for name, r in results.items():
        label = CONFIGS[name].label
        if "error" in r:
            rows.append([label, "FAILED (below)", *["-"] * 8])
            continue
        q = ratios[name]
        interrupted = r["launches"][0].get("interrupted_after_step")
        rows.append([
            label,
            f"{r['wall_seconds']:.0f}",
            ratio_text(q["speedup"]),
            f"{r['val_loss']:.4f} ({r['val_step']})" if r.get("val_loss") is not None else "-",
            f"{r['test_loss']:.4f}" if r.get("test_loss") is not None else "-",
            f"{q['test_loss_vs_dense'] * 100:+.1f}%" if q["test_loss_vs_dense"] is not None else "-",
            f"{r['exported_bytes']:,}" if r.get("exported_bytes") else "-",
            ratio_text(q["smaller"]),
            "-" if interrupted is None else f"step {interrupted}",
            f"{r['train_seconds_per_step_last_launch']:.3f}" if r.get("train_seconds_per_step_last_launch") else "-",
        ])  # fmt: skip
    header = ["configuration", "wall s", "x faster", "last val loss (step)", "test loss", "vs dense", "exported bytes",
              "x smaller", "interrupted", "train s/step (last launch)"]  # fmt: skip
    print_table("the all-at-once run against plain DDP (wall: every launch, restart, test and export included)",
                header, rows)  # fmt: skip

    shares: dict[str, Any] = {}
    whole = ratios.get("all")
    if whole is not None and whole["speedup"] is not None:
        share_rows = []
        for name, capability in CAPABILITY_OF.items():
            if name not in ratios:
                continue
            without = ratios[name]
            entry: dict[str, Any] = {"capability": capability}
            for key in ("speedup", "smaller"):
                gain, gain_without = whole[key], without[key]
                entry[f"{key}_without"] = gain_without
                entry[f"{key}_share"] = (
                    math.log(gain / gain_without) / math.log(gain)
                    if gain and gain_without and gain > 0 and gain_without > 0 and abs(math.log(gain)) > 1e-9
                    else None
                )
            loss_all, loss_without = whole["test_loss_vs_dense"], without["test_loss_vs_dense"]
            entry["test_loss_vs_dense_without"] = loss_without
            shares[name] = entry
            share_rows.append([
                capability,
                ratio_text(entry["speedup_without"]),
                f"{entry['speedup_share'] * 100:.0f}%" if entry["speedup_share"] is not None else "-",
                ratio_text(entry["smaller_without"]),
                f"{entry['smaller_share'] * 100:.0f}%" if entry["smaller_share"] is not None else "-",
                f"{loss_without * 100:+.1f}%" if loss_without is not None else "-",
                f"{loss_all * 100:+.1f}%" if loss_all is not None else "-",
            ])  # fmt: skip
        print_table(
            f"each capability's share, dropping one at a time (all at once: {ratio_text(whole['speedup'])} faster, "
            f"{ratio_text(whole['smaller'])} smaller); share = log(all / without) / log(all)",
            ["dropped", "x faster without", "share of speed-up", "x smaller without", "share of size cut",
             "test loss vs dense without", "test loss vs dense, all"],
            share_rows,
        )  # fmt: skip

    for name, r in results.items():
        if "error" in r:
            print(f"{CONFIGS[name].label}: FAILED: {r['error']}")
    for name, r in ok.items():
        if r.get("val_curve"):
            points = ", ".join(f"{step}: {loss:.4f}" for step, loss in r["val_curve"])
            print(f"{CONFIGS[name].label}: val loss by step{' (last launch)' if CONFIGS[name].interrupted else ''}: "
                  f"{points}")  # fmt: skip
    print()
    goals = []
    if whole is not None and base is not None:
        smaller, speedup, loss = whole["smaller"], whole["speedup"], whole["test_loss_vs_dense"]
        goals = report_goals(
            Goal(f"exported model >= {SMALLER_GOAL:.0f}x smaller than fp32 dense (bytes on disk)",
                 f"{ratio_text(smaller)} ({ok['all']['exported_bytes']} vs {base['exported_bytes']} bytes)",
                 smaller is not None and smaller >= SMALLER_GOAL),
            Goal(f"held-out (test split) loss at the last step within {LOSS_GOAL:.0%} of dense",
                 f"{ok['all']['test_loss']:.4f} vs {base['test_loss']:.4f} ({loss * 100:+.1f}%)"
                 if loss is not None else "", loss is not None and loss <= LOSS_GOAL),
            Goal(f"wall time <= 1/{SPEEDUP_GOAL:.0f} of plain DDP's",
                 f"{ok['all']['wall_seconds']:.0f}s vs {base['wall_seconds']:.0f}s ({ratio_text(speedup)})",
                 speedup is not None and speedup >= SPEEDUP_GOAL),
        )  # fmt: skip
    else:
        print("goals: n/a (needs both the dense and the all-at-once run)")
    return {"ratios": ratios, "shares": shares, "goals": goals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per configuration (default 600: "
        "where the dense model's validation loss stops falling here)",
    )
    parser.add_argument("--epoch-steps", type=int, default=None, help="steps per (cut) epoch: validation and a "
                        "checkpoint after each (default 50, at most the 51 per-rank batches of an epoch)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a smoke run: 40 steps, 10 per epoch, 2 val/test batches")
    parser.add_argument(
        "--only", default=",".join(CONFIGS), help=f"configurations, comma-separated: {', '.join(CONFIGS)}"
    )
    parser.add_argument(
        "--compressor", choices=COMPRESSORS, default=COMPRESSOR, help="the compression member (default %(default)s)"
    )
    parser.add_argument("--sparsity", type=float, default=SPARSITY)
    parser.add_argument(
        "--prune-start",
        type=float,
        default=PRUNE_START,
        help="the fraction of the steps trained dense before pruning starts (default %(default)s)",
    )
    parser.add_argument(
        "--prune-scope",
        choices=("global", "layer"),
        default="global",
        help="global: one magnitude threshold across layers (default); layer: Zhu & Gupta's",
    )
    parser.add_argument("--link", choices=LINKS, default="100mbit", help="the rate limit of the ranks' loopback")
    parser.add_argument("--slowdown", choices=("auto", "quota", "busy", "none"), default="auto",
                        help="how rank 1 is slowed (auto: a 50%% cpu quota, else busy)")  # fmt: skip
    parser.add_argument("--signal", choices=("TERM", "KILL"), default="TERM", help="the interruption")
    parser.add_argument("--grace", type=float, default=20.0, help="seconds after the signal before the job is killed")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", type=Path, default=None, help="run directories and logs (default: a new temp dir)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    names = parse_choices(args.only, list(CONFIGS), "--only", parser)
    steps = args.steps if args.steps is not None else 40 if args.quick else STEPS
    epoch_steps = args.epoch_steps if args.epoch_steps is not None else 10 if args.quick else EPOCH_STEPS
    if not 1 <= epoch_steps <= 51:
        parser.error("--epoch-steps must be in [1, 51]: the per-rank batches of one epoch")
    if steps % epoch_steps or steps < 2 * epoch_steps:
        parser.error(f"--steps must be a multiple of --epoch-steps ({epoch_steps}), at least two epochs")
    if not 0 <= args.prune_start < 0.75:
        parser.error("--prune-start must be in [0, 0.75): pruning reaches its sparsity at 75% of the steps")
    if os.geteuid() != 0:
        sys.exit("headline.py: needs root (a network namespace for the link, a cpu cgroup for the slow rank)")
    setup = Setup(
        steps=steps,
        epoch_steps=epoch_steps,
        sparsity=args.sparsity,
        prune_start=int(args.prune_start * steps),
        prune_scope=args.prune_scope,
        qat_start=int(0.6 * steps),
        compressor=args.compressor,
        compression_start=min(100, max(2, steps // 5)),
        replan_every=min(50, max(5, steps // 8)),
        link=args.link,
        val_batches=2 if args.quick else VAL_BATCHES,
        test_batches=2 if args.quick else None,
        seed=args.seed,
        signal=args.signal,
        grace=args.grace,
        launch_timeout=600.0 + 4.0 * steps,
    )
    slowdown = "none" if args.slowdown == "none" else choose_slowdown(args.slowdown)
    command, machine = command_line(), machine_facts()
    print(f"command: {command}\nmachine: {machine}")
    print(f"setup: {setup.steps} steps ({setup.epoch_steps} per epoch, validation and a checkpoint at each epoch end), "
          f"batch 32 per rank, link {setup.link}, rank 1 slowed by {slowdown}, compressor {setup.compressor}, "
          f"sparsity {setup.sparsity} ({setup.prune_scope}, from step {setup.prune_start}), "
          f"QAT (int4 weight-only) from step {setup.qat_start}; interrupted configurations "
          f"get SIG{setup.signal} after the checkpoint at step >= {setup.steps // 2}, then resume=auto")  # fmt: skip
    exit_on_sigterm()  # so the namespace and the cgroup are removed
    workdir = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="headline-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    progress(f"run directories and logs: {workdir}")
    site = workdir / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    report: dict[str, Any] = {"command": command, "machine": machine, "setup": asdict(setup), "slowdown": slowdown,
                              "workdir": str(workdir), "configs": {}}  # fmt: skip
    results: dict[str, dict[str, Any]] = report["configs"]
    with link_prefix(setup.link) as prefix, slow_rank(slowdown) as slow_env:
        pythonpath = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        env = job_env(0, GLOO_SOCKET_IFNAME="lo", PYTHONPATH=pythonpath, PYTHONWARNINGS="ignore", **slow_env)
        for index, name in enumerate(names):
            config = CONFIGS[name]
            progress(f"{name}: {config.label}")
            results[name] = run_config(name, config, setup, workdir, prefix, env, 29700 + 10 * index)
            if "error" in results[name]:
                progress(f"{name}: FAILED: {results[name]['error']}")
            else:
                r = results[name]
                progress(f"{name}: {r['wall_seconds']:.0f}s, val loss {r['val_loss']}, {r['exported_bytes']} bytes")
            write_json(args.json, report)
    report.update(summarise(results))
    finish(report, args.json)


if __name__ == "__main__":
    main()

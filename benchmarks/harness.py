"""What the benchmark scripts share: output, timing, training, per-step records, subprocess jobs and goals.

Each script in this folder (run as ``python benchmarks/X.py``, so this module is imported as ``harness``)
keeps only its plan, its workers and its claims; the rest is here:

- output and the run: `progress` lines on stderr, `print_table`, `command_line`, `machine_facts`,
  `parse_choices` (``--only`` and the like), `run_parts` (each part timed, the JSON saved after each),
  `write_json`, `finish`;
- statistics and timing: `median`, `mean`, `time_interleaved` (calls timed in alternating rounds);
- training: `trainer` (a quiet Lightning Trainer that never validates), `fit` (the same, timed), and
  `StepRecorder`, the one per-step callback: a row per optimizer step (start, end, loss, what the script adds),
  optionally streamed to a file (the watchdog's heartbeat), optionally a checkpoint at a given step;
- evaluation: `validation_loss`, the one definition of "val loss" in balancing.py and compression.py: the
  mean next-token cross-entropy over the first `windows` fixed-length validation windows of the text task, in
  dataset order (all of them if there are fewer), every window weighted alike. It depends only on the model's
  weights and `windows`, not on the batch size a script trains or evaluates with. (pruning.py's GPT "val loss"
  is the same quantity over every validation window, computed by its own `evaluate`.)
- subprocess jobs: `free_port`, `kill_group`, `run_jobs` (jobs as their own process groups, killed whole when
  no step finishes for a while: the stall watchdog), `JobRunner` (numbered job files under one folder),
  `last_error` (the exception a failed job's log ends with);
- claims: `Goal`, and `report_goals`, the one way goals are printed (``goal: <description>: <measured> ->
  PASS``, ``MISS`` or ``n/a``) and put in the JSON (``{"goal", "measured", "met"}``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence, Sized
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
from typing_extensions import override

from lightning_eff.tasks import TextDataModule, TinyGPT

REPO = Path(__file__).resolve().parent.parent
Number = TypeVar("Number", int, float)
_START = time.perf_counter()


# --- output ----------------------------------------------------------------------------------------------


def elapsed() -> float:
    """Seconds since the benchmark started."""
    return time.perf_counter() - _START


def progress(message: str) -> None:
    """A progress line on stderr with the seconds since the benchmark started."""
    print(f"[{elapsed():7.1f}s] {message}", file=sys.stderr, flush=True)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """An aligned plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print(
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
        )
        if index == 0:
            print("  ".join("-" * width for width in widths))


def command_line() -> str:
    """The command that started this benchmark, as the README quotes it."""
    return " ".join([os.path.basename(sys.executable), *sys.argv])


def machine_facts(*extra: str) -> str:
    """CPU model and count, load, kernel and versions, then `extra` facts (threads, other libraries)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), platform.processor())
    return ", ".join(
        [
            f"{cpu} ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()})",
            f"{os.cpu_count()} CPUs",
            f"load average {os.getloadavg()[0]:.2f} at start",
            f"kernel {platform.release()}",
            f"torch {torch.__version__}",
            *extra,
            f"lightning {L.__version__}",
            f"python {platform.python_version()}",
        ]
    )


def parse_choices(value: str, choices: Sequence[str], option: str, parser: argparse.ArgumentParser) -> list[str]:
    """A comma-separated subset of `choices` (`--only`, `--links`, ...), in the order given."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [item for item in items if item not in choices]
    if unknown:
        parser.error(f"{option}: unknown {unknown}; choose from {', '.join(choices)}")
    return items


def parse_numbers(
    value: str, convert: Callable[[str], Number], option: str, parser: argparse.ArgumentParser
) -> list[Number]:
    """A comma-separated list of numbers (`--widths`, `--densities`, ...); a bad item is the parser's error."""
    try:
        return [convert(item) for item in value.split(",") if item.strip()]
    except ValueError:
        parser.error(f"{option}: numbers, comma-separated, got {value!r}")


def write_json(path: str | None, report: dict[str, Any]) -> None:
    """Write `report` to `path` (no `--json`: nothing)."""
    if path:
        Path(path).write_text(json.dumps(report, indent=2))


def finish(report: dict[str, Any], path: str | None) -> None:
    """The run's total seconds, printed and put in `report`, which is written to `path` one last time."""
    report["total_seconds"] = elapsed()
    print(f"\ntotal: {report['total_seconds']:.0f}s")
    write_json(path, report)


def quiet_lightning() -> None:
    """Lightning's per-Trainer info lines and the small-data warnings would bury the progress lines."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so `finally` blocks (cgroups, namespaces, job groups) still run."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def run_parts(runs: dict[str, Callable[[], dict[str, Any]]], report: dict[str, Any], save: Callable[[], None]) -> None:
    """Run each part in order into `report[name]`, with its seconds; `save` after every part, so a long run
    that breaks keeps what it measured. A `JobFailed` is a result too: reported as ``{"failed": ...}``."""
    for name, run in runs.items():
        progress(f"{name}: start")
        start = time.perf_counter()
        try:
            report[name] = run()
        except JobFailed as error:
            print(f"\n{name}: FAILED: {error}")
            report[name] = {"failed": str(error)}
        report[name]["seconds"] = time.perf_counter() - start
        progress(f"{name}: done in {report[name]['seconds']:.0f}s")
        save()


# --- statistics and timing ---------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values)


def time_interleaved(
    calls: Mapping[str, Callable[[], object]],
    rounds: int,
    iterations: int,
    warmup: int = 1,
    inference: bool = True,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, in rounds that run every function `iterations` times (the order
    reversed every other round), so machine noise and drift hit all alike; `warmup` calls of each first
    (compilation, allocator, caches); `sync` after each call (`torch.cuda.synchronize` on a GPU)."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode(inference):
        for call in calls.values():
            for _ in range(warmup):
                call()
        sync()
        names = list(calls)
        for round_index in range(rounds):
            for name in names if round_index % 2 == 0 else names[::-1]:
                for _ in range(iterations):
                    start = time.perf_counter()
                    calls[name]()
                    sync()
                    seconds[name].append(time.perf_counter() - start)
    return seconds


# --- training ----------------------------------------------------------------------------------------------


def trainer(callbacks: Sequence[L.Callback], **options: Any) -> L.Trainer:
    """A Trainer without logger, progress bar, checkpoints, summary or validation (every benchmark scores its
    models itself afterwards); one CPU device unless `options` say otherwise."""
    settings: dict[str, Any] = {"accelerator": "cpu", "devices": 1, **options}
    return L.Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        **settings,
    )


def fit(
    model: L.LightningModule,
    data: L.LightningDataModule,
    callbacks: Sequence[L.Callback] = (),
    ckpt_path: Path | str | None = None,
    **options: Any,
) -> tuple[L.Trainer, float]:
    """Train `model` with `trainer(callbacks, **options)` (from `ckpt_path` if given); the trainer and the fit's
    seconds."""
    fitter = trainer(callbacks, **options)
    start = time.perf_counter()
    fitter.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return fitter, time.perf_counter() - start


StepFields = Callable[[L.Trainer, Any, Any], dict[str, Any]]


class StepRecorder(L.Callback):
    """One row per optimizer step: ``step``, ``start`` and ``end`` (`time.perf_counter` at the batch's start and
    at this callback's batch end), ``loss``, and what `fields(trainer, outputs, batch)` adds.

    The end is taken before `fields` runs, so the span covers the step and every callback listed before this
    one (put it last to time the other callbacks' per-step work too), but not the recording itself.

    Args:
        fields: extra columns of a step's row (samples, bytes sent, ...).
        skip_steps: steps not recorded at the start (warm-up, a first epoch).
        progress_path: every row is also appended to this file as a JSON line at once, so a watchdog sees a
            stalled job as it stalls (`run_jobs`).
        global_zero_only: record on global rank 0 only (other ranks skip `fields` too).
        checkpoint: (step, path): write a checkpoint once that many optimizer steps are done.
    """

    def __init__(
        self,
        fields: StepFields | None = None,
        skip_steps: int = 0,
        progress_path: Path | str | None = None,
        global_zero_only: bool = False,
        checkpoint: tuple[int, Path] | None = None,
    ) -> None:
        self.fields = fields
        self.skip_steps = skip_steps
        self.progress_path = progress_path
        self.global_zero_only = global_zero_only
        self.checkpoint = checkpoint
        self.rows: list[dict[str, Any]] = []
        self._start = 0.0

    @property
    def seconds(self) -> list[float]:
        """Each recorded step's span from its batch start to its batch end."""
        return [row["end"] - row["start"] for row in self.rows]

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        end = time.perf_counter()
        step = trainer.global_step - 1
        if self.checkpoint is not None and trainer.global_step == self.checkpoint[0]:
            trainer.save_checkpoint(self.checkpoint[1])
        if step < self.skip_steps or (self.global_zero_only and not trainer.is_global_zero):
            return
        row = {"step": step, "start": self._start, "end": end, "loss": float(outputs["loss"])}
        if self.fields is not None:
            row.update(self.fields(trainer, outputs, batch))
        self.rows.append(row)
        if self.progress_path is not None:
            with open(self.progress_path, "a") as file:
                file.write(json.dumps(row) + "\n")


@torch.no_grad()
def validation_loss(model: TinyGPT, data: TextDataModule, windows: int) -> float:
    """Mean next-token loss over the first `windows` fixed-length validation windows, in dataset order (all of
    them if there are fewer), each window weighted alike: the same windows for every method and batch size."""
    if data.val_set is None:
        data.setup("validate")
    assert data.val_set is not None
    model.eval()
    assert isinstance(data.val_set, Sized)
    count = min(windows, len(data.val_set))
    total = 0.0
    for start in range(0, count, 32):
        pairs = [data.val_set[i] for i in range(start, min(start + 32, count))]
        tokens, targets = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        total += float(model._loss((tokens, targets))) * len(pairs)
    return total / count


# --- subprocess jobs and the stall watchdog ----------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a job's MASTER_PORT)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def kill_group(process: subprocess.Popen[Any], grace: float) -> None:
    """Wait up to `grace` seconds for the job's other processes (rank 1), then kill its whole process group."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def worker_command(script: str, job: Any, prefix: Sequence[str] = ()) -> list[str]:
    """`prefix` (e.g. a namespace's exec), then this Python running `script` with ``--worker`` and `job`
    (a dataclass) as JSON: how every job's rank 0 starts."""
    return [*prefix, sys.executable, str(Path(script).resolve()), "--worker", json.dumps(asdict(job))]


def job_env(port: int, **extra: str) -> dict[str, str]:
    """This environment plus what a 2-process gloo job needs: rendezvous on 127.0.0.1:`port`, one OpenMP
    thread, unbuffered output; `extra` on top."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }
    return env


@dataclass(frozen=True)
class Launch:
    """One job to run: its command, environment, log, the file its rank 0 appends a line to per step (the
    watchdog's heartbeat) and the files that must exist once it completed."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    progress_path: Path
    result_paths: tuple[Path, ...]


@dataclass
class Outcome:
    """How a job ended: "completed" (exit 0 and every result file written), "stalled" or "failed"."""

    status: str
    steps_done: int
    seconds: float
    detail: str  # why it stalled or failed; "" when completed


class JobFailed(RuntimeError):
    """A job stalled or exited without its results."""


def progress_rows(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def run_jobs(launches: Sequence[Launch], stall_seconds: float, startup_seconds: float) -> list[Outcome]:
    """Run `launches` side by side, each as its own process group in the repository root, logging to its file.

    The watchdog: a job with no finished step for `stall_seconds` (`startup_seconds` before its first step) is
    killed, its whole process group, and so are the others still running (side-by-side measurements are void
    without it). A job whose rank 0 has exited gets 10 s for its other ranks before its group is killed.
    """
    started = time.monotonic()
    processes = []
    for launch in launches:
        log = os.open(launch.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:  # the job keeps its own copy of the descriptor
            processes.append(
                subprocess.Popen(
                    launch.command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=launch.env,
                    cwd=REPO,
                    start_new_session=True,
                )
            )
        finally:
            os.close(log)
    stalled: dict[int, str] = {}
    try:
        steps_done = [0] * len(launches)
        last_step_at = [started] * len(launches)
        while not stalled and any(process.poll() is None for process in processes):
            time.sleep(0.5)
            for index, (launch, process) in enumerate(zip(launches, processes, strict=True)):
                rows = progress_rows(launch.progress_path)
                if rows > steps_done[index]:
                    steps_done[index], last_step_at[index] = rows, time.monotonic()
                limit = stall_seconds if steps_done[index] else startup_seconds
                if process.poll() is None and time.monotonic() - last_step_at[index] > limit:
                    stalled[index] = f"no step finished in {limit:.0f} s after {steps_done[index]} steps: killed"
    finally:
        for process in processes:
            kill_group(process, grace=0 if process.poll() is None else 10)
            process.wait()
    seconds = time.monotonic() - started
    outcomes = []
    for index, (launch, process) in enumerate(zip(launches, processes, strict=True)):
        steps = progress_rows(launch.progress_path)
        if index in stalled:
            outcomes.append(Outcome("stalled", steps, seconds, stalled[index]))
        elif process.returncode == 0 and all(path.exists() for path in launch.result_paths):
            outcomes.append(Outcome("completed", steps, seconds, ""))
        elif stalled:
            outcomes.append(Outcome("failed", steps, seconds, "killed: a job beside it stalled"))
        else:
            outcomes.append(Outcome("failed", steps, seconds, last_error(launch.log_path)))
    return outcomes


class JobRunner:
    """Runs one benchmark's jobs: their files under a fresh temporary folder (printed first), a numbered stem
    each, every batch of jobs watched by `run_jobs` with the same stall limits."""

    def __init__(self, prefix: str, seed: int, stall_seconds: float, startup_seconds: float) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=prefix))
        progress(f"job logs: {self.workdir}")
        self.seed = seed
        self.stall_seconds = stall_seconds
        self.startup_seconds = startup_seconds
        self.count = 0

    def stem(self, name: str) -> Path:
        """Where a new job's files go: the workdir, the job's number, then `name`."""
        self.count += 1
        return self.workdir / f"{self.count:02d}-{name}"

    def launch(self, launches: Sequence[Launch]) -> list[Outcome]:
        return run_jobs(launches, self.stall_seconds, self.startup_seconds)


def last_error(log_path: Path) -> str:
    """The exception of a failed job's log and the frame that raised it, else the log's last line."""
    lines = [
        re.sub(r"^\[rank\d+\]:\s*", "", line).strip() for line in log_path.read_text(errors="replace").splitlines()
    ]
    lines = [line for line in lines if line]
    errors = [i for i, line in enumerate(lines) if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    if not errors:
        return (lines or ["no output"])[-1][:200]
    index = errors[-1]
    frames = [line for line in lines[:index] if line.startswith("File ")]
    where = re.search(r'File ".*/([^/]+)", line (\d+), in (\S+)', frames[-1]) if frames else None
    origin = f" in {where[3]} ({where[1]}:{where[2]})" if where else ""
    return f"{lines[index][:160]}{origin}"


# --- goals ---------------------------------------------------------------------------------------------------


def verdict(met: bool | None) -> str:
    return "n/a" if met is None else "PASS" if met else "MISS"


@dataclass(frozen=True)
class Goal:
    """One claim the benchmark checks: what it states, the numbers that decide it, and whether it was met
    (None: not decided, because the part that measures it did not run or the effect is within the noise)."""

    description: str
    measured: str
    met: bool | None

    def line(self) -> str:
        measured = f": {self.measured}" if self.measured else ""
        return f"goal: {self.description}{measured} -> {verdict(self.met)}"

    def as_json(self) -> dict[str, Any]:
        return {"goal": self.description, "measured": self.measured, "met": self.met}


def report_goals(*goals: Goal) -> list[dict[str, Any]]:
    """Print each goal's line; their JSON form, for the report."""
    for goal in goals:
        print(goal.line())
    return [goal.as_json() for goal in goals]

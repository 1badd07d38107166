"""The frontier report of a sweep directory: the Pareto-optimal trials, a table, a plot, and `frontier.json`.

Everything is read from the sweep directory (each job's `report.json` and `.hydra/overrides.yaml`), so the
report can be made again later (`lightning-eff-frontier SWEEP_DIR`) and also covers a plain grid multirun.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lightning_eff.checkpoints import atomic_write_text
from lightning_eff.frontier.callback import STOPPED_NAME
from lightning_eff.frontier.objectives import Objectives, read_objectives
from lightning_eff.frontier.pareto import pareto_front
from lightning_eff.frontier.repeats import REPEAT_NAME
from lightning_eff.frontier.trial import TRIAL_KEY

# (name, objectives on the x axis) of the two fronts: quality against each cost.
FRONTS = (("bytes", "model_bytes"), ("step_time", "step_seconds"))


@dataclass
class TrialResult:
    """One job of the sweep: how it ended, what it scored, and the overrides that run it again."""

    job: str
    state: str  # complete, stopped (early, dominated), repeat (of an earlier trial, not trained) or failed
    overrides: list[str]
    objectives: Objectives | None = None
    stopped: dict[str, Any] | None = None
    repeat_of: int | None = None  # the trial number whose configuration a repeat had

    @property
    def command(self) -> str:
        return "lightning-eff " + " ".join(self.overrides)


@dataclass
class Frontier:
    """The trials of one sweep and the Pareto-optimal ones, quality against bytes and against step time."""

    quality: str
    direction: str
    trials: list[TrialResult]
    fronts: dict[str, list[TrialResult]]


def sweep_settings(sweep_dir: Path) -> tuple[str, str]:
    """The quality figure and its direction the sweep was run with (`multirun.yaml`), else test_loss/minimize."""
    path = sweep_dir / "multirun.yaml"
    if path.is_file():
        settings = OmegaConf.select(OmegaConf.load(path), "frontier")
        if settings is not None:
            return str(settings.quality), str(settings.quality_direction)
    return "test_loss", "minimize"


def collect_trials(sweep_dir: Path, quality: str) -> list[TrialResult]:
    """Every job directory of the sweep (those with `.hydra/overrides.yaml`), in job order."""
    trials = []
    jobs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    for job_dir in sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)):
        # the sweep's own settings (frontier.*: the trial number, early stopping) do not exist in a single run
        overrides = [str(o) for o in OmegaConf.load(job_dir / ".hydra/overrides.yaml") if not _sweep_setting(str(o))]
        result = TrialResult(job=job_dir.name, state="failed", overrides=overrides)
        if (job_dir / REPEAT_NAME).is_file():  # already on the front (or not) as the trial it repeats
            repeat = json.loads((job_dir / REPEAT_NAME).read_text())
            result.state, result.repeat_of = "repeat", int(repeat["repeat_of_trial"])
        elif (job_dir / "report.json").is_file():
            result.state, result.objectives = "complete", read_objectives(job_dir, quality)
        elif (job_dir / STOPPED_NAME).is_file():
            result.state, result.stopped = "stopped", json.loads((job_dir / STOPPED_NAME).read_text())
        trials.append(result)
    return trials


def _sweep_setting(override: str) -> bool:
    return override.lstrip("+~").startswith(f"{TRIAL_KEY.split('.')[0]}.")


def build_frontier(sweep_dir: Path, quality: str, direction: str) -> Frontier:
    """The sweep's trials and its two Pareto fronts (quality vs bytes, quality vs step time)."""
    trials = collect_trials(sweep_dir, quality)
    complete = [t for t in trials if t.objectives is not None]
    fronts = {}
    for name, cost in FRONTS:
        points = [(t.objectives.quality, getattr(t.objectives, cost)) for t in complete if t.objectives]
        front = [complete[i] for i in pareto_front(points, (direction, "minimize"))]
        fronts[name] = sorted(front, key=lambda t: getattr(t.objectives, cost))
    return Frontier(quality=quality, direction=direction, trials=trials, fronts=fronts)


def format_frontier(frontier: Frontier) -> str:
    """The fronts as plain-text tables, each row with the command that reproduces the trial."""
    states = ("complete", "stopped", "repeat", "failed")
    counts = {state: sum(t.state == state for t in frontier.trials) for state in states}
    lines = [
        f"frontier: {len(frontier.trials)} trials ({counts['complete']} complete, {counts['stopped']} stopped early, "
        f"{counts['repeat']} repeats not trained, {counts['failed']} failed); "
        f"quality = {frontier.quality} ({frontier.direction})"
    ]
    for name, cost in FRONTS:
        lines.append(f"== Pareto front: {frontier.quality} vs {cost} ==")
        header = ("job", frontier.quality, "model_bytes", "step_ms", "command")
        rows = [
            (
                t.job,
                f"{t.objectives.quality:.4g}",
                f"{t.objectives.model_bytes:.0f}",
                f"{1e3 * t.objectives.step_seconds:.1f}",
                t.command,
            )
            for t in frontier.fronts[name]
            if t.objectives is not None
        ]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def plot_frontier(frontier: Frontier, path: Path) -> Path:
    """Two panels, quality against model bytes and against step time: every trial, the front joined up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = [t for t in frontier.trials if t.objectives is not None]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, (name, cost) in zip(axes, FRONTS, strict=True):
        scale = 1e-3 if cost == "model_bytes" else 1e3
        xs = [scale * getattr(t.objectives, cost) for t in complete if t.objectives]
        ys = [t.objectives.quality for t in complete if t.objectives]
        axis.scatter(xs, ys, color="0.7", label="trial")
        front = [t.objectives for t in frontier.fronts[name] if t.objectives]
        # steps-post: each front point's quality holds until the next point's cost (what can be attained)
        front_xs, front_ys = [scale * getattr(o, cost) for o in front], [o.quality for o in front]
        axis.plot(front_xs, front_ys, "o-", color="C3", drawstyle="steps-post", label="Pareto front")
        for trial in frontier.fronts[name]:
            if trial.objectives is not None:
                x = scale * getattr(trial.objectives, cost)
                axis.annotate(trial.job, (x, trial.objectives.quality), textcoords="offset points", xytext=(4, 4))
        axis.set_xlabel("exported model (kB on disk)" if cost == "model_bytes" else "training step (ms)")
        axis.set_ylabel(frontier.quality)
        if cost == "model_bytes":
            axis.set_xscale("log")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"{len(complete)} complete trials of {len(frontier.trials)}; labels are job numbers")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_frontier(sweep_dir: Path, quality: str | None = None, direction: str | None = None) -> tuple[Frontier, str]:
    """Build the sweep's frontier and write `frontier.json`, `frontier.txt` and `frontier.png` into `sweep_dir`.

    Returns the frontier and its printed form. `quality`/`direction` default to the sweep's own settings.
    """
    default_quality, default_direction = sweep_settings(sweep_dir)
    frontier = build_frontier(sweep_dir, quality or default_quality, direction or default_direction)
    text = format_frontier(frontier)
    payload = {
        "quality": frontier.quality,
        "direction": frontier.direction,
        "trials": [{**asdict(t), "command": t.command} for t in frontier.trials],
        "fronts": {name: [t.job for t in front] for name, front in frontier.fronts.items()},
    }
    atomic_write_text(sweep_dir / "frontier.json", json.dumps(payload, indent=2) + "\n")
    atomic_write_text(sweep_dir / "frontier.txt", text + "\n")
    if any(t.objectives is not None for t in frontier.trials):
        plot_frontier(frontier, sweep_dir / "frontier.png")
        text += f"\nplot: {sweep_dir / 'frontier.png'}"
    return frontier, text

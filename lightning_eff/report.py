"""The end-of-run efficiency report: a printed table and `report.json` in the run directory.

The report is a list of sections. The app writes the `run` section (metrics, size, speed); every
capability adds its own by implementing `ReportContributor` on its callback or strategy, so a new
capability never edits this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch

from lightning_eff.checkpoints import atomic_write_text


@dataclass
class ReportSection:
    """One part of the report: headline figures, an optional table, and optional plots.

    Args:
        name: the section's key in `report.json` (``run``, ``pruning``, ...).
        summary: headline figures, name -> number or short string.
        rows: an optional table, one dict per row (e.g. one per layer).
        figures: paths of PNG plots, relative to the run directory.
    """

    name: str
    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)


@runtime_checkable
class ReportContributor(Protocol):
    """A callback or strategy that adds sections to the end-of-run report (called on global rank 0)."""

    def report_section(self, trainer: L.Trainer, run_dir: Path) -> ReportSection | list[ReportSection] | None: ...


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_dict_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor in the state_dict: what the weights take on disk, give or take headers."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def contributed_sections(trainer: L.Trainer, run_dir: Path) -> list[ReportSection]:
    """Sections from every callback, and the strategy, that implements `ReportContributor`."""
    sections = []
    for contributor in [*trainer.callbacks, trainer.strategy]:  # type: ignore[attr-defined]
        if isinstance(contributor, ReportContributor):
            contributed = contributor.report_section(trainer, run_dir)
            if isinstance(contributed, ReportSection):
                sections.append(contributed)
            elif contributed:
                sections.extend(contributed)
    return sections


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_report(sections: list[ReportSection], run_dir: Path) -> Path:
    """Write `report.json`: one key per section, each with summary, rows and figures."""
    payload = {
        section.name: {
            key: ({k: _jsonable(v) for k, v in value.items()} if isinstance(value, dict) else value)
            for key, value in asdict(section).items()
            if key != "name"
        }
        for section in sections
    }
    path = run_dir / "report.json"
    atomic_write_text(path, json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _format_value(value: Any) -> str:
    value = _jsonable(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_report(sections: list[ReportSection]) -> str:
    """The report as aligned plain-text tables, for the terminal and log files."""
    lines: list[str] = []
    for section in sections:
        lines.append(f"== {section.name} ==")
        width = max((len(key) for key in section.summary), default=0)
        lines += [f"  {key:<{width}}  {_format_value(value)}" for key, value in section.summary.items()]
        if section.rows:
            columns = list(section.rows[0])
            cells = [[_format_value(row.get(column, "")) for column in columns] for row in section.rows]
            widths = [max(len(column), *(len(row[i]) for row in cells)) for i, column in enumerate(columns)]
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
            lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
        lines += [f"  figure: {figure}" for figure in section.figures]
    return "\n".join(lines)

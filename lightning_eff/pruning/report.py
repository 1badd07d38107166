"""The pruning section of a run's report: per-layer sparsity, the schedule plot, and for channels the groups."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_eff.pruning.export import summary_rows
from lightning_eff.pruning.plot import plot_pruning
from lightning_eff.pruning.sparse_format import packed_entry_bytes
from lightning_eff.report import ReportSection

if TYPE_CHECKING:
    from lightning_eff.pruning.callback import GradualPruning


def pruning_section(callback: GradualPruning, run_dir: Path) -> ReportSection:
    """Per-layer sparsity table and a plot of target vs achieved sparsity over steps."""
    zeros = callback.zero_counts()  # under FSDP2 counted on every rank at the end of fit: the report runs on rank 0
    layers = {name: count / callback._parameters[name].numel() for name, count in zeros.items()}
    figure = plot_pruning(callback.history, layers, run_dir / "pruning.png")
    nonzero = sum(callback._parameters[name].numel() - count for name, count in zeros.items())
    aliases = {t.weight: t.aliases for t in callback._live_targets()}
    rows: list[dict[str, Any]] = [
        {"layer": name, "shape": "x".join(map(str, callback._parameters[name].shape)), "sparsity": value}
        for name, value in layers.items()
    ]
    if any(aliases.values()):
        for row in rows:
            row["tied_to"] = ", ".join(aliases[row["layer"]])
    summary: dict[str, Any] = {}
    if callback.plan is not None:  # granularity="channels"
        summary["groups"] = callback.group_sparsity
        summary["skipped_groups"] = {s.group.name: list(s.reasons) for s in callback.plan.skipped}
        summary["shrink"] = summary_rows(callback.shrink_summary)
    return ReportSection(
        name="pruning",
        summary={
            "granularity": callback.granularity
            + (f" {callback.pattern[0]}:{callback.pattern[1]}" if callback.pattern else ""),
            "scope": callback.scope,
            "schedule": callback.schedule_kind,
            "target_sparsity": callback.target_sparsity,
            "achieved_sparsity": callback._overall(layers),
            "reached_target": callback.reached_target,
            "end_step": callback._schedule.end_step if callback._schedule else callback.end_step,
            "planned_steps": callback._planned_steps,
            "continued_from_sparsity": callback._carried,
            "targeted_weights": sum(callback._parameters[name].numel() for name in layers),
            "nonzero_targeted_weights": nonzero,
            "mask_updates": len(callback.history),
            "tied": {name: list(names) for name, names in aliases.items() if names},
            **packed_bytes(callback, zeros),
            "left_dense": dict(callback.left_dense),
            **summary,
        },
        rows=rows,
        figures=[figure.name],
    )


def packed_bytes(callback: GradualPruning, zeros: dict[str, int]) -> dict[str, int]:
    """Bytes of the pruned weights on disk, dense and in `sparse_format` (bitmap + nonzero values), without writing."""
    dense = packed = 0
    for name, count in zeros.items():
        weight = callback._parameters[name]
        size = weight.numel() * weight.element_size()
        dense += size
        packed += min(size, packed_entry_bytes(weight.numel(), weight.numel() - count, weight.element_size()))
    return {"targeted_bytes_dense": dense, "targeted_bytes_packed": packed}

"""The balance report's picture: each rank's share of the global batch and its step time over training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on training nodes
import matplotlib.pyplot as plt

from lightning_eff.checkpoints import atomic_path


def plot_balance(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Write a two-panel PNG (shares, per-rank busy seconds per step in each re-plan window) to `path`; None if none."""
    if not history:
        return None
    steps = [entry["step"] for entry in history]
    ranks = len(history[0]["batch_sizes"])
    figure, (shares, busy) = plt.subplots(1, 2, figsize=(11, 4))
    for rank in range(ranks):
        total = [sum(entry["batch_sizes"]) for entry in history]
        shares.plot(steps, [e["batch_sizes"][rank] / t for e, t in zip(history, total, strict=True)], "o-",
                    label=f"rank {rank}")  # fmt: skip
        busy.plot(steps, [entry["busy_seconds"][rank] for entry in history], "o-", label=f"rank {rank}")
    shares.set(xlabel="optimizer step", ylabel="share of the global batch", ylim=(0, 1), title="Batch shares")
    busy.set(xlabel="optimizer step", ylabel="busy seconds per step", title="Per-rank step time (no waiting)")
    for axes in (shares, busy):
        axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)
    return path

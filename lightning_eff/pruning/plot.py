"""The pruning report's picture: target vs achieved sparsity over steps, and each layer's sparsity."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training nodes
import matplotlib.pyplot as plt

from lightning_eff.checkpoints import atomic_path


def plot_pruning(history: list[dict[str, float]], layer_sparsity: dict[str, float], path: Path) -> Path:
    """Write a two-panel PNG to `path` and return it."""
    figure, (over_steps, per_layer) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.3]})
    # A callback reused for several fits keeps one history; each fit's steps start again, so draw fits apart.
    fits: list[list[dict[str, float]]] = []
    for entry in history:
        if not fits or entry["step"] < fits[-1][-1]["step"]:
            fits.append([])
        fits[-1].append(entry)
    for index, fit in enumerate(fits or [[]]):
        steps = [entry["step"] for entry in fit]
        suffix = f", fit {index + 1}" if len(fits) > 1 else ""
        over_steps.step(steps, [entry["target"] for entry in fit], where="post", label=f"target (schedule){suffix}")
        over_steps.plot(steps, [entry["achieved"] for entry in fit], "o", markersize=3, label=f"achieved{suffix}")
    over_steps.set(xlabel="optimizer step", ylabel="sparsity of targeted weights", ylim=(0, 1))
    over_steps.set_title("Sparsity over training")
    over_steps.legend(loc="lower right")
    names = list(layer_sparsity)
    per_layer.barh(range(len(names)), [layer_sparsity[name] for name in names])
    per_layer.set_yticks(range(len(names)), [name.removesuffix(".weight") for name in names], fontsize=7)
    per_layer.invert_yaxis()
    per_layer.set(xlabel="sparsity", xlim=(0, 1))
    per_layer.set_title("Final sparsity per layer")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)
    return path

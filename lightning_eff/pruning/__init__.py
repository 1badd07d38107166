"""Gradual pruning: a schedule, scores, masks (the functional core) and the GradualPruning callback."""

from lightning_eff.pruning.callback import GradualPruning
from lightning_eff.pruning.export import shrink
from lightning_eff.pruning.masks import apply_masks, compute_masks
from lightning_eff.pruning.schedule import SparsitySchedule

__all__ = ["GradualPruning", "SparsitySchedule", "apply_masks", "compute_masks", "shrink"]

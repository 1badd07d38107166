"""Importance scores: which weights, rows or groups matter least."""

from __future__ import annotations

import math

import torch


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """|w| per element: the magnitude criterion of gradual magnitude pruning."""
    return weight.detach().abs()


def channel_norms(weight: torch.Tensor) -> torch.Tensor:
    """Root-mean-square of each output row (Linear) or filter (Conv), shape [out].

    RMS rather than the plain L2 norm, so rows of layers with different fan-in compare on one scale
    when channels are ranked globally.
    """
    rows = weight.detach().reshape(weight.shape[0], -1)
    return rows.norm(dim=1) / rows.shape[1] ** 0.5


def nm_group_cost(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """For each group of `m` consecutive input weights, the magnitude lost by zeroing its `n` smallest.

    Shape [out, in // m]; the groups with the lowest cost are made N:M first.
    """
    groups = weight.detach().abs().reshape(weight.shape[0], math.prod(weight.shape[1:]) // m, m)
    return groups.topk(n, dim=2, largest=False).values.sum(dim=2)

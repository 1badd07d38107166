"""Deep Gradient Compression's pieces for `TopK` (Lin et al. 2018): the sparsity warm-up and the sampled top-k.

Both are plain functions of their inputs (the step, a seeded generator), so nothing here has state to save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

WARMUP_START = 0.25  # the paper's first warm-up density (75% sparsity)
WARMUP_FACTOR = 4.0  # each stage keeps a quarter of the last: 75%, 93.75%, 98.4%, 99.6%, then the target
MIN_SAMPLES = 256  # a threshold estimated from fewer |v| values is too noisy to be worth it
# Below this many elements an exact top-k costs about what the sampled threshold's comparison and `nonzero` cost on
# the CPU (measured, 1% density: 0.3 ms vs 0.2 ms at 65k elements; at 1M, 9.3 ms vs 3.1 ms; at 4M, 72 vs 13 ms).
MIN_SAMPLED_NUMEL = 1 << 20
MAX_LOWERINGS = 3  # a threshold that selects fewer than k is lowered this many times, then exact top-k


def warmup_densities(ratio: float) -> list[float]:
    """The warm-up stages before `ratio`: 0.25, 0.0625, ... while still denser than `ratio` (none if ratio >= 0.25)."""
    stages, density = [], WARMUP_START
    while density > ratio:
        stages.append(density)
        density /= WARMUP_FACTOR
    return stages


def warmup_density(step: int, ratio: float, warmup_steps: int) -> float:
    """The share of each gradient sent at `step`: the warm-up stages, each for an equal part of `warmup_steps`
    (the paper's exponential 75% -> 99.9% over its first epochs), then `ratio`."""
    stages = warmup_densities(ratio)
    if step >= warmup_steps or not stages:
        return ratio
    return stages[step * len(stages) // warmup_steps]


@dataclass(frozen=True)
class Selection:
    """The `k` indices chosen, and how: candidates above the sampled threshold, and whether it fell back to exact."""

    indices: Tensor
    candidates: int
    exact: bool


def sampled_topk(importance: Tensor, k: int, sample_ratio: float, generator: torch.Generator) -> Selection:
    """The indices of the `k` largest values of the 1-D `importance` (|v|), without a top-k over all of it.

    A threshold is estimated from a random sample (`sample_ratio` of the elements, at least `MIN_SAMPLES`), aimed
    a little low so that usually somewhat more than k elements pass; those candidates' own top-k is then exactly
    the top-k of the whole tensor (ties aside), at the cost of a comparison over every element and a top-k over
    the few candidates. A threshold that passes fewer than k is lowered (the sample's next order statistics); after
    `MAX_LOWERINGS` tries, or for a tensor under `MIN_SAMPLED_NUMEL` elements (where an exact top-k is as cheap),
    it is an exact top-k over everything.
    """
    numel = importance.numel()
    samples = max(MIN_SAMPLES, math.ceil(sample_ratio * numel))
    if k >= numel or numel < MIN_SAMPLED_NUMEL or 4 * samples > numel:
        return Selection(importance.topk(k, sorted=False).indices, numel, True)
    sample = importance[torch.randint(numel, (samples,), generator=generator, device=importance.device)]
    order = sample.sort(descending=True).values
    position = math.ceil(1.25 * k * samples / numel)  # aim for about 1.25 k candidates
    for _ in range(MAX_LOWERINGS + 1):
        threshold = order[min(position, samples) - 1]
        candidates = torch.nonzero(importance >= threshold).view(-1)
        if candidates.numel() >= k:
            chosen = importance[candidates].topk(k, sorted=False).indices
            return Selection(candidates[chosen], candidates.numel(), False)
        position *= 2
    return Selection(importance.topk(k, sorted=False).indices, numel, True)

"""Masks from scores: exact counts, one global threshold, whole channels, N:M groups."""

from __future__ import annotations

import pytest
import torch

from lightning_eff.pruning.masks import apply_masks, compute_masks, parse_pattern, zero_fraction


@pytest.fixture
def weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=generator),
        "b.weight": 3 * torch.randn(16, 64, generator=generator),
        "c.weight": torch.randn(8, 4, 3, 3, generator=generator),
    }


def _pruned_share(masks: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> float:
    total = sum(w.numel() for w in weights.values())
    return sum(int(masks[n].expand_as(w).sum()) for n, w in weights.items()) / total


def test_global_unstructured_uses_one_threshold(weights: dict[str, torch.Tensor]) -> None:
    masks = compute_masks(weights, 0.7, "unstructured", "global")
    total = sum(w.numel() for w in weights.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.7 * total)
    largest_pruned = max(float(w.abs()[masks[n]].max()) for n, w in weights.items())
    smallest_kept = min(float(w.abs()[~masks[n]].min()) for n, w in weights.items())
    assert largest_pruned <= smallest_kept
    # the scaled-up layer keeps more of its weights than the others under one threshold
    assert masks["b.weight"].float().mean() < masks["a.weight"].float().mean()


def test_layer_unstructured_prunes_each_tensor_exactly(weights: dict[str, torch.Tensor]) -> None:
    masks = compute_masks(weights, 0.7, "unstructured", "layer")
    for name, weight in weights.items():
        assert int(masks[name].sum()) == round(0.7 * weight.numel())


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_channels_prune_whole_rows_and_keep_one_per_layer(weights: dict[str, torch.Tensor], scope: str) -> None:
    masks = compute_masks(weights, 0.6, "channels", scope)
    for name, weight in weights.items():
        assert masks[name].shape == (weight.shape[0], *([1] * (weight.dim() - 1)))
        assert int((~masks[name]).sum()) >= 1
    assert abs(_pruned_share(masks, weights) - 0.6) < 0.03
    extreme = compute_masks(weights, 0.99, "channels", scope)
    assert all(int((~m).sum()) >= 1 for m in extreme.values())


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_n_m_masks_reach_the_pattern(sparsity: float, scope: str) -> None:
    generator = torch.Generator().manual_seed(1)
    weights = {"x": torch.randn(32, 64, generator=generator), "y": torch.randn(16, 32, generator=generator)}
    masks = compute_masks(weights, sparsity, "n:m", scope, pattern=(2, 4))
    assert _pruned_share(masks, weights) == pytest.approx(sparsity, abs=1e-3)
    for mask in masks.values():
        zeros_per_group = mask.reshape(mask.shape[0], -1, 4).sum(dim=2)
        assert (zeros_per_group <= 2).all() if sparsity <= 0.5 else (zeros_per_group >= 2).all()
        if sparsity == 0.5:
            assert (zeros_per_group == 2).all()


def test_masks_grow_monotonically_once_applied(weights: dict[str, torch.Tensor]) -> None:
    live = {name: w.clone() for name, w in weights.items()}
    previous = {name: torch.zeros_like(w, dtype=torch.bool) for name, w in live.items()}
    for sparsity in (0.2, 0.5, 0.8):
        masks = compute_masks(live, sparsity, "unstructured", "global")
        apply_masks(live, masks)
        assert all((masks[n] | ~previous[n]).all() for n in live)  # nothing pruned before comes back
        previous = masks
    assert zero_fraction(live) == pytest.approx(0.8, abs=1e-3)


def test_apply_masks_zeroes_in_place_without_new_tensors(weights: dict[str, torch.Tensor]) -> None:
    live = {name: w.clone() for name, w in weights.items()}
    storage = {name: w.data_ptr() for name, w in live.items()}
    masks = compute_masks(live, 0.5, "channels", "layer")
    apply_masks(live, masks)
    assert {name: w.data_ptr() for name, w in live.items()} == storage
    for name, weight in live.items():
        assert (weight[masks[name].reshape(-1)] == 0).all()


@pytest.mark.parametrize(
    ("pattern", "message"), [("2-4", "must look like N:M"), ("4:2", "need 0 < N < M"), ("0:4", "0 < N")]
)
def test_parse_pattern_refuses_bad_patterns(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_pattern(pattern)
    assert parse_pattern(" 2 : 4 ") == (2, 4)

"""Physically remove pruned channels: the step that turns channel sparsity into a smaller, faster model.

Which entries go together comes from the model's own graph (`dependency.analyze`): a producer's rows and bias,
the BatchNorm entries that normalize them, every consumer's input columns, every other producer added into the
same stream, whole attention heads. `shrink` either returns a smaller model that computes what the masked (or
zeroed) model computes, with a per-layer summary, or raises `ShrinkError` naming the layers and why: it never
returns the model unchanged without a word.

A model that went through quantization-aware training holds fake-quantized layers; `shrink` works on a
copy where `lightning_eff.quantization.restore_float_modules` has turned them back into float layers
(same Parameters), so the smaller model is a float model, ready for `quantization.convert` again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_eff.pruning.dependency import ChannelGroup, analyze
from lightning_eff.pruning.layers import prunable_kind
from lightning_eff.pruning.structured_shrink import (
    LayerShrink,
    ShrinkError,
    detached_copy,
    pruned_units,
    shrink_groups,
    unit_masks,
)
from lightning_eff.quantization.prepare import FAKE_QUANTIZED, restore_float_modules

__all__ = ["LayerShrink", "ShrinkError", "shrink", "shrink_with_groups", "summary_rows"]


def _float_copy(model: nn.Module) -> nn.Module:
    """`model`, or a copy of it with its fake-quantized layers restored to float (shrink needs plain layers)."""
    if not any(isinstance(module, FAKE_QUANTIZED) for module in model.modules()):
        return model
    rank_zero_info("shrink: fake-quantized layers restored to float ones (restore_float_modules); "
                   "the smaller model is a float model")  # fmt: skip
    return restore_float_modules(detached_copy(model))


def shrink_with_groups(
    model: nn.Module, groups: Sequence[ChannelGroup], masks: Mapping[str, Tensor]
) -> tuple[nn.Module, dict[str, LayerShrink]]:
    """`structured_shrink.shrink_groups` after QAT too: the smaller model and what changed, per layer."""
    if not groups:
        raise ShrinkError("no channel group to shrink: the model's graph has none that can be pruned")
    return shrink_groups(_float_copy(model), groups, masks)


def summary_rows(summary: Mapping[str, LayerShrink]) -> list[dict[str, Any]]:
    """One row per changed layer: parameters before/after and the shapes that changed (for reports)."""
    return [
        {
            "layer": name,
            "kind": change.kind,
            "parameters_before": change.parameters[0],
            "parameters_after": change.parameters[1],
            "shapes": {
                leaf: f"{'x'.join(map(str, a))} -> {'x'.join(map(str, b))}" for leaf, (a, b) in change.shapes.items()
            },
        }
        for name, change in summary.items()
    ]


def _consumer_side(model: nn.Module, name: str, dim: int) -> bool:
    """Whether (parameter `name`, `dim`) is a layer's input dimension: it multiplies the channel, never makes it."""
    module_name, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    kind = prunable_kind(module)
    if kind is None or leaf != kind.weight:
        return False
    weight = getattr(module, leaf)
    return dim == kind.input_dim % weight.dim()


def zeroed_units(model: nn.Module, groups: Sequence[ChannelGroup]) -> list[tuple[ChannelGroup, Tensor]]:
    """Per group, the units whose every producing entry (rows, biases, norm affine entries) is exactly zero."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    found = []
    for group in groups:
        dead = torch.ones(group.size, dtype=torch.bool)
        producing = [m for m in group.members if m.name in parameters and not _consumer_side(model, m.name, m.dim)]
        for member in producing:
            moved = parameters[member.name].detach().movedim(member.dim, 0)
            slices = moved[member.index.reshape(-1).to(moved.device)].reshape(member.index.shape[0], -1)
            dead &= (slices == 0).all(1).cpu()
        if dead.all():  # a layer with every channel zeroed keeps one (zero) channel: the model stays connected
            dead[0] = False
        found.append((group, dead if producing else torch.zeros(group.size, dtype=torch.bool)))
    return found


def _leaves(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [leaf for value in output.values() for leaf in _leaves(value)]
    if isinstance(output, (list, tuple)):
        return [leaf for value in output for leaf in _leaves(value)]
    return []


@torch.no_grad()
def shrink(
    model: nn.Module, example_kwargs: Mapping[str, Any] | None = None, masks: Mapping[str, Tensor] | None = None
) -> tuple[nn.Module, dict[str, LayerShrink]]:
    """A smaller copy of a channel-pruned `model` with the same outputs, and what changed per layer.

    The channel groups are found by tracing `model` on `example_kwargs` (``model(**example_kwargs)`` must run).
    With `masks` (True = pruned, by parameter name, as `GradualPruning.masks`), the units they mask in every
    coupled parameter go; without, the units whose producing entries are all zero (rows, biases, BatchNorm
    weight and bias) go, and the shrunk outputs are checked against the model's on the example inputs. Module
    names and types stay, so the copy's `state_dict` has the original's keys with smaller shapes; `model` is not
    changed. Raises `ShrinkError` naming the layers when nothing can be removed or a removal is not exact.

    Example::

        small, summary = shrink(model, {"x": images[:2]})
    """
    if example_kwargs is None:
        raise ShrinkError("shrink(model) needs example_kwargs, the inputs of model.forward (e.g. {'x': batch}), to "
                          "find which channels are coupled; GradualPruning(granularity='channels').shrink(model) "
                          "knows them from training")  # fmt: skip
    plain = _float_copy(model)
    analysis = analyze(plain, example_kwargs)
    skipped = "; ".join(f"{s.group.name}: {s.reasons[0]}" for s in analysis.skipped[:8])
    more = f" (and {len(analysis.skipped) - 8} more)" if len(analysis.skipped) > 8 else ""
    if not analysis.groups:
        raise ShrinkError(f"{type(model).__name__} has no channel group that can be removed exactly; skipped: "
                          f"{skipped or 'none found'}{more}")  # fmt: skip
    zeroed = masks is None
    if masks is None:
        masks = unit_masks(plain, zeroed_units(plain, analysis.groups))
    parameters = dict(plain.named_parameters(remove_duplicate=False))
    if not any(pruned_units(group, masks, parameters).any() for group in analysis.groups):
        what = "zeroed channel" if zeroed else "unit masked in every coupled parameter"
        raise ShrinkError(f"no {what} in any prunable group of {type(model).__name__} "
                          f"({', '.join(g.name for g in analysis.groups)}); skipped: {skipped or 'none'}"
                          f"{more}")  # fmt: skip
    shrunk, summary = shrink_groups(plain, analysis.groups, masks)
    if zeroed:
        was = plain.training
        expected = _leaves(plain.eval()(**analysis.example_kwargs))
        plain.train(was)
        got = _leaves(shrunk.eval()(**analysis.example_kwargs))
        for e, g in zip(expected, got, strict=False):
            if e.is_floating_point() and not torch.allclose(
                g, e, rtol=1e-4, atol=1e-5 * max(1.0, e.abs().max().item())
            ):
                layers = ", ".join(summary)
                raise ShrinkError(f"removing the zeroed channels of {layers} changes the outputs by "
                                  f"{(g - e).abs().max().item():.3g}: a zero channel does not stay zero on its way "
                                  "(an activation with f(0) != 0?); prune with GradualPruning(granularity='channels'), "
                                  "which masks the consumers too")  # fmt: skip
    return shrunk, summary

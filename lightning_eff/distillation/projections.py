"""Intermediate-layer distillation's learned projections: built when widths differ, dropped for export.

A student layer narrower (or wider) than its teacher layer is compared through an ``nn.Linear`` from the
student's width to the teacher's. The projections live in the LightningModule as the ``ModuleDict``
`PROJECTIONS`, so the optimizer, DDP, FSDP2 and checkpoints treat them like any other parameter; `strip` and
`stripped_copy` leave them out of what is exported.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from lightning_eff.distillation.losses import pick_output
from lightning_eff.sharding import is_sharded, unsharded_copy

PROJECTIONS = "lightning_eff_distillation_projections"
"""The LightningModule attribute under which `layers` projections are registered (see `KnowledgeDistillation`)."""
_WIDTH_ATTRIBUTES = ("out_features", "nf", "embedding_dim", "hidden_size", "embed_dim", "out_channels")


def output_width(module: nn.Module) -> int | None:
    """The width of the module's output (its last dimension) as its structure says: the module's own
    ``out_features`` (``nf``, ``embedding_dim``, ...), else that of its last submodule that has one."""
    for candidate in [module, *reversed(list(module.modules())[1:])]:
        for attribute in _WIDTH_ATTRIBUTES:
            value = getattr(candidate, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        if isinstance(candidate, nn.LayerNorm) and candidate.normalized_shape:
            return int(candidate.normalized_shape[-1])
        weight = getattr(candidate, "weight", None)
        if type(candidate).__name__.endswith("Norm") and isinstance(weight, Tensor) and weight.dim() == 1:
            return int(weight.shape[0])  # RMSNorm and friends
    return None


def projection_key(student_layer: str) -> str:
    return student_layer.replace(".", "__")


def projections_of(model: nn.Module) -> nn.ModuleDict | None:
    found = getattr(model, PROJECTIONS, None)
    return found if isinstance(found, nn.ModuleDict) else None


def build_projections(
    student: nn.Module, teacher: nn.Module, layers: Mapping[str, str]
) -> tuple[nn.ModuleDict, dict[str, tuple[int, int]]]:
    """The student's projections (its existing ones reused where the shape still fits, new ones added) and
    ``{student layer: (student width, teacher width)}`` for each pair whose widths differ. Pairs whose widths
    are equal, or unknown until the first step, get none."""
    projections = projections_of(student) or nn.ModuleDict()
    projected: dict[str, tuple[int, int]] = {}
    for student_layer, teacher_layer in layers.items():
        student_width = output_width(student.get_submodule(student_layer))
        teacher_width = output_width(teacher.get_submodule(teacher_layer))
        if student_width is None or teacher_width is None or student_width == teacher_width:
            continue
        key = projection_key(student_layer)
        existing = projections[key] if key in projections else None  # noqa: SIM401 (ModuleDict has no get)
        shape = (student_width, teacher_width)
        if not (isinstance(existing, nn.Linear) and (existing.in_features, existing.out_features) == shape):
            projections[key] = nn.Linear(student_width, teacher_width)
        projected[student_layer] = shape
    return projections, projected


def projected_output_hook(
    name: str, outputs: dict[str, Tensor], projection: nn.Module | None, width: int | None
) -> Callable[..., None]:
    """A forward hook that stores the layer's picked output in `outputs[name]`, through `projection` if any."""

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        picked = pick_output(output)
        if projection is not None:
            if picked.shape[-1] != width:
                raise ValueError(
                    f"KnowledgeDistillation: layers[{name!r}]'s output has last dimension {picked.shape[-1]}, "
                    f"not the {width} its projection was built for"
                )
            picked = projection(picked)  # inside the module's forward: DDP sees the projection used
        outputs[name] = picked

    return hook


def strip(model: nn.Module) -> nn.Module:
    """Remove the projections from `model`, in place, for export or inference; returns `model`.

    Not for a model FSDP2 still trains (its sharded parameter groups include them): use `stripped_copy`.
    """
    if PROJECTIONS in model._modules:
        del model._modules[PROJECTIONS]
    return model


def stripped_copy(model: nn.Module) -> nn.Module:
    """A plain copy of `model` without the projections, the trained model left as it is.

    A sharded model (FSDP2) is gathered with `sharding.unsharded_copy` (FSDP2 refuses deepcopy): a collective,
    every rank must call it; the copy is unsharded, on the CPU. Any other model is deep-copied.
    """
    copied = unsharded_copy(model) if is_sharded(model) else copy.deepcopy(model)
    assert copied is not None  # every rank keeps its copy (rank0_only=False)
    return strip(copied)

"""The teacher's side of distillation: taking it (``teacher="initial"``), freezing it, running it, recognizing it.

The teacher is never part of the LightningModule: it is prepared here (device, dtype, frozen, eval mode) and
run under ``no_grad`` on the inputs the student's forward got. Under FSDP2 it stays whole on every rank: it has
no gradients and no optimizer state, so a full copy costs its weights alone (half of them in bf16).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.distillation.losses import OutputKey, pick_output
from lightning_eff.sharding import is_sharded, unsharded_copy

INITIAL = "initial"
"""``teacher="initial"``: the student as it is at `setup` (its loaded or pretrained weights), copied and frozen."""
PRECISIONS = ("bf16",)


def initial_teacher(student: nn.Module, drop: Iterable[str] = ()) -> nn.Module:
    """A frozen float copy of `student` as it is now: what ``teacher="initial"`` distils from.

    Taken in `setup`, before any optimizer step (so before pruning's first masks) and, on a first `fit`, before
    ``configure_model`` shards the module. A module that is already sharded (FSDP2, a later `fit`) is gathered
    with `sharding.unsharded_copy` (a collective: every rank calls `setup`), since FSDP2 refuses deepcopy.
    Layers that quantization-aware training already swapped in are turned back into float ones in the copy
    (`restore_float_modules`); the child modules named in `drop` (the distillation's own projections of a
    resumed student) are removed from it.
    """
    from lightning_eff.quantization import restore_float_modules  # the student's QAT layers, back to float

    copied = unsharded_copy(student) if is_sharded(student) else copy.deepcopy(student)
    assert copied is not None  # every rank keeps its copy (rank0_only=False)
    teacher = restore_float_modules(copied)
    for name in [n for n, _ in teacher.named_children() if n in set(drop)]:
        delattr(teacher, name)
    return teacher


def prepare_teacher(teacher: nn.Module, device: torch.device, precision: str | None) -> None:
    """Move `teacher` to `device` (cast to bfloat16 for ``precision="bf16"``), freeze it and put it in eval mode."""
    teacher.to(device=device, dtype=torch.bfloat16 if precision == "bf16" else None)
    teacher.requires_grad_(False)
    teacher.eval()


def run_teacher(
    teacher: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output: OutputKey,
    precision: str | None,
    layers: Iterable[str] = (),
) -> tuple[Tensor, dict[str, Tensor]]:
    """The teacher's picked output on the student's inputs, and the picked outputs of its `layers`, under no_grad.

    With ``precision="bf16"`` floating-point inputs are cast to the teacher's dtype first.
    """
    outputs: dict[str, Tensor] = {}
    handles = [teacher.get_submodule(name).register_forward_hook(_store(outputs, name)) for name in set(layers)]
    try:
        with torch.no_grad():
            dtype = next((p.dtype for p in teacher.parameters()), None)
            if precision == "bf16" and dtype is not None:
                args, kwargs = _cast_floats((args, kwargs), dtype)
            picked = pick_output(teacher(*args, **kwargs), output)
    finally:
        for handle in handles:
            handle.remove()
    return picked, outputs


def fingerprint(teacher: nn.Module) -> dict[str, Any]:
    """Parameter count, a hash of names and shapes, and sums of a few parameters (rounded to bfloat16 first,
    so the teacher cast by ``teacher_precision="bf16"`` has the same fingerprint): what a checkpoint stores
    instead of the teacher's weights."""
    named = list(teacher.named_parameters())
    shapes = "".join(f"{name}:{tuple(p.shape)};" for name, p in named)
    picked = sorted({round(i * (len(named) - 1) / 15) for i in range(16)}) if named else []
    with torch.no_grad():
        sums = [float(named[i][1].detach().to(torch.bfloat16).double().sum()) for i in picked]
    return {
        "parameters": sum(p.numel() for _, p in named),
        "shapes": hashlib.sha1(shapes.encode()).hexdigest()[:16],
        "sums": sums,
    }


def check_same_teacher(theirs: dict[str, Any], ours: dict[str, Any]) -> None:
    """Raise a ValueError saying how the checkpoint's teacher (`theirs`) differs from this run's (`ours`)."""
    same = (
        theirs["parameters"] == ours["parameters"]
        and theirs["shapes"] == ours["shapes"]
        and len(theirs["sums"]) == len(ours["sums"])
        and all(
            math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4) for a, b in zip(theirs["sums"], ours["sums"], strict=True)
        )
    )
    if not same:
        why = "another architecture" if theirs["shapes"] != ours["shapes"] else "the same shapes, other weights"
        raise ValueError(
            f"KnowledgeDistillation: the checkpoint was distilled from another teacher ({why}: "
            f"{theirs['parameters']} parameters, fingerprint {theirs['shapes']}; this run's teacher has "
            f"{ours['parameters']}, {ours['shapes']}); resume with the same teacher"
        )


def _store(outputs: dict[str, Tensor], name: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        outputs[name] = pick_output(output)

    return hook


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast_floats(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast_floats(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value

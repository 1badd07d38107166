"""Saving a converted model so it runs without the training code: a `torch.export` program, and its loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.checkpoints import atomic_path
from lightning_eff.quantization.convert import quantized_layers
from lightning_eff.quantization.schemes import SCHEMES

FORMAT = "lightning_eff.quantized/1"


def save_quantized(model: nn.Module, path: str | Path, example_args: tuple[Any, ...]) -> Path:
    """Write `model` as a `torch.export` program (no Python class needed to load it), batch size dynamic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = tuple({0: torch.export.Dim.AUTO} if isinstance(a, Tensor) else None for a in example_args)
    program = torch.export.export(model.eval(), example_args, dynamic_shapes=dynamic)
    with atomic_path(path) as temporary:  # a job killed mid-write leaves the previous file, not half of one
        torch.export.save(program, str(temporary), extra_files={"format": FORMAT, "scheme": _scheme_names(model)})
    return path


def _scheme_names(model: nn.Module) -> str:
    return ",".join(sorted({layer.scheme.name for layer in quantized_layers(model).values()}))


def load_quantized(path: str | Path) -> nn.Module:
    """The model `save_quantized` (or `QuantizationAwareTraining(export_path=...)`) wrote, ready to call."""
    extra = {"format": "", "scheme": ""}
    program = torch.export.load(str(path), extra_files=extra)
    if extra["format"] != FORMAT:
        raise ValueError(f"{path} is not a lightning_eff quantized model (format {extra['format']!r})")
    unknown = [name for name in extra["scheme"].split(",") if name and name not in SCHEMES]
    if unknown:
        raise ValueError(f"{path} uses schemes this version does not know: {unknown}")
    return program.module()

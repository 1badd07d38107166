"""One forward of a model on an example, to watch it with hooks without changing anything (modes, RNG)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

FAILED = object()
"""What `probe_forward` returns when the model cannot run the example (the caller falls back to the structure)."""


def probe_forward(
    model: nn.Module, example: tuple[tuple[Any, ...], dict[str, Any]], handles: Sequence[RemovableHandle]
) -> Any:
    """`model(*args, **kwargs)` in eval mode without gradients, its output or `FAILED`; then the `handles` (the
    caller's hooks) are removed and every module's training flag and the CPU RNG are as they were."""
    modes = {module: module.training for module in model.modules()}
    args, kwargs = example
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            return model(*args, **kwargs)
    except Exception:  # an example the model cannot run
        return FAILED
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training

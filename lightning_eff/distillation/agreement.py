"""How far a student agrees with its teacher: what the report quotes, beside the loss that was minimized.

A loss value means little across losses and temperatures; an agreement does: the share of positions where the
student's argmax is the teacher's (``argmax``: classifiers and language models), or the mean cosine similarity
of the two outputs along the last dimension (``cosine``: embeddings and hidden states, where an argmax means
nothing). `agreement_totals` gives a sum and a count, so batches (and ranks) add up exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_eff.distillation.losses import LossFn

AGREEMENTS = ("argmax", "cosine")


def agreement_kind(loss: str | LossFn) -> str:
    """The agreement that matches a loss: ``argmax`` for ``kl`` (logits), ``cosine`` for every other loss
    (``mse``, ``cosine`` and callables compare embeddings or hidden states)."""
    return "argmax" if loss == "kl" else "cosine"


@torch.no_grad()
def agreement_totals(student: Tensor, teacher: Tensor, kind: str) -> Tensor:
    """``[sum, count]`` (float64) over every position (all dimensions but the last) of the `kind` agreement."""
    if kind == "argmax":
        per_position = (student.argmax(-1) == teacher.argmax(-1)).double()
    elif kind == "cosine":
        per_position = F.cosine_similarity(student.double(), teacher.double(), dim=-1)
    else:
        raise ValueError(f"unknown agreement {kind!r}: use one of {', '.join(AGREEMENTS)}")
    return torch.stack([per_position.sum(), per_position.new_tensor(float(per_position.numel()))])


def agreement(student: Tensor, teacher: Tensor, kind: str = "argmax") -> Tensor:
    """The mean `kind` agreement of two outputs of the same shape (see the module)."""
    total, count = agreement_totals(student, teacher, kind)
    return (total / count).float()

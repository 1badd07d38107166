"""The functional core of knowledge distillation: the losses between a student's and a teacher's outputs.

Every loss takes ``(student, teacher)`` tensors of the same shape and returns a scalar:

- ``kl``: Hinton et al.'s soft-target loss on the last dimension,
  ``KL(softmax(teacher / T) || softmax(student / T)) * T**2``, summed over the last dimension and averaged over
  every other position (so a language model's loss is per token, a classifier's per example; for a 2-D input this
  is ``F.kl_div(..., reduction="batchmean") * T**2``). The ``T**2`` keeps the gradient's size independent of T.
- ``mse``: mean squared error.
- ``cosine``: ``1 - cosine similarity`` on the last dimension, averaged.
- a callable ``loss(student, teacher) -> Tensor``.

`pick_output` finds the tensor a model's output means (the tensor itself, a tuple's first tensor, a dict's or
Hugging Face ``ModelOutput``'s ``logits``, then ``last_hidden_state``). How far the outputs agree is in
`agreement`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor
from torch.nn import functional as F

LossFn = Callable[[Tensor, Tensor], Tensor]
LOSSES = ("kl", "mse", "cosine")


def kl_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Hinton et al.'s soft-target KL on the last dimension, times ``temperature**2``, mean over the other dims."""
    classes = student.shape[-1]
    log_p_student = F.log_softmax(student.reshape(-1, classes).float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.reshape(-1, classes).float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def mse_loss(student: Tensor, teacher: Tensor) -> Tensor:
    return F.mse_loss(student.float(), teacher.float())


def cosine_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``1 - cosine similarity`` along the last dimension, averaged over every other position."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def make_loss(loss: str | LossFn, temperature: float = 1.0) -> LossFn:
    """The loss function for a name in `LOSSES` (``kl`` with `temperature`) or a callable, as is."""
    if callable(loss):
        return loss
    if loss == "kl":
        return lambda student, teacher: kl_loss(student, teacher, temperature)
    if loss == "mse":
        return mse_loss
    if loss == "cosine":
        return cosine_loss
    raise ValueError(f"unknown distillation loss {loss!r}: use one of {', '.join(LOSSES)} or a callable")


OutputKey = str | int | Callable[[Any], Tensor] | None


def pick_output(output: Any, key: OutputKey = None) -> Tensor:
    """The tensor a model's `output` means.

    With ``key=None``: a tensor; a tuple's or list's first tensor (searched recursively); a dict's or Hugging Face
    ``ModelOutput``'s ``logits``, else ``last_hidden_state``. A string `key` picks that dict key or attribute
    first, an int that tuple position, and the tensor in it is found as above (a tuple gives its first tensor);
    a callable is called on the output and must return a tensor.
    """
    if callable(key):
        return _tensor_in(key(output), "the output callable's result")
    if isinstance(key, str):
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if value is None:
            raise KeyError(f"the model's output ({type(output).__name__}) has no {key!r}")
        return _tensor_in(value, f"output {key!r}")
    if isinstance(key, int):
        if not isinstance(output, (tuple, list)):
            raise TypeError(f"output={key} picks a tuple position, but the model returned a {type(output).__name__}")
        return _tensor_in(output[key], f"output position {key}")
    return _tensor_in(output, "the model's output")


def _tensor_in(output: Any, what: str) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) or hasattr(output, "logits") or hasattr(output, "last_hidden_state"):
        for name in ("logits", "last_hidden_state"):
            value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
            if isinstance(value, Tensor):
                return value
    if isinstance(output, (tuple, list)):
        for item in output:
            try:
                return _tensor_in(item, what)
            except TypeError:
                continue
    raise TypeError(
        f"cannot find a tensor in {what} (a {type(output).__name__}): expected a tensor, a tuple of them, or a "
        "dict / ModelOutput with logits or last_hidden_state; pass output=<key or callable> to pick one"
    )

"""Which module types GradualPruning can prune, and how their weights are laid out: one registry.

A `PrunableKind` says where a module keeps the weight to prune and which of its dimensions is the output
channel and which the input. Masks use that layout: ``channels`` prunes whole output channels (rows of a
Linear, filters of a Conv, *columns* of Hugging Face's transposed `Conv1D`), ``n:m`` groups M consecutive
weights along the input dimension (columns of a Linear, *rows* of a `Conv1D`), ``unstructured`` ignores it.

Registered here (weight; output dim, input dim; whether n:m applies):

- ``nn.Linear`` and its subclasses (MultiheadAttention's ``out_proj`` among them): ``weight``; 0, 1; n:m.
- ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``: ``weight``; 0, 1; not n:m (2:4 kernels take 2-D weights).
- ``nn.MultiheadAttention``: the packed ``in_proj_weight`` (rows are the q, k, v outputs); 0, 1; n:m.
- Hugging Face ``transformers.pytorch_utils.Conv1D`` (weight [in, out]): ``weight``; 1, 0; n:m.
- ``nn.Embedding`` (weight [tokens, width]): ``weight``; 1, 0; not n:m; *opt-in*: pruned (unstructured) only when
  `include` names it, since a model's embeddings are a small share of its compute and pruning them changes
  every token's input.

Lookup follows the module's class hierarchy, so a subclass is pruned like its base unless it has its own
entry. A MultiheadAttention built with ``kdim``/``vdim`` other than ``embed_dim`` has no packed
``in_proj_weight`` (its ``q/k/v_proj_weight`` stay dense); its ``out_proj`` is still a Linear.

Hugging Face's `Conv1D` is registered lazily: the first time a model is scanned after
``transformers.pytorch_utils`` has been imported (a model that holds a `Conv1D` has imported it). Nothing
here imports transformers.

Another kind is one call away::

    register_prunable(MyTransposedLinear, weight="kernel", output_dim=1, input_dim=0)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PrunableKind:
    """How to prune one module type.

    Args:
        weight: attribute name of the parameter to prune (``weight``, ``in_proj_weight``); a module whose
            attribute is None or not yet initialized (lazy modules) is skipped.
        output_dim: the weight's output-channel dimension (what ``channels`` removes whole).
        input_dim: the weight's input dimension (what ``n:m`` groups run along).
        bias: attribute name of the parameter whose entry i belongs to output channel i (zeroed with a
            pruned channel), or None.
        nm: whether ``n:m`` applies to this kind (a weight multiplied as a matrix); with it, a layer is an
            n:m target when its input width is a multiple of M.
        opt_in: pruned only when `include` names the layer (unstructured granularity); invisible to the
            default selection and to channel groups.
    """

    weight: str = "weight"
    output_dim: int = 0
    input_dim: int = 1
    bias: str | None = "bias"
    nm: bool = True
    opt_in: bool = False

    def parameter(self, module: nn.Module) -> torch.Tensor | None:
        """The module's weight to prune, or None when it has none (yet)."""
        weight = getattr(module, self.weight, None)
        if not isinstance(weight, torch.Tensor) or nn.parameter.is_lazy(weight):
            return None
        return weight

    def input_width(self, module: nn.Module) -> int:
        weight = self.parameter(module)
        return 0 if weight is None else int(weight.shape[self.input_dim])


_KINDS: dict[type[nn.Module], PrunableKind] = {}
_LAZY_DONE: set[str] = set()


def register_prunable(
    module_type: type[nn.Module],
    weight: str = "weight",
    output_dim: int = 0,
    input_dim: int = 1,
    bias: str | None = "bias",
    nm: bool = True,
    opt_in: bool = False,
) -> PrunableKind:
    """Make `module_type` (and its subclasses) prunable by GradualPruning; replaces an earlier entry.

    Example::

        class Transposed(nn.Module):  # y = x @ kernel, kernel [in, out]
            ...

        register_prunable(Transposed, weight="kernel", output_dim=1, input_dim=0, bias=None)
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_prunable: {module_type!r} is not an nn.Module subclass")
    if not isinstance(weight, str) or not weight:
        raise ValueError(f"register_prunable: weight={weight!r} must be the weight's attribute name")
    if output_dim == input_dim:
        raise ValueError(f"register_prunable: output_dim and input_dim must differ, both are {output_dim}")
    kind = PrunableKind(weight=weight, output_dim=output_dim, input_dim=input_dim, bias=bias, nm=nm, opt_in=opt_in)
    _KINDS[module_type] = kind
    return kind


def unregister_prunable(module_type: type[nn.Module]) -> None:
    """Forget `module_type`'s entry (its subclasses fall back to their bases' entries)."""
    _KINDS.pop(module_type, None)


def _register_lazy() -> None:
    """Hugging Face's Conv1D (weight [in, out]), once transformers is loaded, unless a user registered it."""
    if "transformers" in _LAZY_DONE:
        return
    module = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(module, "Conv1D", None)
    if conv1d is None:
        return
    _LAZY_DONE.add("transformers")
    if conv1d not in _KINDS:
        register_prunable(conv1d, weight="weight", output_dim=1, input_dim=0)


def prunable_kinds() -> dict[type[nn.Module], PrunableKind]:
    """The registry as it stands: module type -> kind (a copy)."""
    _register_lazy()
    return dict(_KINDS)


def prunable_kind(module: nn.Module, opt_in: bool = False) -> PrunableKind | None:
    """The kind of `module` (the nearest registered class in its hierarchy), or None if it is not prunable.

    An opt-in kind (an Embedding) counts only with ``opt_in=True``: where `include` may name it.
    """
    _register_lazy()
    for cls in type(module).__mro__:
        kind = _KINDS.get(cls)
        if kind is not None:
            usable = kind.parameter(module) is not None and (opt_in or not kind.opt_in)
            return kind if usable else None
    return None


register_prunable(nn.Linear)
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_prunable(_conv, nm=False)
register_prunable(nn.MultiheadAttention, weight="in_proj_weight", bias="in_proj_bias")
register_prunable(nn.Embedding, output_dim=1, input_dim=0, bias=None, nm=False, opt_in=True)

"""Hugging Face ``save_pretrained`` on a converted model: refused, with what to do instead.

A converted model's `QuantizedLinear` layers hold integers and scales (``qweight``, ``scales``) where Hugging
Face expects a float ``weight``. ``save_pretrained`` would write them, and ``from_pretrained`` would rebuild
the float architecture, report those weights missing and initialize them at random: a silent, broken round
trip. A loader of our own would have to rebuild the quantized layers from the config and the state dict (and
`torch.export` already does that without any Python class), so the method is refused instead.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

from torch import nn

REFUSAL = (
    "save_pretrained is refused on a converted (quantized) model: its QuantizedLinear layers hold int8/int4 "
    "integers and scales that Hugging Face's from_pretrained does not know, so it would rebuild the float model "
    "with those weights missing and randomly initialized. To serve the quantized model, export it: "
    "QuantizationAwareTraining(export_path=...) or lightning_eff.quantization.save_quantized(model, path, args, "
    "kwargs), then load_quantized(path). For a float Hugging Face checkpoint, call "
    "lightning_eff.quantization.restore_float_modules(...) on the fake-quantized training model, then save_pretrained."
)


def refuse_save_pretrained(*args: Any, **kwargs: Any) -> NoReturn:
    """What ``save_pretrained`` becomes on a converted model (a plain function: it survives deepcopy and pickle)."""
    raise RuntimeError(REFUSAL)


def guard_save_pretrained(model: nn.Module) -> nn.Module:
    """Make ``save_pretrained`` raise `REFUSAL` on every Hugging Face model in `model` holding quantized layers.

    The method is replaced on those instances only (the class is untouched); `copy.deepcopy` and pickling keep
    the replacement, as it is an instance attribute holding a module-level function. Does nothing when
    transformers was never imported (then no module can be a `PreTrainedModel`). Returns `model`.
    """
    from lightning_eff.quantization.convert import quantized_layers  # here: convert.py imports this module

    modeling = sys.modules.get("transformers.modeling_utils")  # loaded whenever a PreTrainedModel exists
    pretrained = getattr(modeling, "PreTrainedModel", None)
    if pretrained is None:
        return model
    for module in model.modules():
        if isinstance(module, pretrained) and quantized_layers(module):
            module.save_pretrained = refuse_save_pretrained
    return model

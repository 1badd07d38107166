"""The named quantization schemes: what is fake-quantized in training and what the converted model stores.

Why the pieces behind each name are ours and torchao is the reference, not the backend (torchao 0.18,
torch 2.13, measured on this project's 2-core x86 CPU; `benchmarks/quantization.py`; its `--only gpu` part repeats
the H100 step-time measurement quoted below):

- training: torchao's `QATConfig` accepts the Intx bases below but refuses `Int8WeightOnlyConfig` and
  `Int8DynamicActivationInt8WeightConfig` ("Unexpected base config"), and its fake quantizers cost 2.85-3.05x
  the float step on an H100 where a plain elementwise one costs 1.04x compiled. `fake_quant.py` reproduces
  torchao's forward bit for bit (a test runs both) for all four schemes;
- conversion: torchao's converted Intx and Int8 models ran 1.0-2.6x *slower* than fp32 here, and this wheel
  ships none of its fast CPU kernels; `convert.py` uses `torch._int_mm` and bf16 matmuls (its docstring has
  the figures).

`QuantScheme.torchao_config` gives torchao's config for the same scheme, for the benchmark and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class QuantScheme:
    """One scheme.

    Args:
        name: the scheme's name, as `QuantizationAwareTraining(scheme=...)` and ``quantization=`` take it.
        weight_bits: 4 or 8; weights are symmetric (a zero weight stays zero).
        grouped: weights have one scale per `group_size` input columns (int4) rather than one per output row.
        activation_bits: 8 for int8 activations quantized per token at run time ("dynamic"), None for
            weight-only schemes that keep float activations.
    """

    name: str
    weight_bits: int
    grouped: bool
    activation_bits: int | None

    def weight_group_size(self, group_size: int) -> int | None:
        """The group size the weights use: `group_size` for grouped schemes, None (a whole row) otherwise."""
        return group_size if self.grouped else None

    def torchao_config(self, group_size: int) -> Any:
        """torchao's base config for the same scheme: the peer in the benchmark, and its PTQ/QAT path."""
        from torchao.quantization import (
            Int8DynamicActivationIntxWeightConfig,
            IntxWeightOnlyConfig,
        )
        from torchao.quantization.granularity import PerAxis, PerGroup

        granularity = PerGroup(group_size) if self.grouped else PerAxis(0)
        int4 = torch.int4  # type: ignore[attr-defined]  # in torch since 2.3, not in its stubs
        dtype = int4 if self.weight_bits == 4 else torch.int8
        if self.activation_bits is None:
            return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity)


SCHEMES: dict[str, QuantScheme] = {
    scheme.name: scheme
    for scheme in (
        QuantScheme("int8_dynamic_act_int4_weight", weight_bits=4, grouped=True, activation_bits=8),
        QuantScheme("int4_weight_only", weight_bits=4, grouped=True, activation_bits=None),
        QuantScheme("int8_weight_only", weight_bits=8, grouped=False, activation_bits=None),
        QuantScheme("int8_dynamic", weight_bits=8, grouped=False, activation_bits=8),
    )
}

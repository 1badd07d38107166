"""quantization: fake-quantized training (`QuantizationAwareTraining`) and conversion to a real low-bit model."""

from lightning_eff.quantization.callback import QuantizationAwareTraining
from lightning_eff.quantization.convert import QuantizedLinear, convert
from lightning_eff.quantization.export import load_quantized, save_quantized
from lightning_eff.quantization.prepare import FakeQuantizedLinear, restore_float_modules, select_layers
from lightning_eff.quantization.schemes import SCHEMES, QuantScheme

__all__ = [
    "SCHEMES",
    "FakeQuantizedLinear",
    "QuantScheme",
    "QuantizationAwareTraining",
    "QuantizedLinear",
    "convert",
    "load_quantized",
    "restore_float_modules",
    "save_quantized",
    "select_layers",
]

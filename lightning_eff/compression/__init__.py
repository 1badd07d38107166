"""Gradient compression for DDP: compressors, the comm hook that runs them, and the stats they produce.

Example::

    from lightning_eff.compression import CompressionHook, PowerSGD

    hook = CompressionHook(PowerSGD(rank=4, start_step=100), module=model)
    ddp_model.register_comm_hook(state=None, hook=hook)
"""

from lightning_eff.compression.auto import Auto
from lightning_eff.compression.base import Compressor, Dense
from lightning_eff.compression.casts import BF16, FP16
from lightning_eff.compression.hooks import CompressionHook, NonFiniteGradientWarning
from lightning_eff.compression.int8 import Int8
from lightning_eff.compression.local_sgd import LocalSGD
from lightning_eff.compression.powersgd import PowerSGD
from lightning_eff.compression.stats import CompressionStats, Traffic
from lightning_eff.compression.topk import TopK
from lightning_eff.compression.transport import BucketLayout, Collectives

# The per-bucket compressors: what a `CompressionHook` runs and `Auto` may try; `ddp_<name>` strategy names.
COMPRESSORS: dict[str, type[Compressor]] = {cls.name: cls for cls in (Dense, FP16, BF16, PowerSGD, TopK, Int8, Auto)}
# Every name ``EfficientDDPStrategy(compression=...)`` takes: the compressors, and LocalSGD, which averages
# parameters after the optimizer step instead of compressing gradient buckets.
COMPRESSION_CHOICES: dict[str, type[Compressor]] = {**COMPRESSORS, LocalSGD.name: LocalSGD}

__all__ = [
    "BF16",
    "COMPRESSION_CHOICES",
    "COMPRESSORS",
    "FP16",
    "Auto",
    "BucketLayout",
    "Collectives",
    "CompressionHook",
    "CompressionStats",
    "Compressor",
    "Dense",
    "Int8",
    "LocalSGD",
    "NonFiniteGradientWarning",
    "PowerSGD",
    "TopK",
    "Traffic",
]

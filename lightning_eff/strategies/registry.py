"""Names for `Trainer(strategy=...)`: `ddp_<compressor>` for every registered compressor, and `ddp_balanced`; `fsdp2`,
`fsdp2_bf16`, `fsdp2_fp16` and `fsdp2_balanced` for FSDP2 (`EfficientModelParallelStrategy`).

The DDP names follow `lightning_eff.compression.COMPRESSION_CHOICES` (the compressors and LocalSGD), so a new
compressor gets its strategy name without a second list; the FSDP2 names cover the compressors that FSDP2's
reduce-scatter can run. Each name builds a fresh compressor or balancer per Trainer (they hold per-run state).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import StrategyRegistry

from lightning_eff.compression import BF16, COMPRESSION_CHOICES, FP16, Dense
from lightning_eff.strategies.ddp import EfficientDDPStrategy
from lightning_eff.strategies.model_parallel import EfficientModelParallelStrategy


def register_strategies(registry: Any = StrategyRegistry) -> None:
    """Register `ddp_balanced` and `ddp_<name>` for each compressor but `dense` (that is plain `ddp`), and the
    FSDP2 names."""
    balanced = {"balancer": "throughput"}
    names: dict[str, tuple[type, str, dict[str, Any]]] = {
        "ddp_balanced": (EfficientDDPStrategy, "DDP with per-rank batch shares from measured speed", balanced),
        "fsdp2": (EfficientModelParallelStrategy, "FSDP2 (fully_shard), every process a data-parallel rank", {}),
        "fsdp2_balanced": (
            EfficientModelParallelStrategy,
            "FSDP2 with per-rank batch shares from measured speed",
            balanced,
        ),
    }
    for name in COMPRESSION_CHOICES:
        if name != Dense.name:
            names[f"ddp_{name}"] = (
                EfficientDDPStrategy,
                f"DDP with {name} gradient compression",
                {"compression": name},
            )
    for cast in (BF16, FP16):
        description = f"FSDP2 reducing gradients in {cast.name}"
        names[f"fsdp2_{cast.name}"] = (EfficientModelParallelStrategy, description, {"compression": cast.name})
    for name, (strategy, text, init_params) in names.items():
        if name not in registry:
            registry.register(name, strategy, description=f"{text} (lightning_eff)", **init_params)

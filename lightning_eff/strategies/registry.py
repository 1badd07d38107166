"""Names for `Trainer(strategy=...)`: `ddp_<compressor>` for every registered compressor, and `ddp_balanced`.

The names follow `lightning_eff.compression.COMPRESSORS`, so a new compressor gets its strategy name without a
second list. Each name builds a fresh compressor or balancer per Trainer (they hold per-run state).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import StrategyRegistry

from lightning_eff.compression import COMPRESSORS, Dense
from lightning_eff.strategies.ddp import EfficientDDPStrategy


def register_strategies(registry: Any = StrategyRegistry) -> None:
    """Register `ddp_balanced` and `ddp_<name>` for each compressor but `dense` (that is plain `ddp`)."""
    if "ddp_balanced" not in registry:
        registry.register(
            "ddp_balanced",
            EfficientDDPStrategy,
            description="DDP with per-rank batch shares from measured speed (lightning_eff)",
            balancer="throughput",
        )
    for name in COMPRESSORS:
        if name != Dense.name and f"ddp_{name}" not in registry:
            registry.register(
                f"ddp_{name}",
                EfficientDDPStrategy,
                description=f"DDP with {name} gradient compression (lightning_eff)",
                compression=name,
            )

"""Strategies: EfficientDDPStrategy, registered with Lightning under `ddp_<compressor>` names at import."""

from lightning_eff.strategies.ddp import EfficientDDPStrategy
from lightning_eff.strategies.registry import register_strategies

register_strategies()

__all__ = ["EfficientDDPStrategy", "register_strategies"]

"""Strategies: EfficientDDPStrategy and EfficientModelParallelStrategy (FSDP2), registered with Lightning under
`ddp_<compressor>`, `ddp_balanced` and `fsdp2*` names at import."""

from lightning_eff.strategies.ddp import EfficientDDPStrategy
from lightning_eff.strategies.model_parallel import EfficientModelParallelStrategy
from lightning_eff.strategies.registry import register_strategies

register_strategies()

__all__ = ["EfficientDDPStrategy", "EfficientModelParallelStrategy", "register_strategies"]

"""lightning_eff: Lightning callbacks and strategies that cut the compute cost of training large models."""

from lightning_eff.distillation import KnowledgeDistillation
from lightning_eff.pruning import GradualPruning
from lightning_eff.quantization import QuantizationAwareTraining
from lightning_eff.report import ReportContributor, ReportSection
from lightning_eff.sigterm import SynchronizedSigterm
from lightning_eff.strategies import EfficientDDPStrategy, EfficientModelParallelStrategy

__version__ = "0.1.0"

__all__ = [
    "EfficientDDPStrategy",
    "EfficientModelParallelStrategy",
    "GradualPruning",
    "KnowledgeDistillation",
    "QuantizationAwareTraining",
    "ReportContributor",
    "ReportSection",
    "SynchronizedSigterm",
    "__version__",
]

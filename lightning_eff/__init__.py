"""lightning_eff: Lightning callbacks and strategies that cut the compute cost of training large models."""

from lightning_eff.pruning import GradualPruning
from lightning_eff.report import ReportContributor, ReportSection

__version__ = "0.1.0"

__all__ = ["GradualPruning", "ReportContributor", "ReportSection", "__version__"]

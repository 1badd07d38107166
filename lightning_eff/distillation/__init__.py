"""Knowledge distillation: a callback that trains the LightningModule toward a frozen teacher."""

from lightning_eff.distillation.callback import PROJECTIONS, KnowledgeDistillation
from lightning_eff.distillation.losses import agreement, cosine_loss, kl_loss, make_loss, mse_loss, pick_output

__all__ = [
    "PROJECTIONS",
    "KnowledgeDistillation",
    "agreement",
    "cosine_loss",
    "kl_loss",
    "make_loss",
    "mse_loss",
    "pick_output",
]

"""Knowledge distillation: a callback that trains the LightningModule toward a frozen teacher."""

from lightning_eff.distillation.agreement import agreement, agreement_kind, agreement_totals
from lightning_eff.distillation.callback import KnowledgeDistillation
from lightning_eff.distillation.losses import cosine_loss, kl_loss, make_loss, mse_loss, pick_output
from lightning_eff.distillation.projections import PROJECTIONS, strip, stripped_copy
from lightning_eff.distillation.teacher import INITIAL, initial_teacher

__all__ = [
    "INITIAL",
    "PROJECTIONS",
    "KnowledgeDistillation",
    "agreement",
    "agreement_kind",
    "agreement_totals",
    "cosine_loss",
    "initial_teacher",
    "kl_loss",
    "make_loss",
    "mse_loss",
    "pick_output",
    "strip",
    "stripped_copy",
]

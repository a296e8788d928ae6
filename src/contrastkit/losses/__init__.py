"""Contrastive losses: InfoNCE / NT-Xent, DCL, DCLW, their functional core and distributed helpers.

>>> from contrastkit.losses import InfoNCELoss, DCLLoss, DCLWLoss, build_loss
"""

from contrastkit.losses.contrastive import (
    LOSSES,
    DCLLoss,
    DCLWLoss,
    InfoNCELoss,
    build_loss,
    contrastive_from_logits,
    dclw_weights,
)

__all__ = [
    "LOSSES",
    "DCLLoss",
    "DCLWLoss",
    "InfoNCELoss",
    "build_loss",
    "contrastive_from_logits",
    "dclw_weights",
]

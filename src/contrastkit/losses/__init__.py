"""Contrastive losses: InfoNCE / NT-Xent, DCL, DCLW, their functional core and distributed helpers; the
query-key (queue / support-set) variants of MoCo and NNCLR, BYOL's normalised MSE, Barlow Twins' loss, ASCL's
soft-target variants of them and All4One's feature contrast.

>>> from contrastkit.losses import InfoNCELoss, DCLLoss, DCLWLoss, build_loss
"""

from contrastkit.losses.ascl import ASCLLoss, ASCLNormalizedMSELoss, InBatchASCLLoss, ascl_targets
from contrastkit.losses.barlow import BarlowTwinsLoss
from contrastkit.losses.contrastive import (
    LOSSES,
    DCLLoss,
    DCLWLoss,
    InfoNCELoss,
    build_loss,
    contrastive_from_logits,
    dclw_weights,
)
from contrastkit.losses.queue import (
    QUEUE_LOSSES,
    QueueContrastiveLoss,
    QueueDCLLoss,
    QueueDCLWLoss,
    QueueInfoNCELoss,
    build_queue_loss,
)
from contrastkit.losses.feature import FeatureContrastLoss
from contrastkit.losses.regression import NormalizedMSELoss

__all__ = [
    "ASCLLoss",
    "ASCLNormalizedMSELoss",
    "InBatchASCLLoss",
    "ascl_targets",
    "LOSSES",
    "QUEUE_LOSSES",
    "BarlowTwinsLoss",
    "FeatureContrastLoss",
    "NormalizedMSELoss",
    "QueueContrastiveLoss",
    "QueueDCLLoss",
    "QueueDCLWLoss",
    "QueueInfoNCELoss",
    "build_queue_loss",
    "DCLLoss",
    "DCLWLoss",
    "InfoNCELoss",
    "build_loss",
    "contrastive_from_logits",
    "dclw_weights",
]

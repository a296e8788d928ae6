"""BYOL (Grill et al., NeurIPS 2020, https://arxiv.org/abs/2006.07733): bootstrap your own latent.

online: backbone -> projector -> predictor;  target: EMA copy of backbone -> projector (no gradient).
Loss: normalised MSE (``2 - 2 cos``) between the online prediction of one view and the target projection of the
other, symmetrised by summing both directions (the paper's ``L + L~``, as in solo-learn).

Defaults and their sources (the ``configs/fmnist_byol.yaml`` preset scales the heads down for the CPU demo):

- projector: 2 layers, hidden BN (``method.proj_hidden_bn=true``), paper 4096 -> 256; solo-learn CIFAR 4096 -> 256.
- predictor: 2 layers, hidden ``method.pred_hidden_dim`` with BN (follows ``proj_hidden_bn``), output
  ``proj_out_dim``; paper and solo-learn CIFAR 4096 -> 256.
- target momentum: cosine schedule ``method.momentum_base`` 0.99 -> ``method.momentum_final`` 1.0 (solo-learn
  CIFAR; the paper uses 0.996 -> 1 on ImageNet), updated once per optimizer step.
- optimiser: the paper uses LARS lr 0.2 x B/256, wd 1.5e-6; solo-learn CIFAR LARS lr 1.0, wd 1e-5, eta 0.02.
- predictor learning rate: the parameter group is named ``"predictor"`` (for ``optim.predictor_lr_factor``).
"""

from __future__ import annotations

import torch
from torch import nn

from contrastkit.config import MethodConfig
from contrastkit.losses import NormalizedMSELoss
from contrastkit.methods.base import (
    SSLMethod,
    build_predictor,
    build_projector,
    check_no_options,
    check_two_views,
)


class BYOL(SSLMethod):
    """BYOL: predict the EMA target's projection of the other view; see the module docstring."""

    own_loss = "byol (cosine)"
    two_views = True

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MethodConfig) -> None:
        check_no_options(cfg, "byol")
        super().__init__(backbone, feature_dim, cfg)
        self.projector = build_projector(feature_dim, cfg)
        self.predictor = build_predictor(cfg)
        self.add_teacher(backbone=self.backbone, projector=self.projector)
        self.criterion = NormalizedMSELoss()

    def forward_loss(self, views: list[torch.Tensor], progress: float) -> dict[str, torch.Tensor]:
        check_two_views(views, "byol")
        z1, z2 = [self.projector(h) for h in self.encode_views(views)]  # BxP each
        p1, p2 = self.predictor(z1), self.predictor(z2)  # BxP each
        with torch.no_grad():
            t1, t2 = [self.teacher.projector(h) for h in self.encode_views(views, self.teacher.backbone)]  # BxP
        loss = self.criterion(p1, t2) + self.criterion(p2, t1)
        return {"loss": loss}


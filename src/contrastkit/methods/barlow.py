"""Barlow Twins (Zbontar et al., ICML 2021, https://arxiv.org/abs/2103.03230): redundancy reduction.

backbone -> projector -> :class:`~contrastkit.losses.BarlowTwinsLoss` on the two views' embeddings (cross-correlation
of batch-standardised embeddings pushed to the identity). Under DDP the standardisation statistics and the
cross-correlation are global, with autograd-aware all-reduces, so W processes equal one process on the whole batch.

Defaults and their sources (the ``configs/fmnist_barlow.yaml`` preset scales the projector down for the CPU demo):

- projector: 3 layers with BN + ReLU on the hidden layers, no BN on the output (``method.proj_layers=3``); paper
  8192-8192-8192, solo-learn CIFAR 2048-2048-2048.
- ``method.barlow_lambda`` 0.0051 (paper); ``method.barlow_scale`` 0.1 (solo-learn CIFAR; the paper uses 1).
- optimiser: the paper uses LARS (lr 0.2 weights / 0.0048 biases, B=2048), solo-learn CIFAR LARS lr 0.3, wd 1e-4.
"""

from __future__ import annotations

import torch
from torch import nn

from contrastkit.config import MethodConfig
from contrastkit.losses import BarlowTwinsLoss
from contrastkit.methods.base import SSLMethod, build_projector, check_no_options, check_two_views


class BarlowTwins(SSLMethod):
    """Barlow Twins; see the module docstring."""

    own_loss = "barlow twins"
    two_views = True

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MethodConfig) -> None:
        check_no_options(cfg, "barlow")
        super().__init__(backbone, feature_dim, cfg)
        self.projector = build_projector(feature_dim, cfg)
        self.criterion = BarlowTwinsLoss(
            lambda_=cfg.barlow_lambda, scale=cfg.barlow_scale, gather_distributed=cfg.gather_distributed
        )

    def forward_loss(self, views: list[torch.Tensor], progress: float) -> dict[str, torch.Tensor]:
        check_two_views(views, "barlow")
        z1, z2 = [self.projector(h) for h in self.encode_views(views)]  # BxP each
        return {"loss": self.criterion(z1, z2)}


"""SimCLR (Chen et al., ICML 2020, https://arxiv.org/abs/2002.05709) with InfoNCE, DCL or DCLW.

backbone -> projector MLP -> contrastive loss between every pair of views. With ``method.loss=dcl`` this is the
DCL paper's SimCLR variant (Yeh et al., ECCV 2022, https://arxiv.org/abs/2110.06848).

Defaults (``MethodConfig``): projector 2 layers, hidden 512 with BN, output 128; temperature 0.1 (DCL's
recommendation; SimCLR's CIFAR setting is 0.5 with InfoNCE at batch 512+); DCLW sigma 0.5.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from contrastkit.config import MethodConfig
from contrastkit.losses import build_loss
from contrastkit.methods.base import SSLMethod, build_projector


def build_contrastive_loss(cfg: MethodConfig) -> nn.Module:
    """The contrastive loss ``cfg.contrastive_loss`` (``method.loss``, InfoNCE when unset) with the config's
    temperature (and sigma for DCLW)."""
    kwargs: dict = {"temperature": cfg.temperature, "gather_distributed": cfg.gather_distributed}
    if cfg.contrastive_loss == "dclw":
        kwargs["sigma"] = cfg.sigma
    return build_loss(cfg.contrastive_loss, **kwargs)


class SimCLR(SSLMethod):
    """SimCLR: symmetric contrastive loss between projected views; averaged over all view pairs."""

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MethodConfig) -> None:
        super().__init__(backbone, feature_dim, cfg)
        self.projector = build_projector(feature_dim, cfg)
        self.criterion = build_contrastive_loss(cfg)

    def forward_loss(self, views: list[torch.Tensor], progress: float) -> dict[str, torch.Tensor]:
        z = [self.projector(h) for h in self.encode_views(views)]  # V x (B x proj_out_dim)
        pairs = list(itertools.combinations(range(len(z)), 2))
        loss = sum(self.criterion(z[i], z[j]) for i, j in pairs) / len(pairs)
        return {"loss": loss}


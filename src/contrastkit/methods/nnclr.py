"""NNCLR (Dwibedi et al., ICCV 2021, https://arxiv.org/abs/2104.14548): nearest-neighbour contrastive learning.

backbone -> projector ``z`` -> predictor ``p``. The positive of view 2's prediction ``p2_i`` is the nearest neighbour
``NN(z1_i)`` of view 1's projection in a support set (a :class:`~contrastkit.models.MemoryQueue` of earlier
projections); its negatives are the predictions ``p2_j`` of the other samples of the batch (paper Eq. 2, global under
``method.gather_distributed``). The loss is symmetrised, ``(L(NN(z1), p2) + L(NN(z2), p1)) / 2``, and can be
InfoNCE (the paper), DCL or DCLW (``method.loss``; :class:`~contrastkit.losses.QueueContrastiveLoss` with
``negatives=None``). After the loss, view 1's projections are enqueued (the paper's pseudo-code and solo-learn; staged and
pushed after the optimizer step, see the MemoryQueue docstring); the support set is therefore global under DDP and
never contains the current batch.

The support set is empty at the very first step of a run; the neighbour is then the projection itself (detached),
i.e. that single step is a SimCLR-style step with a predictor.

Defaults and their sources (the ``configs/fmnist_nnclr.yaml`` preset scales the heads down for the CPU demo):

- temperature 0.2 in the presets: solo-learn's CIFAR recipe (the paper uses 0.1 on ImageNet).
- support set ``method.queue_size``: paper 98304, solo-learn CIFAR 65536.
- projector: 3 layers with BN on every layer including the output (``proj_layers=3``, ``proj_last_bn=true``),
  paper 2048-2048-256 (hidden 2048), solo-learn CIFAR 2048 -> 256.
- predictor: 2 layers, hidden ``method.pred_hidden_dim`` with BN, paper and solo-learn 4096.
- optimiser: solo-learn CIFAR LARS lr 0.4, wd 1e-5, eta 0.02 (the paper trains with LARS at batch 4096).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contrastkit.config import MethodConfig
from contrastkit.losses import build_queue_loss
from contrastkit.methods.base import SSLMethod, build_predictor, build_projector, check_no_options, check_two_views
from contrastkit.models import MemoryQueue, nearest_neighbours


class NNCLR(SSLMethod):
    """NNCLR; see the module docstring."""

    two_views = True

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MethodConfig) -> None:
        check_no_options(cfg, "nnclr")
        super().__init__(backbone, feature_dim, cfg)
        self.projector = build_projector(feature_dim, cfg)
        self.predictor = build_predictor(cfg)
        self.queue = MemoryQueue(cfg.queue_size, cfg.proj_out_dim, gather_distributed=cfg.gather_distributed)
        self.criterion = build_queue_loss(
            cfg.contrastive_loss, temperature=cfg.temperature, sigma=cfg.sigma, gather_distributed=cfg.gather_distributed
        )

    @staticmethod
    def neighbour(z: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """Top-1 neighbour of each row of ``z`` (``BxP``) in ``support`` (``MxP``), or ``z`` itself if it is empty."""
        if support.shape[0] == 0:
            return F.normalize(z.detach(), dim=1)  # BxP
        return nearest_neighbours(z, support, k=1).embeddings[:, 0]  # BxP

    def forward_loss(self, views: list[torch.Tensor], progress: float) -> dict[str, torch.Tensor]:
        check_two_views(views, "nnclr")
        z1, z2 = [self.projector(h) for h in self.encode_views(views)]  # BxP each
        p1, p2 = self.predictor(z1), self.predictor(z2)  # BxP each
        support = self.queue.get()  # MxP snapshot: earlier steps only
        nn1, nn2 = self.neighbour(z1, support), self.neighbour(z2, support)  # BxP each, no gradient
        loss = (self.criterion(nn1, p2) + self.criterion(nn2, p1)) / 2
        self.queue.stage(z1.detach())  # enqueued at the optimizer step
        return {"loss": loss}


"""Regression losses of the non-contrastive methods: BYOL's normalised mean squared error.

Numerics as in :mod:`contrastkit.losses.contrastive`: inputs are cast to float32 (float64 stays float64) and the
loss is computed with autocast disabled, so it is safe under bf16/fp16 mixed precision.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from contrastkit.losses.common import at_least_float32, autocast_disabled

__all__ = ["NormalizedMSELoss"]


class NormalizedMSELoss(nn.Module):
    """Mean squared error between L2-normalised predictions and targets: BYOL's loss.

    Paper: Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020, https://arxiv.org/abs/2006.07733 (Eq. 2).

    For a prediction ``p_i`` and its target ``z_i`` (both ``D``-dimensional)::

        l_i = || p_i/||p_i|| - z_i/||z_i|| ||^2 = 2 - 2 * <p_i, z_i> / (||p_i|| * ||z_i||)

    and the loss is ``mean_i l_i`` over the ``n`` local pairs; it lies in ``[0, 4]``. The loss does not detach the
    target: the method passes the target network's output computed without gradient (BYOL's stop-gradient). Being a
    per-sample mean, it needs no communication under DDP: the average of the local losses over equal slices is the
    loss of the global batch, and DDP's gradient averaging does the rest.
    """

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        """Loss of a batch.

        Args:
            prediction: Online predictions ``p``, shape ``(n, D)``, any float dtype.
            target: Targets ``z`` (e.g. the target network's projections of the other view), shape ``(n, D)``.

        Returns:
            Scalar loss (float32, or float64 for float64 inputs).
        """
        if prediction.ndim != 2 or prediction.shape != target.shape:
            raise ValueError(
                f"prediction and target must both have shape (n, D), got {tuple(prediction.shape)} and "
                f"{tuple(target.shape)}"
            )
        with autocast_disabled(prediction.device.type):
            p = F.normalize(at_least_float32(prediction), dim=1)  # nxD
            z = F.normalize(at_least_float32(target), dim=1).to(p.dtype)  # nxD
            return (2.0 - 2.0 * (p * z).sum(dim=1)).mean()

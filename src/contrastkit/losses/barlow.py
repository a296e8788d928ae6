"""Barlow Twins' redundancy-reduction loss, exact under DDP.

Numerics as in :mod:`contrastkit.losses.contrastive`: float32 (float64 stays float64), autocast disabled.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from contrastkit.distributed import all_reduce_sum
from contrastkit.errors import ConfigError
from contrastkit.losses.common import at_least_float32, autocast_disabled
from contrastkit.validation import check_flag, positive_float

__all__ = ["BarlowTwinsLoss"]


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins loss: make the cross-correlation of the two views' embeddings the identity matrix.

    Paper: Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", ICML 2021,
    https://arxiv.org/abs/2103.03230 (Eq. 1-2).

    With ``z^A, z^B`` the ``N x D`` embeddings of the two views, each standardised along the batch
    (``zhat = (z - mean_b z) / sqrt(var_b z + eps)``, the biased variance, i.e. a BatchNorm without affine
    parameters in training mode, as in the official code)::

        C_ij = (1/N) * sum_b zhat^A_bi * zhat^B_bj                         (D x D cross-correlation)
        L    = scale * ( sum_i (1 - C_ii)^2 + lambda * sum_i sum_{j != i} C_ij^2 )

    Distributed training (``gather_distributed=True``, world size ``W > 1``): the batch mean and variance and the
    cross-correlation are computed over the global batch (``N = W * n``) with differentiable all-reduces
    (:func:`contrastkit.distributed.all_reduce_sum`). Every process then returns the same global loss, and after DDP's gradient averaging
    ``W`` processes on ``W`` equal slices train exactly like one process on the whole batch. (Local BN statistics
    with a summed or averaged cross-correlation, as in some implementations, give a different loss; a raw
    ``all_reduce`` additionally scales the gradient by ``1/W``.) All processes must call it with the same ``D``.

    Args:
        lambda_: Weight ``lambda`` of the off-diagonal (redundancy) terms, >= 0. Default 0.0051 (the paper's value,
            about ``1/D`` for its ``D = 8192``).
        scale: Overall factor of the loss, > 0. Default 1.0 (the paper); solo-learn's CIFAR recipe uses 0.1, the
            official code once used 1/32.
        eps: Added to the variance before the square root, as in ``BatchNorm1d``. Default 1e-5.
        gather_distributed: Global statistics and cross-correlation under DDP (see above). Default True.
    """

    def __init__(
        self, lambda_: float = 0.0051, scale: float = 1.0, eps: float = 1e-5, gather_distributed: bool = True
    ) -> None:
        super().__init__()
        if isinstance(lambda_, bool) or not isinstance(lambda_, numbers.Real) or not math.isfinite(lambda_) \
                or lambda_ < 0:
            raise ConfigError(f"barlow lambda must be a finite number >= 0, got {lambda_!r}; the paper uses 0.0051")
        self.lambda_ = float(lambda_)
        self.scale = positive_float(scale, "barlow scale", "use 1.0 (paper) or 0.1 (solo-learn CIFAR)")
        self.eps = positive_float(eps, "eps", "use 1e-5")
        self.gather_distributed = check_flag(gather_distributed, "gather_distributed")

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}, scale={self.scale}, gather_distributed={self.gather_distributed}"

    def _sum_over_processes(self, x: Tensor) -> Tensor:
        return all_reduce_sum(x) if self.gather_distributed else x

    def _standardise(self, z: Tensor, total: Tensor) -> Tensor:
        """Batch-standardise ``z`` (``n x D``) with the (global) mean and biased variance over ``total`` rows."""
        mean = self._sum_over_processes(z.sum(dim=0)) / total  # D
        centred = z - mean  # nxD
        var = self._sum_over_processes(centred.square().sum(dim=0)) / total  # D
        return centred / torch.sqrt(var + self.eps)  # nxD

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """Loss of a batch of pairs.

        Args:
            z1: Embeddings of the first views, shape ``(n, D)``, any float dtype.
            z2: Embeddings of the second views, shape ``(n, D)``; row ``i`` is the same image as ``z1[i]``.

        Returns:
            Scalar loss (float32, or float64 for float64 inputs), the same on every process under DDP.
        """
        if z1.ndim != 2 or z1.shape != z2.shape:
            raise ValueError(
                f"z1 and z2 must both have shape (n, D), got {tuple(z1.shape)} and {tuple(z2.shape)}"
            )
        with autocast_disabled(z1.device.type):
            z1 = at_least_float32(z1)
            z2 = at_least_float32(z2).to(z1.dtype)
            # Global batch size as a tensor (one tiny all-reduce, no host sync).
            total = self._sum_over_processes(torch.full((), z1.shape[0], dtype=z1.dtype, device=z1.device))
            a = self._standardise(z1, total)  # nxD
            b = self._standardise(z2, total)  # nxD
            c = self._sum_over_processes(a.T @ b) / total  # DxD
            on_diag = (1.0 - torch.diagonal(c)).square().sum()
            off_diag = c.square().sum() - torch.diagonal(c).square().sum()
            return self.scale * (on_diag + self.lambda_ * off_diag)

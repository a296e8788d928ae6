"""All4One's feature contrast: redundancy reduction between momentum and online projections, exact under DDP.

Numerics as in :mod:`contrastkit.losses.contrastive`: float32 (float64 stays float64), autocast disabled.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from contrastkit.distributed import all_reduce_sum
from contrastkit.losses.common import at_least_float32, autocast_disabled, check_pair
from contrastkit.validation import check_flag, positive_float

__all__ = ["FeatureContrastLoss"]


class FeatureContrastLoss(nn.Module):
    """All4One's feature term: the cross-correlation of two views' features should be the identity.

    Paper: Estepa et al., "All4One: Symbiotic Neighbour Contrastive Learning via Self-Attention and Redundancy
    Reduction", ICCV 2023, https://arxiv.org/abs/2303.09417; computed as the official code computes it
    (github.com/ImaGonEs/all4one, vturrisi/solo-learn ``solo/methods/all4one.py``, ``training_step``).

    With ``N0(z)`` the ``N x D`` matrix ``z`` with each feature (column) L2-normalised over the batch::

        C_ab = N0(zm_a)^T @ N0(z_b)                                           (D x D, a != b)
        on   = sqrt( (mean_i (C12_ii - 1)^2 + mean_i (C21_ii - 1)^2) / 2 )
        off  = sqrt( (mean_{i!=j} C12_ij^2 + mean_{i!=j} C21_ij^2) / 2 )
        L    = scale * (on + off) / 2

    where ``zm`` are the momentum encoder's projections (no gradient in All4One) and ``z`` the online ones. Unlike
    Barlow Twins (:class:`~contrastkit.losses.BarlowTwinsLoss`) the features are not centred, the errors are
    root-mean-squared rather than summed, and it correlates a momentum view with an online view, both directions.

    Distributed training (``gather_distributed=True``, world size ``W > 1``): the column norms and the
    cross-correlations are sums over the global batch (``N = W * n``), taken with differentiable all-reduces
    (:func:`contrastkit.distributed.all_reduce_sum`), so every process returns the loss of the global batch and
    ``W`` processes on ``W`` equal slices train exactly like one process on the whole batch. (The official code
    computes it on each process's local batch: ``gather_distributed=False``.)

    Args:
        scale: Overall factor. Default 10.0 (official code: ``(0.5 * on + 0.5 * off) * 10``).
        gather_distributed: Global statistics under DDP (see above). Default True.
        eps: Lower bound of a column norm, as ``torch.nn.functional.normalize``. Default 1e-12.
    """

    def __init__(self, scale: float = 10.0, gather_distributed: bool = True, eps: float = 1e-12) -> None:
        super().__init__()
        self.scale = positive_float(scale, "feature loss scale", "the official code uses 10")
        self.gather_distributed = check_flag(gather_distributed, "gather_distributed")
        self.eps = positive_float(eps, "eps")

    def extra_repr(self) -> str:
        return f"scale={self.scale}, gather_distributed={self.gather_distributed}"

    def _sum_over_processes(self, x: Tensor) -> Tensor:
        return all_reduce_sum(x) if self.gather_distributed else x

    def _feature_normalise(self, z: Tensor) -> Tensor:
        """``z`` (``n x D``) with every column divided by its L2 norm over the (global) batch."""
        norm = self._sum_over_processes(z.square().sum(dim=0)).sqrt()  # D
        return z / norm.clamp_min(self.eps)  # nxD

    def _cross_correlation(self, momentum: Tensor, online: Tensor) -> Tensor:
        a, b = self._feature_normalise(momentum), self._feature_normalise(online)  # nxD each
        return self._sum_over_processes(a.T @ b)  # DxD

    def components(self, z_momentum_a: Tensor, z_online_b: Tensor, z_momentum_b: Tensor,
                   z_online_a: Tensor) -> tuple[Tensor, Tensor]:
        """``(on, off)`` of the equations above; see :meth:`forward` for the arguments."""
        for x, y in ((z_momentum_a, z_online_b), (z_momentum_b, z_online_a), (z_momentum_a, z_momentum_b)):
            check_pair(x, y)
        dim = z_momentum_a.shape[1]
        if dim < 2:
            raise ValueError(f"the feature contrast needs at least 2 features (off-diagonal terms), got {dim}")
        with autocast_disabled(z_online_a.device.type):
            dtype = torch.promote_types(at_least_float32(z_online_a).dtype, at_least_float32(z_momentum_a).dtype)
            zm_a, z_b, zm_b, z_a = (x.to(dtype) for x in (z_momentum_a, z_online_b, z_momentum_b, z_online_a))
            c_ab = self._cross_correlation(zm_a, z_b)  # DxD
            c_ba = self._cross_correlation(zm_b, z_a)  # DxD
            off_mask = ~torch.eye(dim, dtype=torch.bool, device=c_ab.device)  # DxD
            on = ((torch.diagonal(c_ab) - 1).square().mean() + (torch.diagonal(c_ba) - 1).square().mean()) / 2
            off = (c_ab[off_mask].square().mean() + c_ba[off_mask].square().mean()) / 2
            return on.sqrt(), off.sqrt()

    def forward(self, z_momentum_a: Tensor, z_online_b: Tensor, z_momentum_b: Tensor, z_online_a: Tensor) -> Tensor:
        """Loss of a batch of pairs.

        Args:
            z_momentum_a: Momentum projections of view a, ``(n, D)`` (All4One passes them L2-normalised per row).
            z_online_b: Online projections of view b, ``(n, D)``; row ``i`` is the same image as ``z_momentum_a[i]``.
            z_momentum_b: Momentum projections of view b, ``(n, D)``.
            z_online_a: Online projections of view a, ``(n, D)``.

        Returns:
            Scalar loss (float32, or float64 for float64 inputs), the same on every process under DDP.
        """
        on, off = self.components(z_momentum_a, z_online_b, z_momentum_b, z_online_a)
        return self.scale * (on + off) / 2

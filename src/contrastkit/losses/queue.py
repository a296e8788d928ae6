"""Contrastive losses whose positives or negatives come from outside the batch: a memory queue (MoCo) or a support
set of nearest neighbours (NNCLR).

Unlike the two-view losses of :mod:`contrastkit.losses.contrastive`, these losses are asymmetric: each of the ``N``
*queries* ``q_i`` has one positive *key* ``k_i`` and its negatives are either

- the rows of an external bank ``Q`` (``M x D``, e.g. a MoCo queue of keys from earlier steps, no gradient), or
- when no bank is given (``negatives=None``), the other keys of the batch ``k_j, j != i`` (gathered from all
  processes under ``gather_distributed=True``): NNCLR's negatives, and MoCo's fallback for the very first step,
  when its queue is still empty.

With ``u`` denoting L2-normalised vectors and ``t`` the temperature, the per-query losses are::

    InfoNCE:  l_i = -<u(q_i), u(k_i)>/t + log( exp(<u(q_i), u(k_i)>/t) + sum_m exp(<u(q_i), u(n_m)>/t) )
    DCL:      l_i = -<u(q_i), u(k_i)>/t + log(                            sum_m exp(<u(q_i), u(n_m)>/t) )
    DCLW:     DCL with the positive term weighted by w_i = 2 - N * softmax_i(<u(q_i), u(k_i)>/sigma) (detached)

and the loss is their mean over the local queries. All of them are built on the functional core
:func:`~contrastkit.losses.contrastive.contrastive_from_logits`; similarities are computed in float32 (float64
inputs stay float64) with autocast disabled.

Which tensor plays which role is the method's choice:

- MoCo v2 (https://arxiv.org/abs/2003.04297): ``query`` = the online projection ``q``, ``key`` = the momentum
  encoder's projection ``k`` of the other view (no gradient), ``negatives`` = a snapshot of the queue taken *before*
  this step's keys are enqueued. The DCL paper (https://arxiv.org/abs/2110.06848, section 5) applies DCL to MoCo v2
  in exactly this way: the positive is removed from the denominator.
- NNCLR (https://arxiv.org/abs/2104.14548, Eq. 2): ``query`` = the nearest neighbour ``NN(z_i)`` of one view's
  projection in the support set (no gradient), ``key`` = the prediction ``p_i`` of the other view, ``negatives=None``:
  the predictions ``p_j`` of the other samples of the (global) batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastkit import distributed
from contrastkit.errors import ConfigError
from contrastkit.losses.common import at_least_float32, autocast_disabled
from contrastkit.validation import check_flag, positive_float
from contrastkit.losses.contrastive import contrastive_from_logits, dclw_weights

__all__ = [
    "QUEUE_LOSSES",
    "QueueContrastiveLoss",
    "QueueDCLLoss",
    "QueueDCLWLoss",
    "QueueInfoNCELoss",
    "build_queue_loss",
]


class QueryKeyLogits(NamedTuple):
    """What :meth:`QueueContrastiveLoss.logits` returns."""

    q: Tensor  # nxD, normalised queries
    k: Tensor  # nxD, normalised keys
    pos: Tensor  # n, positive logits
    neg: Tensor  # nxM, negative logits (-inf: excluded)
    candidates: Tensor  # MxD, normalised bank or gathered keys (the columns of ``neg``)


class QueueContrastiveLoss(nn.Module):
    """Query-key contrastive loss with negatives from a bank (a queue) or from the other keys of the batch.

    See the module docstring for the equations. Use the named subclasses :class:`QueueInfoNCELoss`,
    :class:`QueueDCLLoss` and :class:`QueueDCLWLoss` (or :func:`build_queue_loss`).

    Args:
        temperature: Softmax temperature ``t`` applied to the cosine similarities, > 0. Default 0.2 (MoCo v2).
        gather_distributed: Under DDP (world size ``W > 1``), with ``negatives=None``, contrast each query with the
            keys of all processes; gathered with gradients (:func:`contrastkit.distributed.gather`), so W
            processes on W equal slices train exactly like one process on the whole batch. With a bank, the bank is
            used as is (a MoCo queue is already global, see :class:`contrastkit.models.MemoryQueue`), and only
            DCLW's weights are normalised over the global batch. Default False.
    """

    decoupled: bool = False

    def __init__(self, temperature: float = 0.2, gather_distributed: bool = False) -> None:
        super().__init__()
        self.temperature = positive_float(
            temperature, "temperature", "use a small positive value such as 0.2 (typical range 0.05-0.5)"
        )
        self.gather_distributed = check_flag(gather_distributed, "gather_distributed")

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"

    def _positive_weights(self, q: Tensor, k: Tensor) -> Tensor | None:
        """Weight of the positive term of each local query, shape ``(n,)``, or None for weight 1."""
        return None

    def _global(self, x: Tensor) -> tuple[Tensor, int]:
        """``x`` gathered from all processes (with gradients) and this process's row offset in it."""
        if self.gather_distributed and distributed.world_size() > 1:
            return distributed.gather(x), distributed.rank_offset(x.shape[0])
        return x, 0

    def forward(self, query: Tensor, key: Tensor, negatives: Tensor | None = None) -> Tensor:
        """Loss of ``n`` queries.

        Args:
            query: Queries, shape ``(n, D)``, any float dtype, not necessarily normalised.
            key: Positive keys, shape ``(n, D)``; row ``i`` is the positive of ``query[i]``.
            negatives: Bank of negatives, shape ``(M, D)`` with ``M >= 1`` (normalised or not; it gets no
                gradient only if you pass it detached, e.g. a queue snapshot). ``None``: the other keys of the batch.

        Returns:
            Scalar loss (float32, or float64 for float64 inputs): the mean over the ``n`` local queries.
        """
        with autocast_disabled(query.device.type):
            q, k, pos, neg, _ = self.logits(query, key, negatives)
            weights = self._positive_weights(q, k)  # n or None
            return contrastive_from_logits(pos, neg, decoupled=self.decoupled, pos_weight=weights).mean()

    def logits(self, query: Tensor, key: Tensor, negatives: Tensor | None) -> QueryKeyLogits:
        """Normalised queries and keys, positive logits ``(n,)``, negative logits ``(n, M)`` (``-inf`` where a
        candidate is excluded: a query's own key among in-batch negatives) and the ``M x D`` normalised candidates
        (the bank, or the gathered keys). Call with autocast disabled; see :meth:`forward` for the arguments."""
        if query.ndim != 2 or query.shape != key.shape:
            raise ValueError(
                f"query and key must both have shape (n, D), got {tuple(query.shape)} and {tuple(key.shape)}"
            )
        if negatives is not None and (negatives.ndim != 2 or negatives.shape[1] != query.shape[1]):
            raise ValueError(
                f"negatives must have shape (M, {query.shape[1]}), got {tuple(negatives.shape)}"
            )
        if negatives is not None and negatives.shape[0] == 0:
            raise ValueError("the bank of negatives is empty; pass negatives=None to use the other keys instead")
        q = F.normalize(at_least_float32(query), dim=1)  # nxD
        k = F.normalize(at_least_float32(key), dim=1).to(q.dtype)  # nxD
        n = q.shape[0]
        pos = (q * k).sum(dim=1) / self.temperature  # n
        if negatives is not None:
            bank = F.normalize(negatives.to(q.dtype), dim=1)  # MxD
            neg = q @ bank.T / self.temperature  # nxM
            return QueryKeyLogits(q, k, pos, neg, bank)
        k_all, offset = self._global(k)  # NxD, N = W * n
        if k_all.shape[0] < 2:
            raise ValueError("a batch of 1 sample has no negatives; use a batch size of at least 2")
        neg = q @ k_all.T / self.temperature  # nxN
        own = torch.arange(n, device=q.device) + offset  # n, column of each query's own key
        neg = neg.masked_fill(F.one_hot(own, k_all.shape[0]).bool(), float("-inf"))  # nxN, N-1 finite
        return QueryKeyLogits(q, k, pos, neg, k_all)


class QueueInfoNCELoss(QueueContrastiveLoss):
    """InfoNCE with queue negatives: MoCo's loss (He et al., CVPR 2020, https://arxiv.org/abs/1911.05722, Eq. 1).

    ``l_i = -log( exp(q_i.k_i/t) / (exp(q_i.k_i/t) + sum_m exp(q_i.n_m/t)) )`` on L2-normalised vectors, the mean over
    the queries; see :class:`QueueContrastiveLoss` for the arguments (temperature default 0.2, MoCo v2's value).
    """

    decoupled = False


class QueueDCLLoss(QueueContrastiveLoss):
    """Decoupled contrastive loss with queue negatives (Yeh et al., ECCV 2022, https://arxiv.org/abs/2110.06848).

    ``l_i = -q_i.k_i/t + log( sum_m exp(q_i.n_m/t) )``: InfoNCE without the positive in the denominator, as the DCL
    paper applies it to MoCo v2. Lower than InfoNCE on the same inputs; can be negative. See
    :class:`QueueContrastiveLoss` for the arguments.
    """

    decoupled = True


class QueueDCLWLoss(QueueDCLLoss):
    """DCL with the von Mises-Fisher weighting of the positives (DCLW), queue negatives.

    Paper: Yeh et al., "Decoupled Contrastive Learning", ECCV 2022, https://arxiv.org/abs/2110.06848.
    ``l_i = -w_i * q_i.k_i/t + log( sum_m exp(q_i.n_m/t) )`` with ``w_i = 2 - N * softmax_i(q_i.k_i / sigma)``
    computed without gradient over the ``N`` query-key pairs of the batch (global under ``gather_distributed``), as
    in :class:`contrastkit.losses.DCLWLoss`.

    Args:
        temperature: Softmax temperature ``t``, > 0. Default 0.2.
        sigma: Width of the weighting kernel, > 0. Default 0.5 (the paper's value).
        gather_distributed: See :class:`QueueContrastiveLoss`. Default False.
    """

    def __init__(self, temperature: float = 0.2, sigma: float = 0.5, gather_distributed: bool = False) -> None:
        super().__init__(temperature=temperature, gather_distributed=gather_distributed)
        self.sigma = positive_float(sigma, "sigma", "use the DCL paper's default sigma=0.5")

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, sigma={self.sigma}, gather_distributed={self.gather_distributed}"

    def _positive_weights(self, q: Tensor, k: Tensor) -> Tensor:
        with torch.no_grad():
            q_all, offset = self._global(q.detach())  # NxD
            k_all, _ = self._global(k.detach())  # NxD
            return dclw_weights(q_all, k_all, self.sigma)[offset : offset + q.shape[0]]  # n


QUEUE_LOSSES: dict[str, type[QueueContrastiveLoss]] = {
    "infonce": QueueInfoNCELoss,
    "ntxent": QueueInfoNCELoss,
    "dcl": QueueDCLLoss,
    "dclw": QueueDCLWLoss,
}
"""The query-key losses, under the names of their two-view counterparts in :data:`contrastkit.losses.LOSSES`."""


def build_queue_loss(name: str, **kwargs: Any) -> QueueContrastiveLoss:
    """Build a query-key loss from a ``method.loss`` name, e.g. ``build_queue_loss("dcl", temperature=0.2)``.

    Args:
        name: ``infonce`` (alias ``ntxent``), ``dcl`` or ``dclw``; case-insensitive.
        **kwargs: ``temperature``, ``gather_distributed``, and ``sigma`` for ``dclw`` (ignored by the others, so a
            method can pass its whole configuration).

    Raises:
        ConfigError: Unknown name or invalid value.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in QUEUE_LOSSES:
        raise ConfigError(f"unknown loss {name!r}; valid names: {', '.join(sorted(QUEUE_LOSSES))}")
    if key != "dclw":
        kwargs.pop("sigma", None)
    unknown = sorted(set(kwargs) - {"temperature", "gather_distributed", "sigma"})
    if unknown:
        raise ConfigError(f"loss {key!r} does not take option(s) {', '.join(unknown)}")
    return QUEUE_LOSSES[key](**kwargs)

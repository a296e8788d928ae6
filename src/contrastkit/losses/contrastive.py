"""Two-view contrastive losses: InfoNCE / NT-Xent (SimCLR) and the decoupled losses DCL and DCLW.

All losses here take the projections of two augmented views of the same ``N`` images, ``z1`` and ``z2`` (``NxD``), and
treat the ``2N`` embeddings symmetrically: every embedding is an anchor whose positive is the other view of the same
image and whose ``2N - 2`` negatives are all the other embeddings of both views (itself and its positive excluded).
The returned loss is the mean of the ``2N`` per-anchor losses, i.e. ``(l(z1, z2) + l(z2, z1)) / 2`` in terms of the
one-way losses of the reference implementations.

Numerics: embeddings are L2-normalised inside the loss, and the similarities and log-sum-exps are computed in float32
(float64 inputs stay float64) with autocast disabled, so the losses are safe under bf16/fp16 mixed precision.

The functional core :func:`contrastive_from_logits` works on pre-computed logits and is meant to be reused by losses
whose negatives come from elsewhere (a MoCo queue, NNCLR's support set).
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastkit import distributed
from contrastkit.errors import ConfigError
from contrastkit.losses.common import at_least_float32, autocast_disabled, check_pair
from contrastkit.validation import check_flag, known_options, positive_float

__all__ = [
    "DCLLoss",
    "DCLWLoss",
    "InfoNCELoss",
    "LOSSES",
    "TwoViewLogits",
    "build_loss",
    "contrastive_from_logits",
    "dclw_weights",
    "two_view_logits",
]


# ----------------------------------------------------------------------------------------------------------------------
# Functional core
# ----------------------------------------------------------------------------------------------------------------------


def contrastive_from_logits(
    pos: Tensor,
    neg: Tensor,
    decoupled: bool = False,
    pos_weight: Tensor | None = None,
) -> Tensor:
    """Per-anchor contrastive losses from positive and negative logits (already divided by the temperature).

    For anchor ``i`` with positive logit ``p_i`` and negative logits ``n_i1 .. n_iM``::

        InfoNCE  (decoupled=False):  l_i = -w_i * p_i + log( exp(p_i) + sum_k exp(n_ik) )
        DCL      (decoupled=True):   l_i = -w_i * p_i + log(            sum_k exp(n_ik) )

    with ``w_i = 1`` unless ``pos_weight`` is given. Entries of ``neg`` equal to ``-inf`` are ignored, so a fixed-width
    ``NxM`` tensor can hold a variable number of negatives per anchor by masking (every anchor needs at least one
    finite negative for DCL, otherwise its loss is ``-inf``). The computation is done in the dtype of the inputs: cast
    them to float32 first when they come from a half-precision matmul.

    Args:
        pos: Positive logits, shape ``(N,)``.
        neg: Negative logits, shape ``(N, M)``; for instance in-batch negatives or a queue of ``M`` keys.
        decoupled: Drop the positive from the denominator (DCL, https://arxiv.org/abs/2110.06848). Default False.
        pos_weight: Optional weight of the positive term, shape ``(N,)`` (DCLW uses a detached von Mises-Fisher
            weight). Default None (weight 1).

    Returns:
        Per-anchor losses, shape ``(N,)``; reduce them yourself (usually ``.mean()``).
    """
    if pos.ndim != 1 or neg.ndim != 2 or neg.shape[0] != pos.shape[0]:
        raise ValueError(
            f"pos must have shape (N,) and neg shape (N, M), got {tuple(pos.shape)} and {tuple(neg.shape)}; "
            "pass one positive logit and one row of negative logits per anchor"
        )
    if pos_weight is not None and pos_weight.shape != pos.shape:
        raise ValueError(
            f"pos_weight must have the shape of pos {tuple(pos.shape)}, got {tuple(pos_weight.shape)}; "
            "pass one weight per anchor or None"
        )
    weighted_pos = pos if pos_weight is None else pos * pos_weight  # N
    if decoupled:
        denominator = neg  # NxM
    else:
        denominator = torch.cat([pos.unsqueeze(1), neg], dim=1)  # Nx(1+M)
    return -weighted_pos + torch.logsumexp(denominator, dim=1)  # N


def dclw_weights(z1: Tensor, z2: Tensor, sigma: float = 0.5) -> Tensor:
    """Negative von Mises-Fisher weights of DCLW for ``N`` positive pairs, without gradient.

    ``w_i = 2 - N * softmax_i(<z1_i, z2_i> / sigma) = 2 - exp(s_i / sigma) / mean_j exp(s_j / sigma)``, where ``s_i``
    is the cosine similarity of pair ``i`` (not divided by the temperature) and the softmax runs over the ``N`` pairs
    of the batch. The weights average to 1; pairs that are already similar get a weight below 1, hard pairs above 1.

    Args:
        z1: First views, shape ``(N, D)``, L2-normalised (the similarity is the plain dot product).
        z2: Second views, shape ``(N, D)``, L2-normalised.
        sigma: Width of the von Mises-Fisher kernel, > 0. Default 0.5 (the paper's value).

    Returns:
        Weights of shape ``(N,)``, detached from the graph.
    """
    sigma = positive_float(sigma, "sigma", "use the DCL paper's default sigma=0.5")
    with torch.no_grad():
        sim = (z1 * z2).sum(dim=1)  # N
        return 2.0 - sim.shape[0] * torch.softmax(sim / sigma, dim=0)  # N


class TwoViewLogits(NamedTuple):
    """The logits of the ``2n`` local anchors of a two-view batch (see :func:`two_view_logits`)."""

    pos: Tensor  # 2n, logit of each anchor's positive (the other view of its image)
    neg: Tensor  # 2nx2N, logits of all candidates; the anchor itself and its positive are -inf
    candidates: Tensor  # 2NxD, the normalised embeddings of both views of the (global) batch, view 1 first
    pos_col: Tensor  # 2n, column of each anchor's positive in ``candidates``
    z1_all: Tensor  # NxD
    z2_all: Tensor  # NxD
    offset: int  # global index of this process's first pair


def two_view_logits(z1: Tensor, z2: Tensor, temperature: float, gather_distributed: bool) -> TwoViewLogits:
    """Anchor-candidate logits of normalised ``z1``, ``z2`` (``n x D``): every embedding of both views is an anchor,
    its positive the other view of its image, its ``2N - 2`` negatives all the other embeddings of the (global, under
    ``gather_distributed`` and DDP) batch. Shared by the two-view losses and :class:`contrastkit.losses.ASCLLoss`'s
    in-batch variant."""
    n = z1.shape[0]
    if gather_distributed and distributed.world_size() > 1:
        z1_all = distributed.gather(z1)  # NxD, N = world_size * n
        z2_all = distributed.gather(z2)  # NxD
        offset = distributed.rank_offset(n)  # global index of this process's first pair
    else:
        z1_all, z2_all, offset = z1, z2, 0
    big_n = z1_all.shape[0]
    if big_n < 2:  # optim.batch_size >= 2 is validated with the config: a caller's mistake
        raise ValueError(
            f"a batch of {big_n} pair has no negatives; use a batch size of at least 2 (much more in practice)"
        )

    anchors = torch.cat([z1, z2], dim=0)  # 2nxD
    candidates = torch.cat([z1_all, z2_all], dim=0)  # 2NxD
    logits = anchors @ candidates.T / temperature  # 2nx2N

    device = anchors.device
    rows = torch.arange(2 * n, device=device)  # 2n
    pair = torch.arange(n, device=device) + offset  # n, global pair index of each local pair
    self_col = torch.cat([pair, pair + big_n])  # 2n, column of the anchor itself
    pos_col = torch.cat([pair + big_n, pair])  # 2n, column of its other view

    pos = logits[rows, pos_col]  # 2n
    excluded = torch.zeros_like(logits, dtype=torch.bool)  # 2nx2N
    excluded[rows, self_col] = True
    excluded[rows, pos_col] = True
    neg = logits.masked_fill(excluded, float("-inf"))  # 2nx2N, 2N-2 finite entries per row
    return TwoViewLogits(pos, neg, candidates, pos_col, z1_all, z2_all, offset)


# ----------------------------------------------------------------------------------------------------------------------
# Two-view losses
# ----------------------------------------------------------------------------------------------------------------------


class _TwoViewContrastiveLoss(nn.Module):
    """Shared forward pass of the in-batch two-view losses; subclasses choose the denominator and the weights."""

    decoupled: bool = False

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = False) -> None:
        super().__init__()
        self.temperature = positive_float(
            temperature, "temperature", "use a small positive value such as 0.1 (typical range 0.05-0.5)"
        )
        self.gather_distributed = check_flag(gather_distributed, "gather_distributed")

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"

    def _positive_weights(self, z1_all: Tensor, z2_all: Tensor, offset: int, n: int) -> Tensor | None:
        """Weight of the positive term of each local anchor, shape ``(2n,)``, or None for weight 1."""
        return None

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """Loss of a batch of pairs.

        Args:
            z1: Projections of the first views, shape ``(n, D)``, any float dtype, not necessarily normalised.
            z2: Projections of the second views, shape ``(n, D)``; row ``i`` is the same image as ``z1[i]``.

        Returns:
            Scalar loss (float32, or float64 for float64 inputs): the mean over this process's ``2n`` anchors.
        """
        check_pair(z1, z2)
        with autocast_disabled(z1.device.type):
            z1 = F.normalize(at_least_float32(z1), dim=1)  # nxD
            z2 = F.normalize(at_least_float32(z2), dim=1)  # nxD
            n = z1.shape[0]
            lg = two_view_logits(z1, z2, self.temperature, self.gather_distributed)
            pos, neg, z1_all, z2_all, offset = lg.pos, lg.neg, lg.z1_all, lg.z2_all, lg.offset
            weights = self._positive_weights(z1_all, z2_all, offset, n)  # 2n or None
            losses = contrastive_from_logits(pos, neg, decoupled=self.decoupled, pos_weight=weights)  # 2n
            return losses.mean()


_DISTRIBUTED_DOC = """
    Distributed training (``gather_distributed=True``): when a process group with world size ``W > 1`` is
    initialised, each process gathers the embeddings of all processes (with gradients, see
    :mod:`contrastkit.distributed`), so its anchors are contrasted with the ``2N - 2`` negatives of the global
    batch (``N = W * n``) and their positives are found at this rank's offset ``rank * n`` in it. The loss returned is
    the mean over this process's ``2n`` anchors; the mean over processes equals the single-process loss on the global
    batch, and the gradient reaching each process's inputs is ``W`` times the corresponding slice of the global
    gradient, which DDP's gradient averaging divides by ``W``: ``W`` processes on ``W`` equal slices train exactly
    like one process on the whole batch. All processes must have the same local batch size ``n`` (the
    training loader, :func:`contrastkit.training.module.index_loader`, guarantees it: a ``DistributedSampler`` and
    ``drop_last`` on every rank; Lightning's own sampler is disabled) and all must call ``backward``. Without a process
    group, or with ``gather_distributed=False``, only the local batch is used.
"""


class InfoNCELoss(_TwoViewContrastiveLoss):
    __doc__ = (
        """InfoNCE / NT-Xent loss of SimCLR.

    Paper: Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020,
    https://arxiv.org/abs/2002.05709 (Eq. 1).

    With ``u`` the ``2N`` L2-normalised embeddings of both views, ``i'`` the other view of anchor ``i`` and ``t`` the
    temperature, the per-anchor loss is::

        l_i = -<u_i, u_i'>/t + log( exp(<u_i, u_i'>/t) + sum_{k not in {i, i'}} exp(<u_i, u_k>/t) )

    and the loss is ``mean_i l_i`` over the ``2N`` anchors.

    Args:
        temperature: Softmax temperature ``t`` applied to the cosine similarities, > 0. Default 0.1.
        gather_distributed: Use the negatives of all processes under DDP (see below). Default False.
"""
        + _DISTRIBUTED_DOC
    )

    decoupled = False


class DCLLoss(_TwoViewContrastiveLoss):
    __doc__ = (
        """Decoupled contrastive loss (DCL).

    Paper: Yeh et al., "Decoupled Contrastive Learning", ECCV 2022, https://arxiv.org/abs/2110.06848.

    InfoNCE without the positive in the denominator, which removes the negative-positive coupling that makes
    InfoNCE's gradient shrink for easy positives and small batches. With the notation of :class:`InfoNCELoss`::

        l_i = -<u_i, u_i'>/t + log( sum_{k not in {i, i'}} exp(<u_i, u_k>/t) )

    and the loss is ``mean_i l_i`` over the ``2N`` anchors. It is lower than InfoNCE on the same inputs and can be
    negative.

    Args:
        temperature: Softmax temperature ``t`` applied to the cosine similarities, > 0. Default 0.1.
        gather_distributed: Use the negatives of all processes under DDP (see below). Default False.
"""
        + _DISTRIBUTED_DOC
    )

    decoupled = True


class DCLWLoss(DCLLoss):
    __doc__ = (
        """Decoupled contrastive loss with negative von Mises-Fisher weighting of the positives (DCLW).

    Paper: Yeh et al., "Decoupled Contrastive Learning", ECCV 2022, https://arxiv.org/abs/2110.06848.

    DCL with the positive term of the pair ``j`` (both of its anchors) weighted by::

        w_j = 2 - exp(s_j/sigma) / mean_k exp(s_k/sigma) = 2 - N * softmax_j(s_j/sigma),   s_j = <u_j^(1), u_j^(2)>

        l_i = -w_j * <u_i, u_i'>/t + log( sum_{k not in {i, i'}} exp(<u_i, u_k>/t) )    (i one of the views of pair j)

    As in the paper (``w = 2 - exp(s_i/sigma) / E_i[exp(s_i/sigma)]``, expectation over the batch) and in the public
    implementation github.com/raminnakhli/Decoupled-Contrastive-Learning (cited by lightly; not the authors' code),
    the softmax uses the raw cosine similarities of the ``N`` positive pairs of the batch, divided by ``sigma`` (not
    by the temperature); the weights average to 1 and equal 1 when all pairs are equally similar (DCLW is then DCL).
    The weights are computed without gradient (detached, as in lightly; the raminnakhli implementation lets
    gradients flow through them). Under ``gather_distributed=True`` the softmax runs over the global batch
    (``N = W * n``).

    Args:
        temperature: Softmax temperature ``t`` applied to the cosine similarities, > 0. Default 0.1.
        sigma: Width of the von Mises-Fisher weighting kernel, > 0. Default 0.5 (the paper's value).
        gather_distributed: Use the negatives of all processes under DDP (see below). Default False.
"""
        + _DISTRIBUTED_DOC
    )

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, gather_distributed: bool = False) -> None:
        super().__init__(temperature=temperature, gather_distributed=gather_distributed)
        self.sigma = positive_float(sigma, "sigma", "use the DCL paper's default sigma=0.5")

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, sigma={self.sigma}, gather_distributed={self.gather_distributed}"

    def _positive_weights(self, z1_all: Tensor, z2_all: Tensor, offset: int, n: int) -> Tensor:
        weights = dclw_weights(z1_all, z2_all, self.sigma)[offset : offset + n]  # n, this process's pairs
        return torch.cat([weights, weights])  # 2n, both anchors of a pair share its weight


# ----------------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------------

LOSSES: dict[str, type[nn.Module]] = {
    "infonce": InfoNCELoss,
    "ntxent": InfoNCELoss,
    "dcl": DCLLoss,
    "dclw": DCLWLoss,
}
"""Loss names accepted by :func:`build_loss` (lower case), mapped to their classes."""


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a loss from its name and keyword hyper-parameters, e.g. ``build_loss("dclw", temperature=0.2)``.

    Args:
        name: One of ``infonce`` (alias ``ntxent``), ``dcl``, ``dclw``; case-insensitive.
        **kwargs: Hyper-parameters of the loss class (see :class:`InfoNCELoss`, :class:`DCLLoss`, :class:`DCLWLoss`).

    Raises:
        ConfigError: Unknown name, unknown hyper-parameter or invalid value.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    cls = LOSSES[key]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    known_options(kwargs, valid, "loss", key)
    return cls(**kwargs)

"""Adaptive soft contrastive learning (ASCL): contrastive losses whose one-hot targets become soft targets.

Paper: Feng & Patras, "Adaptive Soft Contrastive Learning", ICPR 2022, https://arxiv.org/abs/2207.11163. Official
code: github.com/MrChenFeng/Adaptive-Soft-Contrastive-Learning_ICPR2022, ``model.py`` (``ASCL._forward_moco``,
``ASCL._forward_byol``).

For ``n`` queries ``q_i`` with positive keys ``k_i`` and ``M`` candidates ``z_j`` (a MoCo queue, or the other
embeddings of the batch), all L2-normalised, ``t`` the temperature and ``t'`` the target temperature::

    logits  l_i = [<q_i, k_i>, <q_i, z_1>, ..., <q_i, z_M>] / t             # n x (1+M)
    r_ij = softmax_j(<k_i, z_j> / t')                                       # n x M, key-to-candidate distribution
    c_i = 1 - H(r_i) / log M                                                # n, confidence in [0, 1]
    y_i0 = 1,  y_ij = min(1, K * c_i * r_ij)      targets="ascl" (soft)      # n x (1+M), before normalisation
           y_ij = c_i on the top-K of r_i, else 0  targets="ahcl" (adaptive hard)
           y_ij = 1 on the top-K of r_i, else 0    targets="hard"
           y_ij = 0                                targets="normal" (one-hot: InfoNCE)
    y_i <- y_i / sum_j y_ij  (no gradient);   loss = mean_i  -sum_j y_ij log softmax(l_i)_j

``K`` is ``neighbours``. Early in training ``r_i`` is near uniform, so ``c_i ~ 0`` and ASCL is InfoNCE; as the
representation sharpens, the positive's neighbours among the candidates receive target mass.

Three variants, one per host:

- :class:`ASCLLoss` (MoCo; the paper): candidates = the queue, read before this step's keys are enqueued, so a key
  is never its own neighbour. On MoCo's first step (empty queue, ``queue=None``) the candidates are the other keys
  of the (global) batch [ours].
- :class:`InBatchASCLLoss` (SimCLR; ours, no implementation has it): every embedding of both views is an anchor,
  its positive the other view of its image, its ``2N - 2`` candidates the other embeddings of the batch; the
  targets come from the positive's similarities to those candidates, ``c`` normalised by ``log(2N - 2)``.
- :class:`ASCLNormalizedMSELoss` (BYOL; official code's ``_forward_byol``): targets over the other ``B - 1`` keys
  of the batch, ``c`` normalised by ``log(B - 1)``, ``y_ii = 1``; ``l_i = 2 - 2 sum_j y_ij <h_i, k_j>`` with
  ``h_i`` the normalised prediction; the loss is the *mean* over the batch (the official code returns the
  per-sample vector, which its training loop cannot backpropagate; we take the mean as the paper's loss).

Each forward records the batch-mean confidence ``c`` and the target mass outside the positive ``1 - y_i0``
(:meth:`pop_stats` returns their mean since the last call): the two numbers that show ASCL at work.

Hyper-parameters (official code defaults): ``temperature`` 0.1 (``T1``), ``target_temperature`` 0.05 (``T2``),
``neighbours`` 1 (``--K`` / ``nn_num``; the README's CIFAR-100 example uses 5), ``targets="ascl"``.
Numerics as in the other losses: similarities in at least float32 with autocast off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastkit.errors import ConfigError
from contrastkit import distributed
from contrastkit.losses.common import at_least_float32, autocast_disabled, check_pair
from contrastkit.validation import check_flag, positive_float
from contrastkit.losses.contrastive import two_view_logits
from contrastkit.losses.queue import QueueInfoNCELoss

__all__ = ["ASCLLoss", "ASCL_TARGETS", "ASCLNormalizedMSELoss", "InBatchASCLLoss", "ascl_targets"]

ASCL_TARGETS = ("ascl", "ahcl", "hard", "normal")
"""The target kinds: soft (ASCL), adaptive hard (AHCL), hard top-K, one-hot (plain InfoNCE)."""


@torch.no_grad()
def ascl_targets(key_sim: Tensor, neighbours: int, target_temperature: float, targets: str = "ascl",
                 excluded: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Soft targets of ``n`` queries over ``[positive | M candidates]`` (module docstring), without gradient.

    Args:
        key_sim: Cosine similarities of each positive key to the candidates, ``n x M``.
        neighbours: ``K`` >= 1.
        target_temperature: ``t'`` > 0.
        targets: One of :data:`ASCL_TARGETS`.
        excluded: Optional ``n x M`` bool mask of candidates that are not candidates of that row (e.g. the query
            itself among in-batch candidates): they get target 0 and do not count in ``M`` for the entropy bound.

    Returns:
        ``(y, c)``: targets ``n x (1+M)`` (column 0 the positive, rows sum to 1) and confidences ``n`` (0 for a row
        with fewer than 2 candidates, whose entropy has no range).
    """
    n, m = key_sim.shape
    logits = key_sim / target_temperature  # nxM
    if excluded is not None:
        logits = logits.masked_fill(excluded, float("-inf"))
        count = (~excluded).sum(dim=1)  # n, candidates per row
    else:
        count = torch.full((n,), m, device=key_sim.device)
    r = torch.softmax(logits, dim=1)  # nxM, 0 on excluded
    entropy = torch.special.entr(r).sum(dim=1)  # n, 0 log 0 = 0
    bound = torch.log(count.clamp(min=2).to(r.dtype))  # n
    c = torch.where(count >= 2, 1.0 - entropy / bound, torch.zeros_like(entropy))  # n
    if targets == "ascl":
        rest = (neighbours * c[:, None] * r).clamp(max=1.0)  # nxM
    elif targets in ("ahcl", "hard"):
        top = logits.topk(min(neighbours, m), dim=1).indices  # nxK
        value = c[:, None].expand_as(top) if targets == "ahcl" else torch.ones_like(top, dtype=r.dtype)
        rest = torch.zeros_like(r).scatter(1, top, value)  # nxM
        if excluded is not None:  # rows with fewer than K candidates: top-k may pick excluded columns
            rest = rest.masked_fill(excluded, 0.0)
    elif targets == "normal":
        rest = torch.zeros_like(r)
    else:
        raise ConfigError(f"unknown ASCL targets {targets!r}; choose one of {', '.join(ASCL_TARGETS)}")
    y = torch.cat([torch.ones_like(c)[:, None], rest], dim=1)  # nx(1+M)
    return y / y.sum(dim=1, keepdim=True), c


def soft_cross_entropy(pos: Tensor, neg: Tensor, y: Tensor) -> Tensor:
    """``-sum_j y_ij log softmax([pos_i | neg_i])_j`` per row (``n``); ``-inf`` entries of ``neg`` (excluded
    candidates, target 0) contribute nothing."""
    logits = torch.cat([pos[:, None], neg], dim=1)  # nx(1+M)
    logp = torch.log_softmax(logits, dim=1).masked_fill(torch.isinf(logits), 0.0)  # nx(1+M)
    return -(y * logp).sum(dim=1)  # n


class _ASCLOptions:
    """Validation of the shared ASCL hyper-parameters and the statistics every variant records."""

    def _init_ascl(self, target_temperature: float, neighbours: int, targets: str) -> None:
        self.target_temperature = positive_float(target_temperature, "target_temperature",
                                                 "use the official code's 0.05")
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
            raise ConfigError(f"neighbours must be an integer >= 1, got {neighbours!r}; the official default is 1")
        self.neighbours = neighbours
        if targets not in ASCL_TARGETS:
            raise ConfigError(f"targets must be one of {', '.join(ASCL_TARGETS)}, got {targets!r}")
        self.targets = targets
        self._stats: list[Tensor] = []

    def _targets(self, key_sim: Tensor, excluded: Tensor | None = None) -> Tensor:
        y, c = ascl_targets(key_sim, self.neighbours, self.target_temperature, self.targets, excluded)
        self._stats.append(torch.stack([c.mean(), (1.0 - y[:, 0]).mean()]))
        return y

    def pop_stats(self) -> dict[str, Tensor]:
        """Mean confidence ``c`` (``confidence``) and target mass outside the positive (``mass``) over the forward
        calls since the last call (local batch); empty if there was none."""
        if not self._stats:
            return {}
        mean = torch.stack(self._stats).mean(dim=0)
        self._stats = []
        return {"confidence": mean[0], "mass": mean[1]}

    def _ascl_repr(self) -> str:
        return (f"target_temperature={self.target_temperature}, neighbours={self.neighbours}, "
                f"targets={self.targets!r}")


class ASCLLoss(_ASCLOptions, QueueInfoNCELoss):
    """ASCL with a queue of candidates: MoCo's InfoNCE with soft targets (module docstring).

    Args:
        temperature: ``t`` of the query logits, > 0. Default 0.1 (official code ``T1``).
        target_temperature: ``t'`` of the key-to-queue distribution, > 0. Default 0.05 (official code ``T2``).
        neighbours: ``K``, integer >= 1. Default 1 (official code).
        targets: ``ascl``, ``ahcl``, ``hard`` or ``normal`` (one-hot: exactly :class:`QueueInfoNCELoss`).
            Default ``ascl``.
        gather_distributed: Under DDP with ``queue=None``, the candidates are the keys of all processes. The queue
            itself is global already (:class:`contrastkit.models.MemoryQueue`), and the loss is a per-query mean, so
            ``W`` processes train like one on the whole batch. Default False.
    """

    def __init__(self, temperature: float = 0.1, target_temperature: float = 0.05, neighbours: int = 1,
                 targets: str = "ascl", gather_distributed: bool = False) -> None:
        QueueInfoNCELoss.__init__(self, temperature=temperature, gather_distributed=gather_distributed)
        self._init_ascl(target_temperature, neighbours, targets)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._ascl_repr()}"

    def forward(self, query: Tensor, key: Tensor, queue: Tensor | None = None) -> Tensor:
        """Loss of ``n`` queries.

        Args:
            query: ``n x D`` queries (normalised inside).
            key: ``n x D`` positive keys (no gradient expected: the momentum encoder's output).
            queue: ``M x D`` keys of earlier steps (detached), ``M >= 1``; None: the other keys of the batch.

        Returns:
            Scalar: the mean over the ``n`` queries of the soft cross-entropy.
        """
        with autocast_disabled(query.device.type):
            q, k, pos, neg, candidates = self.logits(query, key, queue)
            key_sim = k.detach() @ candidates.detach().T  # nxM
            y = self._targets(key_sim, torch.isinf(neg) if queue is None else None)  # nx(1+M)
            return soft_cross_entropy(pos, neg, y).mean()


class InBatchASCLLoss(_ASCLOptions, nn.Module):
    """ASCL over the in-batch candidates of a two-view batch: SimCLR's InfoNCE with soft targets [ours].

    Anchor ``u_i`` (one of the ``2N`` embeddings), positive ``u_i'`` (the other view of its image), candidates the
    other ``2N - 2`` embeddings; the targets come from ``<u_i', u_j> / t'`` over those candidates (detached).
    ``targets="normal"`` is exactly :class:`contrastkit.losses.InfoNCELoss`. Arguments as :class:`ASCLLoss`;
    ``gather_distributed`` takes the candidates from all processes (with gradients, as InfoNCE).
    """

    def __init__(self, temperature: float = 0.1, target_temperature: float = 0.05, neighbours: int = 1,
                 targets: str = "ascl", gather_distributed: bool = False) -> None:
        super().__init__()
        self.temperature = positive_float(temperature, "temperature", "use the official code's 0.1")
        self.gather_distributed = check_flag(gather_distributed, "gather_distributed")
        self._init_ascl(target_temperature, neighbours, targets)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, {self._ascl_repr()}"

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """Mean soft cross-entropy over the ``2n`` local anchors of ``z1``, ``z2`` (``n x D`` each)."""
        check_pair(z1, z2)
        with autocast_disabled(z1.device.type):
            z1 = F.normalize(at_least_float32(z1), dim=1)  # nxD
            z2 = F.normalize(at_least_float32(z2), dim=1)  # nxD
            lg = two_view_logits(z1, z2, self.temperature, self.gather_distributed)
            cand = lg.candidates.detach()  # 2NxD
            key_sim = cand[lg.pos_col] @ cand.T  # 2nx2N, each anchor's positive against every candidate
            y = self._targets(key_sim, torch.isinf(lg.neg))  # 2nx(1+2N)
            return soft_cross_entropy(lg.pos, lg.neg, y).mean()


class ASCLNormalizedMSELoss(_ASCLOptions, nn.Module):
    """BYOL's normalised MSE with ASCL soft targets over the batch's keys (official code's ``_forward_byol``).

    ``l_i = 2 - 2 sum_j y_ij <h_i, k_j>``, ``y`` over ``[own key | other keys]``, mean over the batch (module
    docstring). ``targets="normal"`` is exactly :class:`contrastkit.losses.NormalizedMSELoss`. Arguments as
    :class:`ASCLLoss` without ``temperature`` (BYOL has no logits); ``gather_distributed``: the other keys come from
    all processes (gathered without gradient; keys are the target network's output).
    """

    def __init__(self, target_temperature: float = 0.05, neighbours: int = 1, targets: str = "ascl",
                 gather_distributed: bool = False) -> None:
        super().__init__()
        self.gather_distributed = check_flag(gather_distributed, "gather_distributed")
        self._init_ascl(target_temperature, neighbours, targets)

    def extra_repr(self) -> str:
        return self._ascl_repr()

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        """Loss of ``n`` predictions ``h`` against the target keys ``k`` (``n x D`` each, normalised inside)."""
        if prediction.ndim != 2 or prediction.shape != target.shape:
            raise ValueError(f"prediction and target must both have shape (n, D), got {tuple(prediction.shape)} "
                             f"and {tuple(target.shape)}")
        with autocast_disabled(prediction.device.type):
            h = F.normalize(at_least_float32(prediction), dim=1)  # nxD
            k = F.normalize(at_least_float32(target.detach()), dim=1).to(h.dtype)  # nxD
            n = k.shape[0]
            world = distributed.world_size() if self.gather_distributed else 1
            k_all = distributed.gather(k) if world > 1 else k  # NxD, detached: no gradient flows back
            own = torch.arange(n, device=k.device) + (distributed.rank() * n if world > 1 else 0)  # n
            excluded = F.one_hot(own, k_all.shape[0]).bool()  # nxN
            y = self._targets(k @ k_all.T, excluded)  # nx(1+N), column 1+own is 0
            sim = torch.cat([(h * k).sum(dim=1, keepdim=True), h @ k_all.T], dim=1)  # nx(1+N)
            return (2.0 - 2.0 * (y * sim).sum(dim=1)).mean()


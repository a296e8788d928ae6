"""Nearest neighbours by cosine similarity in a bank of embeddings (a :class:`~contrastkit.models.MemoryQueue`).

Used by NNCLR (Dwibedi et al., ICCV 2021, https://arxiv.org/abs/2104.14548: the top-1 neighbour of a projection in
the support set replaces it as the positive), and meant for All4One (top-5 neighbours) and ASCL (similarities to
the whole queue, :func:`cosine_similarities`).

The lookup is a selection, so it runs without gradient: the returned embeddings are rows of the bank (detached)
and the similarities carry no graph. Similarities are computed in float32 (float64 stays float64) with autocast
disabled, in chunks of queries so that the ``chunk x M`` similarity block bounds the memory.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastkit.losses.common import at_least_float32, autocast_disabled

__all__ = ["Neighbours", "cosine_similarities", "nearest_neighbours"]


class Neighbours(NamedTuple):
    """The ``k`` nearest neighbours of ``N`` queries, most similar first."""

    embeddings: Tensor  #: N x k x D, rows of the bank as stored (a MemoryQueue stores them L2-normalised)
    indices: Tensor  #: N x k, int64 row indices into the bank
    similarities: Tensor  #: N x k, cosine similarities (float32, or float64 for float64 inputs)


def _check(query: Tensor, bank: Tensor) -> None:
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(
            f"query and bank must have shapes (N, D) and (M, D), got {tuple(query.shape)} and {tuple(bank.shape)}"
        )


def _chunks(n: int, chunk_size: int) -> range:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    return range(0, n, chunk_size)


@torch.no_grad()
def cosine_similarities(query: Tensor, bank: Tensor) -> Tensor:
    """Cosine similarity of every query to every bank row, ``N x M``, without gradient (e.g. ASCL's soft targets).

    Args:
        query: ``N x D`` embeddings, any float dtype, not necessarily normalised.
        bank: ``M x D`` embeddings.
    """
    _check(query, bank)
    with autocast_disabled(query.device.type):
        q = F.normalize(at_least_float32(query), dim=1)  # NxD
        b = F.normalize(bank.to(q.dtype), dim=1)  # MxD
        return q @ b.T  # NxM


@torch.no_grad()
def cosine_topk(query: Tensor, bank: Tensor, k: int = 1, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """The top-``k`` cosine search every part of contrastkit uses (NNCLR's support set, the kNN classifier, the
    retrieval pictures): similarities and indices of the ``k`` bank rows most similar to each query.

    Args:
        query: ``N x D`` embeddings, any float dtype, not necessarily normalised.
        bank: ``M x D`` embeddings with ``M >= k``.
        k: Number of neighbours, >= 1. Default 1.
        chunk_size: Queries per ``chunk_size x M`` similarity block. Default 1024 (64 MiB of float32 similarities
            for a 16384-entry bank).

    Returns:
        ``(similarities, indices)``, both ``N x k``, most similar first: cosine similarities (float32, or float64
        for float64 inputs) and int64 row indices into the bank. Ties are broken as :func:`torch.topk` breaks them.
    """
    _check(query, bank)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k must be an integer in [1, {bank.shape[0]}] (the bank size), got {k!r}")
    with autocast_disabled(query.device.type):
        q = F.normalize(at_least_float32(query), dim=1)  # NxD
        b = F.normalize(bank.to(q.dtype), dim=1)  # MxD
        sims, idx = [], []
        for s in _chunks(q.shape[0], chunk_size):
            top = torch.topk(q[s : s + chunk_size] @ b.T, k, dim=1)  # chunk x k
            sims.append(top.values)
            idx.append(top.indices)
    return torch.cat(sims), torch.cat(idx)  # Nxk, Nxk


@torch.no_grad()
def nearest_neighbours(query: Tensor, bank: Tensor, k: int = 1, chunk_size: int = 1024) -> Neighbours:
    """Top-``k`` bank rows by cosine similarity to each query (:func:`cosine_topk`), with their embeddings.

    Args:
        query: ``N x D`` embeddings, any float dtype, not necessarily normalised.
        bank: ``M x D`` embeddings with ``M >= k`` (e.g. ``MemoryQueue.get()``).
        k: Number of neighbours, >= 1. Default 1 (NNCLR); All4One uses 5.
        chunk_size: see :func:`cosine_topk`.

    Returns:
        :class:`Neighbours` (embeddings ``N x k x D``, indices ``N x k``, similarities ``N x k``), most similar first.
    """
    similarities, indices = cosine_topk(query, bank, k, chunk_size)  # Nxk, Nxk
    return Neighbours(bank.detach()[indices], indices, similarities)  # NxkxD, Nxk, Nxk

"""Top-k accuracy from class scores."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from contrastkit.errors import ConfigError, DataError


def topk_hits(scores: Tensor, labels: Tensor, n: int) -> Tensor:
    """Whether each label is among the ``min(n, C)`` highest scores of its row.

    Args:
        scores: M x C class scores (any real values; higher is better).
        labels: M integer labels in [0, C), on the device of ``scores``.
        n: how many top classes count as a hit; clipped to C.

    Returns:
        M booleans. Ties between scores are broken by :func:`torch.topk` (ordering of tied entries unspecified).
    """
    n = min(n, scores.shape[1])
    top = scores.topk(n, dim=1, largest=True, sorted=False).indices  # M x n
    return (top == labels.view(-1, 1)).any(dim=1)  # M


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent, as ``{"top1": ..., "top5": ...}`` for ``ks=(1, 5)``.

    A sample counts as a top-k hit if its label is among the k highest scores of its row. With fewer than k classes
    (C < k) top-k is the top-C accuracy, i.e. 100% (solo-learn likewise caps top-5 at the number of classes).

    Args:
        scores: M x C class scores or logits (higher is better).
        labels: M integer labels in [0, C).
        ks: which top-k accuracies to report (default ``(1, 5)``); each must be >= 1.

    Raises:
        DataError: empty or mismatched scores/labels, or labels outside [0, C).
        ConfigError: an entry of ``ks`` below 1.
    """
    if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise DataError(f"scores must be a non-empty M x C tensor, got shape {tuple(scores.shape)}")
    if labels.dim() != 1 or labels.shape[0] != scores.shape[0]:
        raise DataError(
            f"labels must be 1-D with one label per row of scores ({scores.shape[0]}), got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise DataError(f"labels must have an integer dtype, got {labels.dtype}; convert with .long()")
    if int(labels.min()) < 0 or int(labels.max()) >= scores.shape[1]:
        raise DataError(f"labels must lie in [0, {scores.shape[1]}) (the number of score columns)")
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ConfigError(f"ks must be positive integers, got {tuple(ks)!r}")
    labels = labels.to(scores.device)
    return {f"top{k}": 100.0 * topk_hits(scores, labels, k).float().mean().item() for k in ks}

"""Weighted k-nearest-neighbour evaluation of frozen features.

The classifier of InstDisc (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", https://arxiv.org/abs/1805.01978), as used for monitoring and evaluation by solo-learn
(``solo/utils/knn.py``, ``WeightedKNNClassifier``) and lightly (``lightly.utils.benchmarking.knn_predict``):

* ``metric="cosine"``: features are L2-normalised, similarity ``s = <q, x>``, the k most similar training features
  vote with weight ``exp(s / T)``.
* ``metric="euclidean"``: raw (not normalised) features, distance ``d = ||q - x||``, the k nearest training
  features vote with weight ``1 / (d + 1e-5)``; the temperature is not used. This is solo-learn's definition
  (its ``distance_fx="euclidean"``); we follow it, rather than ``exp(-d / T)``, so that numbers are comparable.

The score of a class is the sum of the weights of the neighbours of that class. :func:`knn_predict` returns these
scores divided by their sum over classes (rows sum to 1); the ranking is unchanged by that division.

Top-k rule: a query is a top-n hit when its class is among the n highest-scoring classes *and* at least one of its
k neighbours has that class. Classes without a neighbour all score 0 and their order is arbitrary, so they never
count (solo-learn instead counts whatever the sort puts there, and with k < 5 only looks at the top-k classes).
With fewer than 5 classes, top-5 is top-``num_classes``.

The test set is processed in chunks of queries so that the chunk x bank similarity matrix stays bounded; results do
not depend on the chunk size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor

from contrastkit.errors import ConfigError
from contrastkit.validation import (
    features_arg,
    labels_arg,
    num_classes_arg,
    positive_float,
    positive_int,
    resolve_device,
)
from contrastkit.evaluation.metrics import topk_hits
from contrastkit.models.neighbours import cosine_topk

Metric = Literal["cosine", "euclidean"]
METRICS: tuple[str, ...] = ("cosine", "euclidean")

#: Added to euclidean distances before inverting them (solo-learn's ``epsilon``).
EUCLIDEAN_EPS: float = 1e-5
#: Largest query chunk chosen automatically.
MAX_AUTO_CHUNK: int = 1024
#: Automatic chunks keep chunk x bank_size below this many elements (256 MiB of float32 similarities).
MAX_SIMILARITY_ELEMENTS: int = 2**26


def auto_chunk_size(bank_size: int) -> int:
    """Queries per chunk when ``chunk_size=None``: ``min(1024, max(1, 2**26 // bank_size))``."""
    return min(MAX_AUTO_CHUNK, max(1, MAX_SIMILARITY_ELEMENTS // bank_size))


def _metric_arg(metric: object) -> str:
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {METRICS}, got {metric!r}")
    return str(metric)


def _k_arg(k: object, bank_size: int, name: str = "k") -> int:
    k = positive_int(k, name)
    if k > bank_size:
        raise ConfigError(
            f"{name}={k} is larger than the number of training features ({bank_size}); use {name} <= {bank_size}"
        )
    return k


class _Bank:
    """Validated training features (the memory bank) and test queries, on the compute device."""

    def __init__(
        self,
        train_features: Tensor,
        train_labels: Tensor,
        test_features: Tensor,
        num_classes: int,
        device: torch.device | str | None,
        chunk_size: int | None,
    ) -> None:
        self.num_classes = num_classes_arg(num_classes)
        train_features = features_arg(train_features, "train_features")
        test_features = features_arg(test_features, "test_features", dim=train_features.shape[1])
        train_labels = labels_arg(train_labels, "train_labels", train_features.shape[0], num_classes, "train_features")
        self.device = resolve_device(device, train_features.device)
        self.size = train_features.shape[0]
        self.chunk_size = auto_chunk_size(self.size) if chunk_size is None else positive_int(chunk_size, "chunk_size")
        self._train = train_features.detach().to(self.device, torch.float32)  # N x D
        self._test = test_features.detach()  # M x D, moved chunk by chunk
        self.labels = train_labels.detach().to(self.device, torch.long)  # N

    @property
    def num_queries(self) -> int:
        return self._test.shape[0]

    def neighbours(self, metric: str, k: int) -> Iterator[tuple[int, int, Tensor, Tensor]]:
        """Yield ``(start, end, values, labels)`` per query chunk, best neighbour first.

        ``values`` (Q x k) are cosine similarities (descending) or euclidean distances (ascending); ``labels``
        (Q x k) are the classes of those neighbours.
        """
        for start in range(0, self.num_queries, self.chunk_size):
            end = min(start + self.chunk_size, self.num_queries)
            q = self._test[start:end].to(self.device, torch.float32)  # Q x D
            if metric == "cosine":
                values, idx = cosine_topk(q, self._train, k, chunk_size=self.chunk_size)  # Q x k each
            else:
                dist = torch.cdist(q, self._train)  # Q x N
                values, idx = dist.topk(k, dim=1, largest=False, sorted=True)  # Q x k
            yield start, end, values, self.labels[idx]


def _class_scores(
    values: Tensor, neighbour_labels: Tensor, num_classes: int, metric: str, temperature: float
) -> tuple[Tensor, Tensor]:
    """Normalised class scores (Q x C, rows sum to 1) and which classes have a neighbour (Q x C booleans)."""
    if metric == "cosine":
        # exp(s / T) up to the per-query factor exp(s_max / T), which cancels in the normalisation and keeps
        # small temperatures from overflowing float32.
        weights = ((values - values[:, :1]) / temperature).exp()  # Q x k, in (0, 1]
    else:
        weights = 1.0 / (values + EUCLIDEAN_EPS)  # Q x k
    q = values.shape[0]
    scores = torch.zeros(q, num_classes, device=values.device, dtype=torch.float32)
    scores.scatter_add_(1, neighbour_labels, weights)  # Q x C
    scores /= scores.sum(dim=1, keepdim=True)
    voted = torch.zeros(q, num_classes, device=values.device, dtype=torch.bool)
    voted.scatter_(1, neighbour_labels, True)  # Q x C
    return scores, voted


def _knn_hits(scores: Tensor, voted: Tensor, labels: Tensor, n: int) -> Tensor:
    """Top-n hits (Q booleans); classes without a neighbour rank below all others and never count as hits."""
    ranked = torch.where(voted, scores, torch.full_like(scores, -1.0))  # Q x C
    own_voted = voted.gather(1, labels.view(-1, 1)).squeeze(1)  # Q
    return topk_hits(ranked, labels, n) & own_voted


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    metric: Metric = "cosine",
    *,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Weighted kNN class scores of the test features (see the module docstring for the exact rule).

    Args:
        train_features: N x D features of the labelled training set (the memory bank), any float dtype.
        train_labels: N integer labels in [0, num_classes).
        test_features: M x D query features.
        num_classes: number of classes C (>= 2).
        k: number of neighbours (default 200, as lightly; solo-learn's online default is 20); must be <= N, a larger
            k raises :class:`ConfigError` instead of being clipped.
        temperature: T in ``exp(s / T)`` for ``metric="cosine"`` (default 0.1, as lightly and InstDisc's code;
            solo-learn uses 0.07); ignored for ``"euclidean"``.
        metric: ``"cosine"`` (default) or ``"euclidean"``.
        chunk_size: queries per chunk (default ``None``: ``min(1024, 2**26 // N)``).
        device: where to compute (default ``None``: the device of ``train_features``).

    Returns:
        M x C float32 scores on ``device``; each row sums to 1 and its argmax is the predicted class.
    """
    metric = _metric_arg(metric)
    bank = _Bank(train_features, train_labels, test_features, num_classes, device, chunk_size)
    k = _k_arg(k, bank.size)
    temperature = positive_float(temperature, "temperature")
    out = torch.empty(bank.num_queries, bank.num_classes, device=bank.device, dtype=torch.float32)  # M x C
    with torch.no_grad():
        for start, end, values, labels in bank.neighbours(metric, k):
            out[start:end] = _class_scores(values, labels, bank.num_classes, metric, temperature)[0]
    return out


def knn_evaluate(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    metric: Metric = "cosine",
    *,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Weighted kNN top-1 / top-5 accuracy in percent: ``{"top1": float, "top5": float}``.

    Arguments as in :func:`knn_predict`, plus ``test_labels`` (M integer labels in [0, num_classes)). Top-5 with
    fewer than 5 classes is top-``num_classes``; a class without any of the k neighbours is never a hit.
    """
    row = knn_grid(
        train_features,
        train_labels,
        test_features,
        test_labels,
        num_classes,
        ks=(k,),
        temperatures=(temperature,),
        metrics=(metric,),
        chunk_size=chunk_size,
        device=device,
    )[0]
    return {"top1": float(row["top1"]), "top5": float(row["top5"])}  # type: ignore[arg-type]


def knn_grid(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    ks: Sequence[int] = (10, 20, 50, 100, 200),
    temperatures: Sequence[float] = (0.05, 0.07, 0.1, 0.2, 0.5),
    metrics: Sequence[Metric] = ("cosine", "euclidean"),
    *,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> list[dict[str, float | int | str | None]]:
    """kNN accuracies for every metric x k x temperature, with one neighbour search (for ``max(ks)``) per metric.

    Args:
        ks: numbers of neighbours (default ``(10, 20, 50, 100, 200)``); each must be <= N.
        temperatures: cosine temperatures (default ``(0.05, 0.07, 0.1, 0.2, 0.5)``).
        metrics: default ``("cosine", "euclidean")``.
        Other arguments as in :func:`knn_evaluate`.

    Returns:
        One dict per setting, ``{"metric", "k", "temperature", "top1", "top5"}``, ordered metric, then k, then
        temperature. Euclidean rows do not use a temperature: there is one per k, with ``"temperature": None``.
        Each row equals the corresponding :func:`knn_evaluate` call.
    """
    metric_list = [_metric_arg(m) for m in metrics]
    if not metric_list or len(set(metric_list)) != len(metric_list):
        raise ConfigError(f"metrics must be a non-empty list of distinct values from {METRICS}, got {metrics!r}")
    bank = _Bank(train_features, train_labels, test_features, num_classes, device, chunk_size)
    test_labels = labels_arg(test_labels, "test_labels", bank.num_queries, bank.num_classes, "test_features")
    k_list = [_k_arg(k, bank.size, "every k") for k in ks]
    t_list = [positive_float(t, "every temperature") for t in temperatures]
    if not k_list or len(set(k_list)) != len(k_list):
        raise ConfigError(f"ks must be a non-empty list of distinct integers, got {ks!r}")
    if not t_list or len(set(t_list)) != len(t_list):
        raise ConfigError(f"temperatures must be a non-empty list of distinct numbers, got {temperatures!r}")
    test_labels = test_labels.detach().to(bank.device, torch.long)  # M

    rows: list[dict[str, float | int | str | None]] = []
    with torch.no_grad():
        for metric in metric_list:
            temps: list[float | None] = list(t_list) if metric == "cosine" else [None]
            settings = list(itertools.product(k_list, temps))
            hits = torch.zeros(len(settings), 2, device=bank.device, dtype=torch.long)  # settings x (top1, top5)
            for start, end, values, labels in bank.neighbours(metric, max(k_list)):
                y = test_labels[start:end]  # Q
                for i, (k, t) in enumerate(settings):
                    # values/labels are sorted best first, so the first k columns are the k nearest neighbours.
                    scores, voted = _class_scores(values[:, :k], labels[:, :k], bank.num_classes, metric, t or 1.0)
                    hits[i, 0] += _knn_hits(scores, voted, y, 1).sum()
                    hits[i, 1] += _knn_hits(scores, voted, y, 5).sum()
            acc = (100.0 * hits.double() / bank.num_queries).tolist()
            for (k, t), (top1, top5) in zip(settings, acc):
                rows.append({"metric": metric, "k": k, "temperature": t, "top1": top1, "top5": top5})
    return rows

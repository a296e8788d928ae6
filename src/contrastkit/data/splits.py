"""Validation splits carved from a labelled training split, and the seeded stratified split behind them.

Model and recipe choices (the kNN monitor, the linear probe's hyper-parameters, which recipe is better) must not see
the test split, or the reported test number is partly selection. Datasets that ship only ``train`` and ``test``
(Fashion-MNIST, CIFAR-10/100, STL-10, synthetic; an image folder without a ``val/`` sub-folder) therefore get two
derived splits of their ``train`` split:

* ``val``: ``val_size`` images, stratified by class (each class in proportion to its share of the training split,
  so class proportions are kept), chosen by a generator seeded with ``val_seed``;
* ``train-minus-val``: the other training images (the kNN bank and the linear probe's training rows).

Both are deterministic functions of the training split, ``val_size`` and ``val_seed``, and disjoint; together they
are the training split. Default sizes (:func:`default_val_size`): 5,000 images for Fashion-MNIST and CIFAR-10/100
(one twelfth / one tenth of their training splits), else 10 % of the training split (STL-10: 500 of 5,000).
Self-supervised pretraining may still use the whole ``train`` split: it reads no labels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from contrastkit.errors import DataError

__all__ = ["TRAIN_MINUS_VAL", "VAL", "default_val_size", "stratified_split", "validation_split"]

#: The validation split's name.
VAL = "val"
#: The training split without the validation images.
TRAIN_MINUS_VAL = "train-minus-val"
#: Validation sizes of the datasets with a conventional 5,000-image validation split.
_DEFAULT_SIZES = {"fashion-mnist": 5000, "cifar10": 5000, "cifar100": 5000}
#: Validation fraction of the other datasets.
DEFAULT_VAL_FRACTION = 0.1


def default_val_size(dataset: str, n_train: int) -> int:
    """The default validation size: 5,000 for Fashion-MNIST and CIFAR-10/100, else ``round(0.1 * n_train)``."""
    return _DEFAULT_SIZES.get(dataset, int(math.floor(DEFAULT_VAL_FRACTION * n_train + 0.5)))


def _allocate(size: int, counts: list[int]) -> list[int]:
    """Split ``size`` over classes in proportion to ``counts`` (largest remainder; ties to the lower class), at most
    ``count - 1`` per class so that every class keeps a training image."""
    total = sum(counts)
    quotas = [size * c / total for c in counts]
    n_val = [int(math.floor(q)) for q in quotas]
    order = sorted(range(len(counts)), key=lambda i: (-(quotas[i] - n_val[i]), i))
    for i in order[: size - sum(n_val)]:
        n_val[i] += 1
    return [min(n, max(c - 1, 0)) for n, c in zip(n_val, counts)]


def stratified_split(labels: Tensor, num_classes: int, seed: int, *, fraction: float | None = None,
                     size: int | None = None) -> tuple[Tensor, Tensor]:
    """Seeded stratified split of row indices: ``(rest, held_out)``, both sorted CPU int64 tensors.

    Exactly one of ``fraction`` (``round(fraction * n_c)`` rows of each class ``c`` are held out) and ``size``
    (``size`` rows in all, split over the classes in proportion to their counts by largest remainder) is given.
    A class never loses all its rows (at most ``n_c - 1`` are held out). Within a class the held-out rows are the
    first of a ``torch.randperm`` from a generator seeded with ``seed``, the classes drawn in label order.

    Args:
        labels: N integer labels in ``[0, num_classes)``.
        num_classes: number of classes C.
        seed: generator seed.
    """
    if (fraction is None) == (size is None):
        raise ValueError("give exactly one of fraction and size")
    generator = torch.Generator().manual_seed(seed)
    labels = labels.detach().cpu().long()
    order = torch.argsort(labels, stable=True)  # rows grouped by class
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    if size is not None:
        n_val = _allocate(size, counts)
    else:
        n_val = [min(int(math.floor(fraction * c + 0.5)), max(c - 1, 0)) for c in counts]  # type: ignore[operator]
    train_parts, val_parts = [], []
    start = 0
    for count, k in zip(counts, n_val):
        rows = order[start : start + count]
        rows = rows[torch.randperm(count, generator=generator)]
        val_parts.append(rows[:k])
        train_parts.append(rows[k:])
        start += count
    return torch.sort(torch.cat(train_parts)).values, torch.sort(torch.cat(val_parts)).values


def validation_split(labels: Tensor | None, num_classes: int | None, size: int, seed: int, name: str
                     ) -> tuple[Tensor, Tensor]:
    """The ``(train-minus-val, val)`` row indices of a labelled training split of ``name`` (for messages).

    Raises:
        DataError: the split is unlabelled, or ``size`` is not in ``[1, N - C]``.
    """
    if labels is None or num_classes is None:
        raise DataError(f"{name} has no labels, so no validation split can be carved from it; use a labelled "
                        "training split or set data.monitor_bank_split / monitor_query_split to other splits")
    n = len(labels)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= n - num_classes:
        raise DataError(f"validation size {size!r} does not fit {name} ({n} images, {num_classes} classes): set "
                        f"data.val_size to an integer in 1..{n - num_classes}")
    return stratified_split(labels, num_classes, seed, size=size)

"""The dataset registry: names, splits, options, and :func:`load_dataset`."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contrastkit.data.options import check_image_size
from contrastkit.data.tensors import ImageTensors
from contrastkit.data.cifar import load_cifar
from contrastkit.data.fashion_mnist import DEFAULT_ROOT as FASHION_MNIST_ROOT
from contrastkit.data.fashion_mnist import load_fashion_mnist
from contrastkit.data.imagefolder import load_imagefolder
from contrastkit.data.splits import TRAIN_MINUS_VAL, VAL, default_val_size, validation_split
from contrastkit.data.stl10 import load_stl10
from contrastkit.data.synthetic import load_synthetic
from contrastkit.errors import DataError
from contrastkit.validation import known_options

__all__ = ["available_datasets", "dataset_options", "dataset_splits", "load_dataset"]

# loader(root, split, image_size, **options); root is None when the caller gave none.
_Loader = Callable[..., ImageTensors]


@dataclass(frozen=True)
class _Dataset:
    loader: _Loader
    splits: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)  # option name -> default (documentation only)
    uses_root: bool = True


_DATASETS: dict[str, _Dataset] = {
    "fashion-mnist": _Dataset(
        lambda root, split, size: load_fashion_mnist(root, split, size), ("train", "test", VAL, TRAIN_MINUS_VAL)
    ),
    "cifar10": _Dataset(lambda root, split, size: load_cifar("cifar10", root, split, size),
                        ("train", "test", VAL, TRAIN_MINUS_VAL)),
    "cifar100": _Dataset(lambda root, split, size: load_cifar("cifar100", root, split, size),
                         ("train", "test", VAL, TRAIN_MINUS_VAL)),
    "stl10": _Dataset(
        load_stl10, ("train", "test", "unlabeled", "train+unlabeled", VAL, TRAIN_MINUS_VAL),
        {"cache": True, "cache_dir": None},
    ),
    "imagefolder": _Dataset(
        load_imagefolder, ("train", VAL, "test", TRAIN_MINUS_VAL), {"channels": 3, "cache_dir": None, "workers": None}
    ),
    "synthetic": _Dataset(
        lambda root, split, size, **options: load_synthetic(split, size, **options),
        ("train", "test", VAL, TRAIN_MINUS_VAL),
        {"n": None, "channels": 3, "num_classes": 10, "seed": 0, "nuisance": 1.0},
        uses_root=False,
    ),
}

_NAME_ALIASES = {
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "stl-10": "stl10",
    "image-folder": "imagefolder",
}
_SPLIT_ALIASES = {"unlabelled": "unlabeled", "train+unlabelled": "train+unlabeled", "validation": "val"}


def _lookup(name: str) -> tuple[str, _Dataset]:
    key = str(name).strip().lower().replace("_", "-")
    key = _NAME_ALIASES.get(key, key)
    if key not in _DATASETS:
        raise DataError(f"unknown dataset '{name}'; choose one of: {', '.join(available_datasets())}")
    return key, _DATASETS[key]


def available_datasets() -> list[str]:
    """The names accepted by :func:`load_dataset`, sorted."""
    return sorted(_DATASETS)


def dataset_splits(name: str) -> list[str]:
    """The splits of dataset ``name`` (for ``imagefolder``: those it may have, depending on its sub-folders).

    Raises:
        DataError: unknown dataset name.
    """
    return list(_lookup(name)[1].splits)


def dataset_options(name: str) -> dict[str, Any]:
    """The dataset-specific options of ``name`` with their defaults (``None``: computed, see the loader's doc).

    Raises:
        DataError: unknown dataset name.
    """
    return dict(_lookup(name)[1].options)


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    image_size: int | None = None,
    *,
    val_size: int | None = None,
    val_seed: int = 0,
    **options: Any,
) -> ImageTensors:
    """Load a dataset split into memory as uint8 tensors.

    Args:
        name: one of :func:`available_datasets` (case-insensitive; ``_`` may replace ``-``):

            * ``fashion-mnist``: IDX files; default root ``/usr/share/datasets/fashion-mnist`` (Debian package
              ``dataset-fashion-mnist``); splits train/test; ``1 x 28 x 28``.
            * ``cifar10``, ``cifar100``: the python pickles; default root ``./data``; splits train/test;
              ``3 x 32 x 32``.
            * ``stl10``: the binary files; default root ``./data``; splits train/test/unlabeled/train+unlabeled;
              ``3 x 96 x 96``; options ``cache`` (True: the unlabelled splits are converted once to a cached,
              memory-mapped ``.npy``), ``cache_dir`` (``<root>/.contrastkit-cache``); see
              :mod:`contrastkit.data.stl10`.
            * ``imagefolder``: a folder of images, decoded once and cached; root required; splits
              train/val/test (sub-folders); options ``channels`` (3), ``cache_dir`` (``<root>/.contrastkit-cache``),
              ``workers`` (``min(8, cpus)``); see :mod:`contrastkit.data.imagefolder`.
            * ``synthetic``: generated shapes; no root (ignored); splits train/test; options ``n`` (2048 train /
              512 test), ``channels`` (3), ``num_classes`` (10), ``seed`` (0); see :mod:`contrastkit.data.synthetic`.

        root: the dataset folder; ``None`` (default) uses the dataset's default location.
        split: which split. Default ``"train"``. Every labelled dataset also has ``val`` (a seeded, class-stratified
            part of ``train``) and ``train-minus-val`` (the rest of ``train``); an image folder with a ``val/``
            sub-folder uses that folder as ``val`` and all of ``train`` as ``train-minus-val``.
        image_size: output side length. ``imagefolder``: default 64; ``synthetic``: default 32; the fixed-size
            datasets: ``None`` (default) keeps the native size, another value resizes every image (antialiased
            bilinear, shorter side then center crop) into a new in-memory tensor.
        val_size: size of the ``val`` split carved from ``train`` (see :mod:`contrastkit.data.splits`); ``None``
            (default) = :func:`~contrastkit.data.splits.default_val_size` (5,000 for Fashion-MNIST and CIFAR, else
            10 % of ``train``). Only read for the splits ``val`` and ``train-minus-val``.
        val_seed: seed of that split (default 0).
        **options: the dataset-specific options listed above.

    Returns:
        The split as an :class:`ImageTensors`.

    Raises:
        DataError: unknown name, split or option; a root that does not exist; missing, corrupt or unreadable files
            (the message names the file and says how to fix it).
    """
    key, dataset = _lookup(name)
    split_key = _SPLIT_ALIASES.get(str(split).strip().lower(), str(split).strip().lower())
    if split_key not in dataset.splits:
        raise DataError(f"unknown split '{split}' for dataset {key}; choose one of: {', '.join(dataset.splits)}")
    known_options(options, dataset.options, "data.options", f"dataset {key}", DataError)
    size = check_image_size(image_size)
    path: Path | None = None
    if root is not None and dataset.uses_root:
        path = Path(root).expanduser()
        if not path.exists():
            hint = "install it with `apt-get install dataset-fashion-mnist` or " if key == "fashion-mnist" else ""
            raise DataError(f"dataset path {path} does not exist; {hint}set data.root to the folder that holds {key}")
    elif key == "fashion-mnist":
        path = FASHION_MNIST_ROOT
    if split_key in (VAL, TRAIN_MINUS_VAL):
        return _carved_split(key, dataset, path, split_key, size, val_size, val_seed, options)
    return dataset.loader(path, split_key, size, **options)


def _carved_split(key: str, dataset: _Dataset, path: Path | None, split: str, size: int | None,
                  val_size: int | None, val_seed: int, options: dict[str, Any]) -> ImageTensors:
    """``val`` or ``train-minus-val``: a seeded stratified part of ``train`` or the rest of it."""
    if key == "imagefolder" and path is not None and (path / VAL).is_dir():  # the folder's own validation split
        return dataset.loader(path, VAL if split == VAL else "train", size, **options)
    train = dataset.loader(path, "train", size, **options)
    if key == "imagefolder" and train.labels is None:
        raise DataError(f"{path} has no class folders and no val/ sub-folder, so it has no split {split!r}; use "
                        f"split=train or create {path / VAL if path is not None else 'ROOT/val'}")
    n_val = default_val_size(key, len(train)) if val_size is None else val_size
    rest, val = validation_split(train.labels, train.num_classes, n_val, val_seed, f"{key} train split")
    part = train.subset(val if split == VAL else rest)
    part.name = f"{key}/{split}"
    return part

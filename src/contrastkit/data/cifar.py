"""CIFAR-10 and CIFAR-100 from the "python version" pickles (the layout torchvision downloads).

CIFAR-10: ``cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5`` (train, 10000 images each),
``test_batch`` (10000) and ``batches.meta`` (``label_names``). CIFAR-100: ``cifar-100-python/`` with ``train``
(50000), ``test`` (10000) and ``meta`` (``fine_label_names``); labels are the 100 fine labels. ``root`` is the folder
that contains that folder or the folder itself. Each file is a pickled dict whose ``data`` is a ``N x 3072`` uint8
array (1024 red, 1024 green, 1024 blue values, each a row-major 32 x 32 plane), so a reshape gives ``N x 3 x 32 x 32``.

The pickles are read with a restricted unpickler that only rebuilds numpy arrays, lists, dicts, strings and numbers,
so a tampered file cannot run code.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contrastkit.data.options import one_line
from contrastkit.data.tensors import ImageTensors, resize_images, tensor_from_numpy
from contrastkit.errors import DataError

__all__ = ["SPLITS", "load_cifar"]

SPLITS = ("train", "test")
_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class _Layout:
    title: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str
    num_classes: int


_LAYOUTS = {
    "cifar10": _Layout(
        "CIFAR-10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
        10,
    ),
    "cifar100": _Layout(
        "CIFAR-100", "cifar-100-python", ("train",), ("test",), "meta", "fine_labels", "fine_label_names", 100
    ),
}


def _numpy_reconstructors() -> dict[tuple[str, str], Any]:
    core = getattr(np, "_core", None) or np.core
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("codecs").encode,  # bytes pickled by Python 3 with protocol < 3
    }
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{module}.multiarray", "scalar")] = core.multiarray.scalar
        allowed[(f"{module}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return allowed


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals needed to rebuild numpy arrays."""

    _allowed = _numpy_reconstructors()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _load_pickle(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataError(f"cannot read {path}: {one_line(e)}; the file is corrupt or not a CIFAR pickle, replace it")
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not a CIFAR dict; replace the file")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _field(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise DataError(f"{path} has no '{key}' entry (has {', '.join(sorted(batch))}); replace the file")
    return batch[key]


def _find_folder(name: str, root: Path) -> Path:
    layout = _LAYOUTS[name]
    for folder in (root / layout.folder, root):
        if (folder / layout.meta).is_file() or (folder / layout.test[0]).is_file():
            return folder
    raise DataError(
        f"{layout.title} not found at {root}: expected {root / layout.folder}/ with {layout.meta}; "
        f"download the python version from {_URL} and extract it there, or pass data.root=PATH"
    )


def load_cifar(
    name: str, root: Path | None = None, split: str = "train", image_size: int | None = None
) -> ImageTensors:
    """Load a CIFAR-10 or CIFAR-100 split.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        root: the folder that contains ``cifar-10-batches-py`` / ``cifar-100-python``, or that folder itself.
            Default ``./data`` (torchvision's usual download folder).
        split: ``"train"`` (50000 images) or ``"test"`` (10000). Default ``"train"``.
        image_size: resize to ``image_size x image_size`` (antialiased bilinear); ``None`` (default) keeps 32 x 32.

    Returns:
        images ``N x 3 x 32 x 32`` uint8, labels ``N`` int64 (0..9 or 0..99 fine labels), the class names.
    """
    layout = _LAYOUTS[name]
    folder = _find_folder(name, Path("data") if root is None else root)
    hint = f"re-extract the python version from {_URL} or pass data.root=PATH"

    meta_path = folder / layout.meta
    if not meta_path.is_file():
        raise DataError(f"{layout.title} metadata missing: {meta_path} not found; {hint}")
    names = _field(_load_pickle(meta_path), layout.names_key, meta_path)
    classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    if len(classes) != layout.num_classes:
        raise DataError(f"{meta_path} lists {len(classes)} classes, expected {layout.num_classes}; replace the file")

    parts_x: list[np.ndarray] = []
    parts_y: list[np.ndarray] = []
    for file_name in layout.train if split == "train" else layout.test:
        path = folder / file_name
        if not path.is_file():
            raise DataError(f"{layout.title} {split} split incomplete: {path} not found; {hint}")
        batch = _load_pickle(path)
        data = np.asarray(_field(batch, "data", path))
        labels = np.asarray(_field(batch, layout.label_key, path))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 N x 3072; replace the file")
        if labels.shape != (len(data),):
            raise DataError(f"{path} has {len(data)} images but {labels.size} labels; replace the file")
        if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
            raise DataError(f"{path} has labels outside 0..{layout.num_classes - 1}; replace the file")
        parts_x.append(data.reshape(-1, 3, 32, 32))  # N x 3 x 32 x 32
        parts_y.append(labels.astype(np.int64))
    x = tensor_from_numpy(np.ascontiguousarray(np.concatenate(parts_x)))  # N x 3 x 32 x 32
    y = tensor_from_numpy(np.concatenate(parts_y))  # N
    if image_size is not None:
        x = resize_images(x, image_size)
    return ImageTensors(x, y, classes, f"{name}/{split}")

"""STL-10 from its binary files, read with numpy (the unlabelled images memory-mapped).

Layout: ``stl10_binary/`` with ``train_X.bin`` / ``train_y.bin`` (5000 images), ``test_X.bin`` / ``test_y.bin``
(8000), ``unlabeled_X.bin`` (100000) and ``class_names.txt``; ``root`` is the folder that contains ``stl10_binary``
or that folder itself. An ``X`` file is raw uint8, ``N x 3 x 96 x 96``, each 96 x 96 channel plane stored
column-major, so after the reshape H and W must be swapped. A ``y`` file holds one uint8 label 1..10 per image
(returned as 0..9).

Splits and memory:

* ``train``, ``test``: read and transposed into contiguous in-memory tensors (138 MB / 221 MB).
* ``unlabeled`` (100000 images, labels ``None``) and ``train+unlabeled`` (the 5000 train images followed by the
  100000 unlabelled ones, labels ``None``): with ``cache=True`` (default) the first load writes the transposed
  train and unlabelled images, in that order, to one ``.npy`` file in the cache folder (2.9 GB of disk, written
  once, in chunks, atomically), and both splits are contiguous read-only memory-mapped views of it
  (``memory_mapped`` is ``True``); nothing is copied into RAM. The cache key holds the paths, sizes and
  modification times of ``train_X.bin`` and ``unlabeled_X.bin``, so replaced files are converted again (and the
  old cache deleted).
  With ``cache=False``, ``unlabeled`` is a read-only memory map of ``unlabeled_X.bin`` itself with H and W swapped
  by strides: **not contiguous** (and neither are batches indexed from it, ``images[idx]``, which keep its
  strides: call ``.contiguous()`` on them where needed); ``train+unlabeled`` is copied into one contiguous
  in-memory tensor (2.9 GB of RAM).

With ``image_size`` set, every split is resized chunk by chunk into a new in-memory tensor.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from contrastkit.data.cache import create_npy, digest, prune_cache, resolve_cache_dir
from contrastkit.data.options import one_line
from contrastkit.data.tensors import ImageTensors, resize_images, tensor_from_numpy
from contrastkit.errors import DataError
from contrastkit.io import atomic_write

__all__ = ["CLASSES", "SPLITS", "load_stl10"]

log = logging.getLogger(__name__)

SPLITS = ("train", "test", "unlabeled", "train+unlabeled")
#: Class names used when ``class_names.txt`` is absent (the order of the official file).
CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
_SHAPE = (3, 96, 96)
_IMAGE_BYTES = 3 * 96 * 96
_HINT = (
    "download stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/ and extract it, "
    "or pass data.root=PATH"
)


def _find_folder(root: Path) -> Path:
    for folder in (root / "stl10_binary", root):
        if any((folder / f).is_file() for f in ("class_names.txt", "train_X.bin", "test_X.bin", "unlabeled_X.bin")):
            return folder
    raise DataError(f"STL-10 not found at {root}: expected {root / 'stl10_binary'}/ with train_X.bin; {_HINT}")


def _count(path: Path, split: str) -> int:
    if not path.is_file():
        raise DataError(f"STL-10 {split} split incomplete: {path} not found; {_HINT}")
    size = path.stat().st_size
    if size == 0 or size % _IMAGE_BYTES:
        raise DataError(
            f"{path} has {size} bytes, not a positive multiple of 3*96*96 = {_IMAGE_BYTES}; the file is truncated, "
            "replace it"
        )
    return size // _IMAGE_BYTES


def _map_raw(path: Path, split: str) -> np.ndarray:
    """Memory-map an X file read-only as stored: ``N x 3 x W x H``."""
    n = _count(path, split)
    try:
        return np.memmap(path, dtype=np.uint8, mode="r", shape=(n, *_SHAPE))  # N x C x W x H
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {one_line(e)}; check the file's permissions or replace it") from e


def _map_images(path: Path, split: str) -> torch.Tensor:
    """Memory-map an X file as a read-only ``N x 3 x 96 x 96`` view with H and W swapped by strides."""
    return tensor_from_numpy(_map_raw(path, split)).transpose(2, 3)  # N x C x H x W, not contiguous


def _cached_train_unlabeled(
    folder: Path, root: Path, cache_dir: str | os.PathLike[str] | None, split: str
) -> torch.Tensor:
    """The train then unlabelled images, transposed, as a contiguous read-only memory map of a cached ``.npy``."""
    sources = [_map_raw(folder / "train_X.bin", split), _map_raw(folder / "unlabeled_X.bin", split)]
    stats = []
    for source in sources:
        st = os.stat(source.filename)
        stats.append((str(Path(source.filename).resolve()), st.st_size, st.st_mtime_ns))
    slot = "stl10-" + digest(["stl10-train+unlabeled", 1, str(folder.resolve())])
    key = f"{slot}-{digest(stats)}"
    cache = resolve_cache_dir(root, cache_dir, "stl10")
    path = cache / f"{key}.images.npy"
    shape = (sum(len(m) for m in sources), *_SHAPE)
    cached = _load_npy(path, shape)
    if cached is not None:
        return cached

    def write(tmp: Path) -> None:
        out = create_npy(tmp, shape)  # N x C x H x W
        offset, step = 0, 2048
        for source in sources:
            for start in range(0, len(source), step):
                chunk = source[start : start + step]  # B x C x W x H
                out[offset + start : offset + start + len(chunk)] = chunk.transpose(0, 1, 3, 2)
            offset += len(source)
        out.flush()
        del out

    log.info("writing STL-10 train+unlabeled images (%.1f GB, once) to %s", np.prod(shape) / 1e9, path)
    try:
        atomic_write(path, write)
    except OSError as e:
        raise DataError(
            f"cannot write the STL-10 cache {path}: {one_line(e)}; free {np.prod(shape) / 1e9:.1f} GB, "
            "pass another cache_dir, or cache=False"
        ) from e
    prune_cache(cache, slot, key)
    result = _load_npy(path, shape)
    if result is None:
        raise DataError(f"the STL-10 cache {path} could not be read back; delete it and retry")
    return result


def _load_npy(path: Path, shape: tuple[int, ...]) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if array.dtype != np.uint8 or array.shape != shape:
        return None
    return tensor_from_numpy(array)


def _read_images(path: Path, split: str) -> torch.Tensor:
    """Read an X file into a contiguous in-memory ``N x 3 x 96 x 96`` tensor."""
    n = _count(path, split)
    try:
        raw = np.fromfile(path, dtype=np.uint8).reshape(n, *_SHAPE)  # N x C x W x H
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {one_line(e)}; check the file's permissions or replace it") from e
    return torch.from_numpy(np.ascontiguousarray(raw.transpose(0, 1, 3, 2)))  # N x C x H x W


def _read_labels(path: Path, split: str, n: int) -> torch.Tensor:
    if not path.is_file():
        raise DataError(f"STL-10 {split} split incomplete: {path} not found; {_HINT}")
    labels = np.fromfile(path, dtype=np.uint8)
    if len(labels) != n:
        raise DataError(f"{path} has {len(labels)} labels for {n} images; the files do not match, replace them")
    if n and (labels.min() < 1 or labels.max() > 10):
        raise DataError(f"{path} has labels outside 1..10; replace the file")
    return torch.from_numpy(labels.astype(np.int64) - 1)  # N, 0..9


def _class_names(folder: Path) -> list[str]:
    path = folder / "class_names.txt"
    if not path.is_file():
        return list(CLASSES)
    names = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if len(names) != 10:
        raise DataError(f"{path} lists {len(names)} class names, expected 10; replace the file")
    return names


def load_stl10(
    root: Path | None = None,
    split: str = "train",
    image_size: int | None = None,
    *,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ImageTensors:
    """Load an STL-10 split.

    Args:
        root: the folder that contains ``stl10_binary`` or that folder itself. Default ``./data``.
        split: ``"train"`` (5000 labelled), ``"test"`` (8000 labelled), ``"unlabeled"`` (100000) or
            ``"train+unlabeled"`` (105000). Default ``"train"``. See the module docstring for memory.
        image_size: resize to ``image_size x image_size`` (antialiased bilinear, into memory); ``None`` (default)
            keeps 96 x 96.
        cache: for the unlabelled splits, convert the images once to a contiguous cached ``.npy`` and memory-map
            it (default ``True``); ``False`` maps ``unlabeled_X.bin`` directly (strided, not contiguous).
        cache_dir: folder for that cache. Default ``<root>/.contrastkit-cache`` if writable, else
            ``$XDG_CACHE_HOME/contrastkit/stl10`` (``~/.cache/contrastkit/stl10``).

    Returns:
        images ``N x 3 x 96 x 96`` uint8; labels ``N`` int64 in 0..9 and the class names, or ``None`` for the
        unlabelled splits.
    """
    if not isinstance(cache, bool):
        raise DataError(f"option cache must be true or false, got {cache!r}")
    root = Path("data") if root is None else root
    folder = _find_folder(root)
    mapped = False
    labels: torch.Tensor | None = None
    classes: list[str] | None = None
    if split in ("train", "test"):
        images = _read_images(folder / f"{split}_X.bin", split)
        labels = _read_labels(folder / f"{split}_y.bin", split, len(images))
        classes = _class_names(folder)
    elif cache:
        images, mapped = _cached_train_unlabeled(folder, root, cache_dir, split), True
        if split == "unlabeled":
            images = images[_count(folder / "train_X.bin", split) :]  # contiguous view
    elif split == "unlabeled":
        images, mapped = _map_images(folder / "unlabeled_X.bin", split), True
    else:  # train+unlabeled, in memory
        unlabeled = _map_images(folder / "unlabeled_X.bin", split)
        train = _read_images(folder / "train_X.bin", split)
        images = torch.empty((len(train) + len(unlabeled), *_SHAPE), dtype=torch.uint8)  # N x C x H x W
        offset = len(train)
        images[:offset] = train
        del train
        step = 4096
        for start in range(0, len(unlabeled), step):  # chunked so the page cache, not RAM, holds the source
            images[offset + start : offset + start + step] = unlabeled[start : start + step]
    if image_size is not None and image_size != 96:
        images, mapped = resize_images(images, image_size), False
    return ImageTensors(images, labels, classes, f"stl10/{split}", memory_mapped=mapped)

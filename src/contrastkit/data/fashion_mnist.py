"""Fashion-MNIST from its IDX files (gzipped or not), read with numpy.

Layout: ``root`` holds ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]`` (the Debian package ``dataset-fashion-mnist``
installs them in ``/usr/share/datasets/fashion-mnist``). torchvision's ``<root>/FashionMNIST/raw/`` layout is found
too. Splits: ``train`` (60000 images) and ``test`` (10000), each ``1 x 28 x 28``.

The IDX format: a 4-byte magic number ``00 00 <type> <ndim>`` (type ``0x08`` = unsigned byte), ``ndim`` big-endian
uint32 dimension sizes, then the data in row-major order.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from contrastkit.data.options import one_line
from contrastkit.data.tensors import ImageTensors, resize_images, tensor_from_numpy
from contrastkit.errors import DataError

__all__ = ["CLASSES", "DEFAULT_ROOT", "SPLITS", "load_fashion_mnist", "read_idx"]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
SPLITS = ("train", "test")
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_PREFIX = {"train": "train", "test": "t10k"}
_INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` or pass data.root=PATH"


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (``.gz`` is decompressed) with ``ndim`` dimensions into a numpy array.

    Raises:
        DataError: the file cannot be read, is not gzip although named ``.gz``, is truncated, has the wrong magic
            number or a size that does not match its header.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {one_line(e)}; the file is corrupt or truncated, replace it") from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated ({len(raw)} bytes, shorter than the IDX header); replace the file")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:
        raise DataError(
            f"{path} is not an IDX file of unsigned bytes with {ndim} dimensions "
            f"(magic number 0x{magic:08x}, expected 0x{0x0800 + ndim:08x}); replace the file"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        state = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise DataError(
            f"{path} is {state}: header says {'x'.join(map(str, shape))} = {expected} bytes of data, "
            f"found {len(raw) - header}; replace the file"
        )
    # frombuffer on bytes is read-only: copy into a writable array (the copy is cheap next to decompression).
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _find(root: Path, split: str, kind: str) -> Path | None:
    idx = "idx3" if kind == "images" else "idx1"
    for folder in (root, root / "FashionMNIST" / "raw", root / "fashion-mnist"):
        for name in (f"{_PREFIX[split]}-{kind}-{idx}-ubyte", f"{_PREFIX[split]}-{kind}.{idx}-ubyte"):
            for candidate in (folder / f"{name}.gz", folder / name):
                if candidate.is_file():
                    return candidate
    return None


def load_fashion_mnist(root: Path | None = None, split: str = "train", image_size: int | None = None) -> ImageTensors:
    """Load a Fashion-MNIST split.

    Args:
        root: folder with the IDX files. Default ``/usr/share/datasets/fashion-mnist``.
        split: ``"train"`` (60000 images) or ``"test"`` (10000). Default ``"train"``.
        image_size: resize to ``image_size x image_size`` (antialiased bilinear); ``None`` (default) keeps 28 x 28.

    Returns:
        images ``N x 1 x 28 x 28`` uint8, labels ``N`` int64 in 0..9, the 10 class names.
    """
    root = DEFAULT_ROOT if root is None else root
    images_path, labels_path = _find(root, split, "images"), _find(root, split, "labels")
    if images_path is None or labels_path is None:
        if not any(_find(root, s, k) for s in SPLITS for k in ("images", "labels")):
            raise DataError(f"Fashion-MNIST not found at {root}: {_INSTALL_HINT}")
        missing = f"{_PREFIX[split]}-{'images-idx3' if images_path is None else 'labels-idx1'}-ubyte.gz"
        raise DataError(f"Fashion-MNIST {split} split incomplete: {root / missing} not found; {_INSTALL_HINT}")
    images = read_idx(images_path, 3)  # N x H x W
    labels = read_idx(labels_path, 1)  # N
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
            "the files do not belong together, replace them"
        )
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise DataError(f"{labels_path} has label {int(labels.max())}, expected 0..9; replace the file")
    x = tensor_from_numpy(images).unsqueeze(1)  # N x 1 x H x W
    if image_size is not None:
        x = resize_images(x, image_size)
    y = tensor_from_numpy(labels.astype(np.int64))  # N
    return ImageTensors(x, y, list(CLASSES), f"fashion-mnist/{split}")

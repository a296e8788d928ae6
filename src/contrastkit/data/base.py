"""In-memory image datasets as uint8 tensors, plus helpers shared by the dataset readers.

Every dataset is returned as an :class:`ImageTensors`: all images as one ``uint8`` tensor of shape ``N x C x H x W``
and (when labelled) an ``int64`` label tensor of shape ``N``. Augmentation and normalisation run later, batched on the
training device, so nothing here converts to float except :meth:`ImageTensors.channel_stats`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from contrastkit.errors import DataError

__all__ = ["ImageTensors", "IndexLike"]

#: What :meth:`ImageTensors.subset` accepts: a slice, a range, a sequence of ints, an int64/bool tensor or array.
IndexLike = Union[slice, range, Sequence[int], torch.Tensor, np.ndarray]

# Elements (bytes of uint8) processed per chunk in chunked loops: 16 Mi elements keeps the float64 temporaries at
# 128 MiB whatever the image size.
_CHUNK_ELEMENTS = 1 << 24

#: Name of the cache folder created inside a dataset's root (when writable).
CACHE_FOLDER = ".contrastkit-cache"


@dataclass(eq=False, repr=False)
class ImageTensors:
    """A whole dataset held as tensors.

    Attributes:
        images: ``uint8`` tensor, ``N x C x H x W``, values 0..255, C-contiguous. It may wrap a read-only memory
            map (:attr:`memory_mapped` is then ``True``: an imagefolder dataset, read from its ``.npy`` cache; the
            STL-10 unlabelled splits), which reads from the page cache instead of RAM. Treat such a tensor as
            read-only: an in-place write to a read-only mapping crashes the process. Indexing a batch
            (``images[idx]``) or :meth:`subset` with indices makes an ordinary in-memory copy. One exception to
            contiguity: STL-10 ``unlabeled`` loaded with ``cache=False`` is a strided view (see
            :mod:`contrastkit.data.stl10`).
        labels: ``int64`` tensor, ``N``, class indices in ``0..len(classes)-1``; ``None`` when unlabelled.
        classes: class names indexed by label; ``None`` when unlabelled.
        name: a human-readable name such as ``"cifar10/train"``.
        memory_mapped: ``True`` when ``images`` wraps a read-only memory map (see above). Default ``False``.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    classes: list[str] | None
    name: str
    memory_mapped: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"{self.name}: images must be a uint8 tensor N x C x H x W, got {_describe(self.images)}")
        if self.labels is not None:
            if self.labels.dtype != torch.int64 or self.labels.dim() != 1 or len(self.labels) != len(self.images):
                raise ValueError(
                    f"{self.name}: labels must be an int64 tensor of length {len(self.images)}, "
                    f"got {_describe(self.labels)}"
                )
            if self.classes is None:
                raise ValueError(f"{self.name}: labelled dataset needs class names")
        if self.classes is not None:
            self.classes = list(self.classes)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        kind = f"{len(self.classes)} classes" if self.labels is not None and self.classes else "unlabelled"
        c, h, w = self.images.shape[1:]
        mm = ", memory-mapped" if self.memory_mapped else ""
        return f"ImageTensors(name={self.name!r}, n={len(self)}, image={c}x{h}x{w}, {kind}{mm})"

    @property
    def channels(self) -> int:
        """Number of channels C (1 for grey, 3 for RGB)."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """Image height and width ``(H, W)``."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def num_classes(self) -> int | None:
        """Number of classes, or ``None`` when unlabelled."""
        return None if self.classes is None else len(self.classes)

    def subset(self, indices: IndexLike) -> ImageTensors:
        """Return the images (and labels) at ``indices`` as a new dataset with the same classes and name.

        Args:
            indices: a slice or range (gives views that share memory with this dataset when the step is positive),
                a sequence of ints, an integer tensor/array (negative indices count from the end) or a boolean mask
                of length N (these give copies).

        Raises:
            IndexError: an index is out of range or a mask has the wrong length.
        """
        if isinstance(indices, range):
            indices = slice(indices.start, indices.stop, indices.step) if indices.step > 0 else list(indices)
        if isinstance(indices, slice):
            if indices.step is not None and indices.step <= 0:
                indices = list(range(len(self)))[indices]
            else:
                images = self.images[indices]
                labels = None if self.labels is None else self.labels[indices]
                return ImageTensors(images, labels, self.classes, self.name, memory_mapped=self.memory_mapped)
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
        if idx.dtype == torch.bool:
            if idx.dim() != 1 or len(idx) != len(self):
                raise IndexError(f"boolean mask of shape {tuple(idx.shape)} does not match {len(self)} images")
            idx = idx.nonzero().flatten()
        if idx.numel() == 0:
            idx = idx.to(torch.int64)
        if idx.dim() != 1 or (idx.is_floating_point() or idx.is_complex()):
            raise IndexError(f"indices must be a 1-D sequence of ints, got {_describe(idx)}")
        idx = idx.to(torch.int64)
        n = len(self)
        if idx.numel() and (int(idx.max()) >= n or int(idx.min()) < -n):
            raise IndexError(f"index out of range for {n} images")
        idx = torch.where(idx < 0, idx + n, idx)
        images = self.images.index_select(0, idx).contiguous()  # copies: N' x C x H x W
        labels = None if self.labels is None else self.labels.index_select(0, idx)
        return ImageTensors(images, labels, self.classes, self.name)

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and standard deviation over all pixels, in ``[0, 1]`` units, for normalisation.

        Computed in chunks with float64 sums (exact for uint8 data of any realistic size), so a memory-mapped
        dataset is streamed rather than loaded whole. The standard deviation is the population one (ddof 0).

        Returns:
            ``(mean, std)``, each a list of C floats.
        """
        c = self.channels
        total = torch.zeros(c, dtype=torch.float64)
        total_sq = torch.zeros(c, dtype=torch.float64)
        for chunk in self.iter_chunks():  # chunk: B x C x H x W uint8
            x = chunk.to(torch.float64)
            total += x.sum(dim=(0, 2, 3))
            total_sq += x.square().sum(dim=(0, 2, 3))
        count = float(len(self) * self.images.shape[2] * self.images.shape[3])
        if count == 0:
            raise DataError(f"{self.name} has no images, so it has no channel statistics; use a non-empty dataset")
        mean = total / count
        var = (total_sq / count - mean.square()).clamp_min(0.0)
        return [float(m) / 255.0 for m in mean], [float(s) / 255.0 for s in var.sqrt()]

    def iter_chunks(self, max_elements: int = _CHUNK_ELEMENTS) -> Iterator[torch.Tensor]:
        """Yield ``images`` in consecutive chunks of at most ``max_elements`` elements (at least one image each).

        Args:
            max_elements: the most uint8 elements per chunk. Default 16 Mi.
        """
        per_image = max(1, math.prod(self.images.shape[1:]))
        step = max(1, max_elements // per_image)
        for start in range(0, len(self), step):
            yield self.images[start : start + step]


# --------------------------------------------------------------------------------------------------------------------
# Helpers shared by the readers (private to contrastkit.data).


def _describe(x: object) -> str:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return f"{type(x).__name__} of dtype {x.dtype} and shape {tuple(x.shape)}"
    return type(x).__name__


def tensor_from_numpy(array: np.ndarray) -> torch.Tensor:
    """Wrap ``array`` without copying, also when it is read-only (a ``np.memmap`` opened with mode ``"r"``).

    PyTorch warns about non-writable arrays because an in-place write would fault; callers document that such
    tensors are read-only, so the warning is silenced here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a ``uint8`` ``N x C x H x W`` tensor to ``N x C x size x size`` (antialiased bilinear), chunk by chunk.

    Non-square images are resized on the shorter side and center-cropped. Returns the input when it already has
    the requested size.
    """
    n, c, h, w = images.shape
    if h == size and w == size:
        return images
    scale = size / min(h, w)
    rh, rw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (rh - size) // 2, (rw - size) // 2
    out = torch.empty((n, c, size, size), dtype=torch.uint8)  # N x C x size x size
    per_image = c * max(h * w, rh * rw)
    step = max(1, (_CHUNK_ELEMENTS // 4) // per_image)
    for start in range(0, n, step):
        x = images[start : start + step].to(torch.float32)  # B x C x H x W
        y = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
        y = y[:, :, top : top + size, left : left + size]
        out[start : start + step] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def check_image_size(image_size: object) -> int | None:
    """Validate the ``image_size`` argument (``None`` or an int >= 4)."""
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 4:
        raise DataError(f"image_size must be an integer >= 4 (or None for the native size), got {image_size!r}")
    return int(image_size)


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """Validate an integer option ``low <= value <= high`` and return it as ``int``."""
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer))
    if ok and value >= low and (high is None or value <= high):
        return int(value)
    bound = f">= {low}" if high is None else f"in {low}..{high}"
    raise DataError(f"option {name} must be an integer {bound}, got {value!r}")


def one_line(error: BaseException) -> str:
    """An exception's message on one line (for embedding in a DataError)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def writable_dir(path: Path) -> bool:
    """Whether ``path`` exists or can be created and a file can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def create_npy(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """Create a uint8 ``.npy`` file of ``shape`` at ``path`` and return it memory-mapped for writing.

    The file's blocks are reserved up front (``posix_fallocate``) where the file system supports it, so a full disk
    raises ``OSError`` here instead of a SIGBUS later while writing through the map.
    """
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    if hasattr(os, "posix_fallocate"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
        finally:
            os.close(fd)
    return out


def default_cache_home() -> Path:
    """``$XDG_CACHE_HOME/contrastkit`` or ``~/.cache/contrastkit``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "contrastkit"


def resolve_cache_dir(root: Path, option: str | os.PathLike[str] | None, kind: str) -> Path:
    """The folder for a dataset's derived cache files.

    Args:
        root: the dataset root.
        option: the user's ``cache_dir`` option; when given it must be writable.
        kind: sub-folder name used under the per-user cache, e.g. ``"imagefolder"``.

    Returns:
        ``option`` if given, else ``<root>/.contrastkit-cache`` if writable, else ``$XDG_CACHE_HOME/contrastkit/<kind>``
        (``~/.cache/contrastkit/<kind>``).
    """
    if option is not None:
        path = Path(option).expanduser()
        if not writable_dir(path):
            raise DataError(f"cache_dir {path} is not writable; pass a writable folder as cache_dir")
        return path
    for candidate in (root / CACHE_FOLDER, default_cache_home() / kind):
        if writable_dir(candidate):
            return candidate
    raise DataError(
        f"cannot write the {kind} cache: neither {root / CACHE_FOLDER} nor {default_cache_home() / kind} is writable; "
        "pass a writable folder as cache_dir"
    )


def digest(obj: object) -> str:
    """A short stable hash of a JSON-serialisable object (for cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def prune_cache(cache: Path, slot: str, keep: str) -> None:
    """Delete the files ``<slot>-*`` in ``cache`` that do not start with ``keep`` (caches of older contents)."""
    for path in cache.glob(f"{slot}-*"):
        if not path.name.startswith(keep):
            path.unlink(missing_ok=True)

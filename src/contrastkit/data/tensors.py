"""In-memory image datasets as uint8 tensors: :class:`ImageTensors` and the tensor helpers of the readers.

Every dataset is returned as an :class:`ImageTensors`: all images as one ``uint8`` tensor of shape ``N x C x H x W``
and (when labelled) an ``int64`` label tensor of shape ``N``. Augmentation and normalisation run later, batched on the
training device, so nothing here converts to float except :meth:`ImageTensors.channel_stats` and the resize.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from contrastkit.errors import DataError

__all__ = ["ImageTensors", "IndexLike", "resize_images", "tensor_from_numpy"]

#: What :meth:`ImageTensors.subset` accepts: a slice, a range, a sequence of ints, an int64/bool tensor or array.
IndexLike = Union[slice, range, Sequence[int], torch.Tensor, np.ndarray]

# Elements (bytes of uint8) processed per chunk in chunked loops: 16 Mi elements keeps the float64 temporaries at
# 128 MiB whatever the image size.
_CHUNK_ELEMENTS = 1 << 24

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

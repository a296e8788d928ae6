"""A folder of image files, decoded once with Pillow and cached as a memory-mapped ``.npy`` file.

Layouts (hidden files and folders, whose names start with ``.``, are ignored everywhere):

* ``root/<class>/**/<image>``: labelled; the classes are the sorted sub-folder names (a class folder may be empty and
  may contain nested folders).
* ``root/<image>`` with no sub-folders: unlabelled (labels and classes ``None``).
* ``root/train``, ``root/val``, ``root/test`` (any of them): ``split`` picks one, which then has one of the layouts
  above; the classes are then the class folders of all splits together, so labels agree between splits even when
  a split lacks a class. Without these sub-folders the root itself is the ``train`` split and there is no other.

Image files are those with the extensions in :data:`IMAGE_EXTENSIONS` (any case). Each image is converted to RGB
(or L with ``channels=1``; alpha is dropped, 16-bit greyscale is scaled to 8 bits, 32-bit integer and float images
are refused with a :class:`DataError` naming the file and its mode), resized so that its shorter side is ``image_size`` and center-cropped to
``image_size x image_size`` (bicubic, antialiased; JPEGs are decoded at a reduced scale when much larger). The result
is written as ``<key>.images.npy`` (``N x C x S x S`` uint8), ``<key>.labels.npy`` (``N`` int64, labelled only) and
``<key>.json`` into the cache folder, and read back with ``np.load(mmap_mode="r")``: the returned ``images`` is a
read-only memory map (``memory_mapped`` is ``True``), and later runs with the same folder contents decode nothing.

The cache key hashes the folder's absolute path, the split, ``image_size``, ``channels`` and the sorted list of
image files with their sizes and modification times, so adding, removing, replacing or touching a file makes a new
cache (older caches of the same folder, split, size and channels are then deleted). The images file is written to a
temporary file in the cache folder and renamed into place last, so an interrupted run never leaves a partial cache
(a process killed with SIGKILL can leave a ``.*.tmp`` file behind, which is safe to delete).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from contrastkit.data.cache import create_npy, digest, prune_cache, resolve_cache_dir
from contrastkit.data.options import check_int, one_line
from contrastkit.data.tensors import ImageTensors, tensor_from_numpy
from contrastkit.errors import DataError
from contrastkit.io import atomic_write

__all__ = ["DEFAULT_IMAGE_SIZE", "IMAGE_EXTENSIONS", "SPLITS", "load_imagefolder"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_IMAGE_SIZE = 64
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
_CACHE_VERSION = 2  # 2: 16-bit greyscale scaled to 8 bits instead of clipped
#: Pillow modes of 16-bit greyscale images (scaled to 8 bits on decode)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_BATCH = 512  # files decoded per pool round: bounds the work left running after a decode error

# (path relative to the split folder, size in bytes, mtime in ns, label or -1)
_FileEntry = tuple[str, int, int, int]


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _visible(entries: Iterable[os.DirEntry[str]]) -> list[os.DirEntry[str]]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _walk_images(folder: Path, prefix: str, label: int, seen: set[tuple[int, int]] | None = None) -> list[_FileEntry]:
    """All image files below ``folder`` (recursively, sorted, hidden entries skipped, symlink loops cut)."""
    seen = set() if seen is None else seen
    st = folder.stat()
    if (st.st_dev, st.st_ino) in seen:
        return []
    seen.add((st.st_dev, st.st_ino))
    found: list[_FileEntry] = []
    with os.scandir(folder) as it:
        entries = _visible(it)
    for entry in entries:
        rel = f"{prefix}/{entry.name}"
        if entry.is_dir():
            found.extend(_walk_images(Path(entry.path), rel, label, seen))
        elif entry.is_file() and _is_image(entry.name):
            st = entry.stat()
            found.append((rel, st.st_size, st.st_mtime_ns, label))
    return found


def _class_folders(folder: Path) -> list[str]:
    """The sorted names of the visible sub-folders of ``folder`` (empty if it cannot be listed)."""
    try:
        with os.scandir(folder) as it:
            return [e.name for e in _visible(it) if e.is_dir()]
    except OSError:
        return []


def _scan(folder: Path, all_classes: list[str] | None = None) -> tuple[list[_FileEntry], list[str] | None]:
    """List the images of a split folder: ``(files, classes)``, ``classes`` ``None`` for a flat folder.

    ``all_classes`` (the class folders of all splits together) fixes the label numbering, so that a split that
    lacks a class still numbers the others like the other splits do.
    """
    try:
        with os.scandir(folder) as it:
            entries = _visible(it)
        subdirs = [e for e in entries if e.is_dir()]
        loose = [e for e in entries if e.is_file() and _is_image(e.name)]
        if not subdirs:
            files = []
            for e in loose:
                st = e.stat()
                files.append((e.name, st.st_size, st.st_mtime_ns, -1))
            classes = None
        else:
            if loose:
                raise DataError(
                    f"{folder} has both class folders and loose images (e.g. {loose[0].name}); "
                    "move the loose images into a class folder or remove them"
                )
            classes = all_classes or [d.name for d in subdirs]
            index = {name: i for i, name in enumerate(classes)}
            files = [f for d in subdirs for f in _walk_images(Path(d.path), d.name, index[d.name])]
    except OSError as e:
        raise DataError(f"cannot list images in {folder}: {one_line(e)}; check the path and its permissions") from e
    if not files:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"no images found in {folder} (looked for {exts}); put images or class folders of images there")
    return files, classes


def _split_folder(root: Path, split: str) -> tuple[Path, list[str] | None]:
    """The folder of ``split`` and, with split sub-folders, the sorted union of their class folders."""
    present = [s for s in SPLITS if (root / s).is_dir()]
    if present:
        if split not in present:
            raise DataError(
                f"split '{split}' not found in {root}: it has {', '.join(present)}; use one of those "
                f"or create {root / split}"
            )
        all_classes = sorted({name for s in present for name in _class_folders(root / s)})
        return root / split, all_classes or None
    if split != "train":
        raise DataError(
            f"{root} has no train/val/test sub-folders, so the whole folder is split 'train'; "
            f"use split=train or create {root / split}"
        )
    return root, None


def _eight_bit(img: Image.Image, path: Path) -> Image.Image:
    """``img`` with 8-bit channels: 16-bit greyscale scaled to L (``round(v / 257)``); 32-bit modes refused.

    Pillow's own ``convert("L")`` of a 16-bit image clips every value above 255 (most of a 16-bit image turns
    white), so 16-bit greyscale is scaled here. Pillow opens 16-bit greyscale PNG/TIFF as ``I;16*`` and PGM with a
    maximum value above 255 as ``I`` scaled to 0..65535; other ``I`` (32-bit integer) and ``F`` (float) images have
    no known value range and are refused. 16-bit RGB(A) and LA PNGs already open as 8-bit modes in Pillow.
    """
    if img.mode in _SIXTEEN_BIT_MODES or (img.mode == "I" and img.format == "PPM"):
        pixels = np.asarray(img, dtype=np.float64)  # H x W in [0, 65535]
        return Image.fromarray(np.rint(pixels / 257.0).astype(np.uint8))
    if img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "floating-point"
        raise DataError(f"image {path} has Pillow mode {img.mode} ({kind} pixels of unknown range); save it with "
                        "8- or 16-bit channels (e.g. PNG) or remove it")
    return img


def _decode(path: Path, size: int, mode: str) -> np.ndarray:
    """Decode one image to a ``C x size x size`` uint8 array (resize shorter side, center-crop).

    Any Pillow mode with 8-bit channels, and 16-bit greyscale, is accepted (see :func:`_eight_bit`); alpha is
    dropped, palette and CMYK/YCbCr/LAB images are converted by Pillow."""
    try:
        with Image.open(path) as img:
            img.draft(mode, (size, size))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale if still >= size
            img = _eight_bit(img, path)
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            try:
                img = img.convert(mode)
            except ValueError:  # no direct conversion (e.g. LAB -> L): through RGB
                img = img.convert("RGB").convert(mode)
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) / 2, (h - side) / 2
            img = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
            arr = np.asarray(img, dtype=np.uint8)  # S x S (L) or S x S x 3 (RGB)
    except DataError:
        raise
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise DataError(f"cannot decode image {path}: {one_line(e)}; remove or replace the file") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # C x S x S


def _read_cache(prefix: Path, n: int, shape: tuple[int, int, int], labelled: bool) -> ImageTensors | None:
    """The cached dataset at ``prefix``, or ``None`` when absent or unusable (then it is rebuilt)."""
    images_path = prefix.with_name(prefix.name + ".images.npy")
    if not images_path.is_file():
        return None
    try:
        meta = json.loads(prefix.with_name(prefix.name + ".json").read_text(encoding="utf-8"))
        images = np.load(images_path, mmap_mode="r")
        if images.dtype != np.uint8 or images.shape != (n, *shape):
            return None
        labels = np.load(prefix.with_name(prefix.name + ".labels.npy")) if labelled else None
        if labels is not None and (labels.dtype != np.int64 or labels.shape != (n,)):
            return None
        return ImageTensors(
            tensor_from_numpy(images),
            None if labels is None else tensor_from_numpy(labels),
            meta["classes"],
            meta["name"],
            memory_mapped=True,
        )
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None


def _write_cache(
    prefix: Path, folder: Path, files: list[_FileEntry], meta: dict, size: int, mode: str, workers: int
) -> None:
    n, c = len(files), 1 if mode == "L" else 3

    def write(tmp: Path) -> None:
        out = create_npy(tmp, (n, c, size, size))  # N x C x S x S

        def decode_into(i: int) -> None:
            out[i] = _decode(folder / files[i][0], size, mode)

        if workers <= 1:
            for i in range(n):
                decode_into(i)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:  # Pillow releases the GIL while decoding
                for start in range(0, n, _BATCH):
                    list(pool.map(decode_into, range(start, min(n, start + _BATCH))))
        out.flush()
        out = None  # drop the memory map before the file is renamed into place
        if meta["classes"] is not None:
            labels = np.array([f[3] for f in files], dtype=np.int64)  # N
            atomic_write(prefix.with_name(prefix.name + ".labels.npy"), lambda p: _save_npy(p, labels))
        atomic_write(
            prefix.with_name(prefix.name + ".json"),
            lambda p: p.write_text(json.dumps(meta, indent=1), encoding="utf-8"),
        )

    atomic_write(prefix.with_name(prefix.name + ".images.npy"), write)  # renamed into place last


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:  # a file object, so np.save does not append ".npy" to the temporary name
        np.save(f, array)


def load_imagefolder(
    root: Path | None,
    split: str = "train",
    image_size: int | None = None,
    *,
    channels: int = 3,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
) -> ImageTensors:
    """Load a folder of images (see the module docstring for layouts and caching).

    Args:
        root: the dataset folder (required).
        split: ``"train"``, ``"val"`` or ``"test"``; the latter two need a sub-folder of that name. Default
            ``"train"``.
        image_size: side S of the square output images. Default 64.
        channels: 3 for RGB (default) or 1 for greyscale (Pillow mode L).
        cache_dir: folder for the decoded cache. Default ``<root>/.contrastkit-cache`` if writable, else
            ``$XDG_CACHE_HOME/contrastkit/imagefolder`` (``~/.cache/contrastkit/imagefolder``).
        workers: decoding threads on a cache miss; 0 or 1 decodes in the calling thread. Default
            ``min(8, os.cpu_count())``.

    Returns:
        images ``N x C x S x S`` uint8 (read-only memory map); labels ``N`` int64 and the class names, or ``None``
        for a flat folder.

    Raises:
        DataError: no root, a missing split, an empty folder, loose images next to class folders, an image that
            cannot be decoded (the message names the file), an unwritable ``cache_dir``.
    """
    if root is None:
        raise DataError("dataset imagefolder needs a folder: pass data.root=PATH (class sub-folders or images)")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is not a folder; pass a folder of images as data.root")
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    if check_int("channels", channels, 1, 3) == 2:
        raise DataError("option channels must be 1 (greyscale) or 3 (RGB), got 2")
    workers = min(8, os.cpu_count() or 1) if workers is None else check_int("workers", workers, 0, 256)
    mode = "L" if channels == 1 else "RGB"

    folder, all_classes = _split_folder(root, split)
    folder = folder.resolve()
    files, classes = _scan(folder, all_classes)
    settings = {"version": _CACHE_VERSION, "folder": str(folder), "split": split, "size": size, "channels": channels}
    slot = digest(settings)
    key = f"{slot}-{digest([settings, files])}"
    cache = resolve_cache_dir(root, cache_dir, "imagefolder")
    prefix = cache / key
    shape = (channels, size, size)

    cached = _read_cache(prefix, len(files), shape, classes is not None)
    if cached is not None:
        return cached
    log.info("decoding %d images from %s into %s", len(files), folder, cache)
    meta = {"name": f"imagefolder/{split}", "classes": classes, "folder": str(folder), "count": len(files)}
    try:
        _write_cache(prefix, folder, files, meta, size, mode, workers)
    except OSError as e:
        raise DataError(
            f"cannot write the image cache in {cache}: {one_line(e)}; free disk space or pass another cache_dir"
        ) from e
    prune_cache(cache, slot, key)
    result = _read_cache(prefix, len(files), shape, classes is not None)
    if result is None:  # only if something removed or rewrote the cache between writing and reading it
        raise DataError(f"the image cache {prefix}.images.npy could not be read back; delete {cache} and retry")
    return result

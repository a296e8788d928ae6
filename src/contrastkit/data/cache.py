"""Derived-file caches of the dataset readers (decoded image folders, STL-10 resizes): where they go, how they are
named and pruned, and how their ``.npy`` files are created (disk space reserved up front); atomic writes use
:func:`contrastkit.io.atomic_write`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from contrastkit.errors import DataError

#: Name of the cache folder created inside a dataset's root (when writable).
CACHE_FOLDER = ".contrastkit-cache"


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

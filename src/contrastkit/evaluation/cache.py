"""A per-checkpoint cache of extracted features.

Extracting features is the expensive part of every offline evaluation (kNN, linear probe, embeddings, plots), so
the features of a checkpoint are computed once and stored beside it::

    <checkpoint>.features/<dataset>-<split>-<kind>.pt          e.g. last.ckpt.features/cifar10-test-backbone.pt
    <checkpoint>.features/<dataset>-<split>-<kind>-aug<i>.pt   augmented pass i (linear probe with --augmented)

Each file holds ``{"key": str, "features": N x D float32 (CPU), "labels": N int64 or None, "classes": list or
None}`` and is read back with ``torch.load(weights_only=True)``. The key records the checkpoint's size and
modification time (``st_mtime_ns``) and everything that determines the features (dataset name, resolved root,
split, image size, dataset options, feature kind, evaluation resize, augmentation); a file whose key differs
from the current one is stale and is recomputed and overwritten. Files are written to a temporary name and
renamed (``os.replace``), so an interrupted run never leaves a half-written cache file. A cache folder that cannot be
written is skipped with a warning (the features are still returned).

The key does not look inside the dataset files: if the images under the same ``data.root`` change, delete the
``.features`` folder (or pass ``cache=False`` / ``--no-cache``).
"""

from __future__ import annotations

import json
import pickle
import re
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from contrastkit.io import atomic_write

CACHE_VERSION = 1


@dataclass
class CachedFeatures:
    """Features of one split as stored in (or computed for) the cache.

    Attributes:
        features: N x D float32 features (CPU when read from the cache; see :func:`cached_features`).
        labels: N int64 labels, or ``None`` for an unlabelled split.
        classes: class names indexed by label, or ``None``.
        from_cache: whether they were read from the cache (``False``: computed now).
    """

    features: Tensor
    labels: Tensor | None
    classes: list[str] | None
    from_cache: bool = False


def cache_dir(checkpoint: str | Path) -> Path:
    """The cache folder of ``checkpoint``: ``<checkpoint>.features`` beside it."""
    p = Path(checkpoint)
    return p.with_name(p.name + ".features")


def checkpoint_stamp(checkpoint: str | Path) -> dict[str, int]:
    """``{"size", "mtime_ns"}`` of the checkpoint file: the part of every cache key that changes with it."""
    st = Path(checkpoint).stat()
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def cache_file(checkpoint: str | Path, dataset: str, split: str, kind: str, suffix: str = "") -> Path:
    """``<checkpoint>.features/<dataset>-<split>-<kind><suffix>.pt`` with unsafe characters replaced by ``_``."""
    name = "-".join(re.sub(r"[^A-Za-z0-9._+]", "_", part) for part in (dataset, split, kind)) + suffix
    return cache_dir(checkpoint) / f"{name}.pt"


def make_key(checkpoint: str | Path, **fields: Any) -> str:
    """The cache key: the checkpoint's stamp, the format version and ``fields``, as canonical JSON."""
    data = {"version": CACHE_VERSION, "checkpoint": checkpoint_stamp(checkpoint), **fields}
    return json.dumps(data, sort_keys=True, default=str)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_cache(path: Path, key: str) -> CachedFeatures | None:
    """The cached features at ``path`` if the file exists, is readable and has exactly ``key``; else ``None``."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError):
        return None  # corrupt or foreign: recompute (and overwrite)
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("features"), Tensor):
        return None
    labels = data.get("labels")
    classes = data.get("classes")
    return CachedFeatures(data["features"], labels if isinstance(labels, Tensor) else None,
                          list(classes) if isinstance(classes, (list, tuple)) else None, from_cache=True)


def write_cache(path: Path, key: str, entry: CachedFeatures) -> None:
    """Store ``entry`` under ``key`` at ``path`` atomically (temporary file + ``os.replace``); warn on failure."""
    payload = {
        "key": key,
        "features": entry.features.detach().to("cpu", torch.float32).contiguous(),
        "labels": None if entry.labels is None else entry.labels.detach().to("cpu", torch.int64).contiguous(),
        "classes": None if entry.classes is None else [str(c) for c in entry.classes],
    }
    try:
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    except OSError as e:
        _warn(f"could not write the feature cache {str(path)!r} ({e.strerror or type(e).__name__}); continuing "
              "without it")


def cached_features(
    path: Path | None,
    key: str,
    compute: Callable[[], CachedFeatures],
) -> CachedFeatures:
    """Read ``path`` if its key matches, else ``compute()`` and store the result there.

    Args:
        path: the cache file (see :func:`cache_file`), or ``None`` to disable caching (always compute).
        key: the full cache key (see :func:`make_key`).
        compute: produces the features on a miss.
    """
    if path is not None:
        hit = read_cache(path, key)
        if hit is not None:
            return hit
    entry = compute()
    entry.from_cache = False
    if path is not None:
        write_cache(path, key, entry)
    return entry

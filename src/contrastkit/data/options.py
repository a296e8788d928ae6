"""Checks of the dataset readers' options and the one-line text of a reader's error."""

from __future__ import annotations

import numpy as np

from contrastkit.errors import DataError


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

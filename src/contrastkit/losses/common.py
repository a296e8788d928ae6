"""Helpers shared by every loss (and by :mod:`contrastkit.models.neighbours`): the shape check of a pair of views and
the numerics rule of the package (similarities in at least float32 with autocast off, so bf16/fp16 training is safe).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch
from torch import Tensor

__all__ = ["at_least_float32", "autocast_disabled", "check_pair"]


def check_pair(z1: Tensor, z2: Tensor) -> None:
    """Raise ValueError (a caller's mistake, not a user's) unless ``z1`` and ``z2`` are 2-D tensors of the same shape
    (two views of N images)."""
    if z1.ndim != 2 or z2.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must both have shape (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}; "
            "pass the projections of the two views of the same N images, flattened to 2-D"
        )


def autocast_disabled(device_type: str) -> ContextManager[Any]:
    """Context that turns autocast off on ``device_type`` (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def at_least_float32(x: Tensor) -> Tensor:
    """Cast half-precision (and integer) tensors to float32; float32 and float64 are kept."""
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.float()

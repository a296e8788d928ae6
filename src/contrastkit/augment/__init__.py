"""Batched, per-sample random augmentations that make contrastive views on the training device.

* :class:`ViewPolicy` / :func:`policy_preset`: what a view is made of (SimCLR, BYOL, weak, (Fashion-)MNIST recipes).
* :class:`ViewGenerator`: uint8 batch -> list of normalised views, vectorised over the batch, on any device.
* :func:`sample_view_params` / :func:`apply_view`: the two halves of one view, for inspecting the drawn parameters.
* :func:`normalize_uint8`: evaluation-time preprocessing.
* :mod:`contrastkit.augment.functional`: the batched per-sample operations themselves.
"""

from contrastkit.augment.functional import sample_crop_boxes
from contrastkit.augment.policy import PRESET_NAMES, ViewPolicy, default_blur_kernel_size, policy_preset
from contrastkit.augment.views import (
    JITTER_BRIGHTNESS,
    JITTER_CONTRAST,
    JITTER_HUE,
    JITTER_SATURATION,
    ViewGenerator,
    ViewParams,
    apply_view,
    normalize_uint8,
    sample_view_params,
)

__all__ = [
    "JITTER_BRIGHTNESS",
    "JITTER_CONTRAST",
    "JITTER_HUE",
    "JITTER_SATURATION",
    "PRESET_NAMES",
    "ViewGenerator",
    "ViewParams",
    "ViewPolicy",
    "apply_view",
    "default_blur_kernel_size",
    "normalize_uint8",
    "policy_preset",
    "sample_crop_boxes",
    "sample_view_params",
]

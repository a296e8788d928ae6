"""Augmentation policies: what one contrastive view is made of.

A :class:`ViewPolicy` describes the random transformation that produces one view of an image, in the SimCLR family
(Chen et al. 2020, https://arxiv.org/abs/2002.05709, Appendix A):

    random resized crop -> horizontal flip -> colour jitter -> grayscale -> Gaussian blur -> solarize -> normalise

BYOL (Grill et al. 2020, https://arxiv.org/abs/2006.07733, Appendix B) uses the same operations with different
probabilities for its two views (asymmetric views), which is why a view generator takes one policy per view.

:func:`policy_preset` builds the published recipes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from contrastkit.errors import ConfigError
from contrastkit.validation import number_in, number_pair

__all__ = ["PRESET_NAMES", "ViewPolicy", "default_blur_kernel_size", "policy_preset"]


def default_blur_kernel_size(crop_size: int) -> int:
    """Blur kernel size used when :attr:`ViewPolicy.blur_kernel_size` is ``None``.

    SimCLR blurs with a kernel of 10% of the image side, made odd: ``radius = (size // 10) // 2``,
    ``kernel = 2 * radius + 1`` (23 for 224 px). We keep at least 3 so that small images are still blurred
    (3 for CIFAR's 32 px and MNIST's 28 px).
    """
    return max(3, 2 * (crop_size // 20) + 1)


@dataclass
class ViewPolicy:
    """The random transformation that makes one view; every random parameter is drawn per sample.

    Ops run in this order (SimCLR/BYOL order); an op whose probability is 0 is skipped entirely.

    Attributes:
        crop_size: Side of the square output view in pixels (default 32). Must be >= 1.
        crop_scale: Range of the crop's area as a fraction of the source image area (default (0.08, 1.0),
            torchvision's ``RandomResizedCrop``). ``0 < min <= max <= 1``.
        crop_ratio: Range of the crop's aspect ratio width/height, sampled log-uniformly (default (3/4, 4/3)).
            ``0 < min <= max``.
        hflip_prob: Probability of a horizontal flip (default 0.5). In [0, 1].
        jitter_prob: Probability of applying colour jitter (default 0.8). In [0, 1].
        brightness: Brightness factor drawn uniformly from [max(0, 1 - b), 1 + b] (default 0.4). >= 0; 0 disables.
        contrast: Contrast factor drawn uniformly from [max(0, 1 - c), 1 + c] (default 0.4). >= 0; 0 disables.
        saturation: Saturation factor drawn uniformly from [max(0, 1 - s), 1 + s] (default 0.2). >= 0; 0 disables.
            No-op for 1-channel images.
        hue: Hue shift drawn uniformly from [-h, h], in turns of the colour wheel (default 0.1). In [0, 0.5];
            0 disables. No-op for 1-channel images.
        grayscale_prob: Probability of converting to grayscale with torchvision's weights (default 0.2). In [0, 1].
            No-op for 1-channel images.
        blur_prob: Probability of a Gaussian blur (default 0.0). In [0, 1].
        blur_sigma: Range of the blur's standard deviation in output pixels, drawn uniformly (default (0.1, 2.0),
            SimCLR). ``0 < min <= max``.
        blur_kernel_size: Odd blur kernel size; ``None`` (default) uses :func:`default_blur_kernel_size`
            (about 10% of ``crop_size`` as SimCLR, at least 3). Odd, in [1, 2 * crop_size - 1] (reflect padding
            needs the half-width to be smaller than the image).
        solarize_prob: Probability of solarizing (default 0.0). In [0, 1].
        solarize_threshold: Pixels ``>= threshold`` (in [0, 1] units) become ``1 - x`` (default 0.5). In [0, 1].
    """

    crop_size: int = 32
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int | None = None
    solarize_prob: float = 0.0
    solarize_threshold: float = 0.5

    def validate(self) -> None:
        """Raise :class:`~contrastkit.errors.ConfigError` naming the first invalid field and its valid range."""
        if not (isinstance(self.crop_size, int) and not isinstance(self.crop_size, bool) and self.crop_size >= 1):
            raise ConfigError(f"ViewPolicy.crop_size must be an integer >= 1, got {self.crop_size!r}")
        number_pair(self.crop_scale, "ViewPolicy.crop_scale", 0.0, 1.0, open_low=True)
        number_pair(self.crop_ratio, "ViewPolicy.crop_ratio", 0.0, math.inf, open_low=True)
        for name in ("hflip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            number_in(getattr(self, name), f"ViewPolicy.{name}", 0.0, 1.0)
        for name in ("brightness", "contrast", "saturation"):
            number_in(getattr(self, name), f"ViewPolicy.{name}", 0.0, math.inf)
        number_in(self.hue, "ViewPolicy.hue", 0.0, 0.5)
        number_pair(self.blur_sigma, "ViewPolicy.blur_sigma", 0.0, math.inf, open_low=True)
        k = self.blur_kernel_size
        if k is not None and not (
            isinstance(k, int) and not isinstance(k, bool) and k % 2 == 1 and 1 <= k <= 2 * self.crop_size - 1
        ):
            raise ConfigError(
                f"ViewPolicy.blur_kernel_size must be None or an odd integer in [1, 2 * crop_size - 1] = "
                f"[1, {2 * self.crop_size - 1}], got {k!r}"
            )
        if self.blur_prob > 0 and self.effective_blur_kernel_size() > 2 * self.crop_size - 1:
            raise ConfigError(
                f"ViewPolicy.blur_kernel_size must be in [1, 2 * crop_size - 1] = [1, {2 * self.crop_size - 1}] when "
                f"blur_prob > 0; the default for crop_size {self.crop_size} is {self.effective_blur_kernel_size()}, "
                "so set blur_kernel_size=1 or blur_prob=0"
            )
        number_in(self.solarize_threshold, "ViewPolicy.solarize_threshold", 0.0, 1.0)

    def effective_blur_kernel_size(self) -> int:
        """The blur kernel size in effect (``blur_kernel_size`` or the SimCLR default for ``crop_size``)."""
        return self.blur_kernel_size if self.blur_kernel_size is not None else default_blur_kernel_size(self.crop_size)


#: Names accepted by :func:`policy_preset`.
PRESET_NAMES: tuple[str, ...] = ("simclr", "byol", "weak", "mnist", "gray")


def policy_preset(name: str, crop_size: int, num_views: int = 2) -> list[ViewPolicy]:
    """Published augmentation recipes, one :class:`ViewPolicy` per view.

    Args:
        name: One of

            * ``"simclr"``: SimCLR's ImageNet recipe (https://arxiv.org/abs/2002.05709, Appendix A), the same
              for every view: crop scale (0.08, 1), flip 0.5, colour jitter with strength s = 1
              (brightness/contrast/saturation 0.8, hue 0.2) with probability 0.8, grayscale 0.2, Gaussian blur
              with probability 0.5 and sigma in (0.1, 2.0), no solarize. SimCLR's CIFAR-10 recipe uses s = 0.5
              (0.4, 0.4, 0.4, 0.1) and no blur: ``dataclasses.replace(p, brightness=0.4, contrast=0.4,
              saturation=0.4, hue=0.1, blur_prob=0.0)``.
            * ``"byol"``: BYOL's asymmetric views (https://arxiv.org/abs/2006.07733, Table 6): crop scale
              (0.08, 1), flip 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) with probability 0.8, grayscale 0.2;
              view 1 blur 1.0, solarize 0.0; view 2 blur 0.1, solarize 0.2. With more than two views, even
              views (0, 2, ...) use view 1's policy and odd views view 2's.
            * ``"weak"``: crop scale (0.2, 1) (MoCo v2's range, https://arxiv.org/abs/2003.04297) and flip 0.5;
              no colour ops. For evaluation-time augmentation or as a weak teacher view.
            * ``"mnist"`` / ``"gray"`` (aliases): 1-channel 28 px data such as (Fashion-)MNIST. Crop scale (0.2, 1)
              (a 0.08 crop of 28 px is about 8x8 px, too little content), flip 0.5 (set ``hflip_prob=0`` for
              digits, whose meaning changes when mirrored), brightness/contrast jitter 0.4 with probability 0.8;
              no saturation, hue, grayscale, blur or solarize (no colour, and little resolution to blur).
        crop_size: Output side in pixels for every view.
        num_views: Number of views (default 2). >= 1.

    Returns:
        ``num_views`` validated policies (fresh objects, safe to modify with :func:`dataclasses.replace`).
    """
    if not (isinstance(num_views, int) and not isinstance(num_views, bool) and num_views >= 1):
        raise ConfigError(f"num_views must be an integer >= 1, got {num_views!r}")
    key = name.lower() if isinstance(name, str) else name
    if key == "simclr":
        base = [
            ViewPolicy(
                crop_size=crop_size,
                brightness=0.8,
                contrast=0.8,
                saturation=0.8,
                hue=0.2,
                blur_prob=0.5,
            )
        ]
    elif key == "byol":
        view1 = ViewPolicy(crop_size=crop_size, blur_prob=1.0, solarize_prob=0.0)
        base = [view1, replace(view1, blur_prob=0.1, solarize_prob=0.2)]
    elif key == "weak":
        base = [
            ViewPolicy(
                crop_size=crop_size,
                crop_scale=(0.2, 1.0),
                jitter_prob=0.0,
                brightness=0.0,
                contrast=0.0,
                saturation=0.0,
                hue=0.0,
                grayscale_prob=0.0,
            )
        ]
    elif key in ("mnist", "gray"):
        base = [
            ViewPolicy(
                crop_size=crop_size,
                crop_scale=(0.2, 1.0),
                brightness=0.4,
                contrast=0.4,
                saturation=0.0,
                hue=0.0,
                grayscale_prob=0.0,
            )
        ]
    else:
        raise ConfigError(f"unknown augmentation preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    policies = [replace(base[i % len(base)]) for i in range(num_views)]
    for policy in policies:
        policy.validate()
    return policies

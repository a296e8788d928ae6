"""Batched image operations with one parameter per sample.

Every function takes a float batch ``x`` (``BxCxHxW``, values in [0, 1]) and per-sample parameters as tensors with
a leading batch dimension on ``x``'s device, and is vectorised over the batch (no Python loop over samples, no
host synchronisation). The colour operations reproduce ``torchvision.transforms.v2.functional`` for float images
(same grayscale weights and clamping; hue through an equivalent branch-free HSV formula), so a sample's result
matches torchvision's for the same parameter up to float rounding (tested in ``tests/test_augment.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GRAY_WEIGHTS",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "crop_flip_theta",
    "channel_stats",
    "gaussian_blur",
    "gaussian_kernels",
    "resized_crop_flip",
    "rgb_to_grayscale",
    "sample_crop_boxes",
    "select",
    "solarize",
]

#: Luma weights of torchvision's ``rgb_to_grayscale`` (ITU-R 601-2 luma, 0.299 rounded to 0.2989 as torchvision).
GRAY_WEIGHTS: tuple[float, float, float] = (0.2989, 0.587, 0.114)


def _per_sample(value: Tensor) -> Tensor:
    """B -> Bx1x1x1, for broadcasting a per-sample scalar over CxHxW."""
    return value.reshape(-1, 1, 1, 1)


# --------------------------------------------------------------------------------------------------------------------
# Random resized crop + flip


def sample_crop_boxes(
    batch_size: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    max_tries: int = 10,
) -> Tensor:
    """Sample crop boxes like ``torchvision.transforms.RandomResizedCrop.get_params``, for a whole batch at once.

    For each sample, up to ``max_tries`` candidates are drawn (all at once): area fraction uniform in ``scale``,
    aspect ratio (width / height) log-uniform in ``ratio``, width and height rounded to whole pixels. The first
    candidate that fits in the image is used, at a uniformly random integer position. A sample without a fitting
    candidate gets torchvision's fallback: the largest centred crop whose ratio is clamped into ``ratio``.

    Args:
        batch_size: Number of boxes B.
        height: Source image height H.
        width: Source image width W.
        scale: (min, max) crop area as a fraction of H * W.
        ratio: (min, max) aspect ratio width / height.
        generator: Random generator on ``device`` (default: torch's global generator for that device).
        device: Device of the result (default: the generator's device, else CPU).
        max_tries: Candidates per sample before the fallback (10 as torchvision).

    Returns:
        Bx4 int64 tensor of ``(top, left, crop_height, crop_width)`` in source pixels; the box covers rows
        ``top .. top + crop_height - 1`` and columns ``left .. left + crop_width - 1``.
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    u = torch.rand(batch_size, 2 * max_tries + 2, generator=generator, device=device)  # Bx(2T+2)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[:, :max_tries])  # BxT
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, max_tries : 2 * max_tries])  # BxT
    w = torch.round(torch.sqrt(target_area * aspect)).long()  # BxT
    h = torch.round(torch.sqrt(target_area / aspect)).long()  # BxT
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # BxT
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # Bx1, index of the first fitting try (0 if none)
    found = fits.any(dim=1)  # B

    # torchvision's fallback (Python ints: it depends only on the image size and the ratio range).
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fb_w, fb_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fb_w, fb_h = int(round(height * ratio[1])), height
    else:
        fb_w, fb_h = width, height

    crop_h = torch.where(found, h.gather(1, first).squeeze(1), fb_h)  # B
    crop_w = torch.where(found, w.gather(1, first).squeeze(1), fb_w)  # B
    # Uniform integer in [0, H - h] (torch.randint has no per-element upper bound); clamp guards float rounding.
    top = torch.minimum((u[:, -2] * (height - crop_h + 1)).long(), height - crop_h)
    left = torch.minimum((u[:, -1] * (width - crop_w + 1)).long(), width - crop_w)
    top = torch.where(found, top, (height - fb_h) // 2)
    left = torch.where(found, left, (width - fb_w) // 2)
    return torch.stack((top, left, crop_h, crop_w), dim=1)


def crop_flip_theta(boxes: Tensor, flip: Tensor | None, height: int, width: int, dtype: torch.dtype) -> Tensor:
    """Affine matrices for ``F.affine_grid(..., align_corners=False)`` that map the output onto each crop box.

    In normalised coordinates ([-1, 1] spans the image's outer pixel edges), the box ``(top, left, h, w)`` has
    centre ``((2 * left + w) / W - 1, (2 * top + h) / H - 1)`` and half-extent ``(w / W, h / H)``. A horizontal flip
    negates the x scale: the output is mirrored about the box centre at no extra cost.

    Args:
        boxes: Bx4 int64 ``(top, left, h, w)`` from :func:`sample_crop_boxes`.
        flip: B bool, True to mirror that sample horizontally; ``None`` for no flips.
        height: Source height H.
        width: Source width W.
        dtype: Float dtype of the result (the image's working dtype).

    Returns:
        Bx2x3 ``theta``.
    """
    top, left, h, w = boxes.to(dtype).unbind(dim=1)  # B each
    sx = w / width
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    zeros = torch.zeros_like(sx)
    row_x = torch.stack((sx, zeros, (2 * left + w) / width - 1), dim=1)  # Bx3
    row_y = torch.stack((zeros, h / height, (2 * top + h) / height - 1), dim=1)  # Bx3
    return torch.stack((row_x, row_y), dim=1)  # Bx2x3


def resized_crop_flip(x: Tensor, boxes: Tensor, flip: Tensor | None, size: int) -> Tensor:
    """Crop each sample to its box, resize bilinearly to ``size`` x ``size`` and optionally mirror it.

    One ``grid_sample`` call for the whole batch, with the horizontal flip folded into the per-sample affine map
    (:func:`crop_flip_theta`). Sampling points are output pixel centres (half-pixel convention, as
    ``F.interpolate(mode="bilinear", align_corners=False)`` and torchvision's resize) and the box's edge pixels are
    replicated (as if the box had been cut out first), so an upsampled box matches
    ``torchvision.transforms.v2.functional.resized_crop``. There is no antialiasing: when a box is larger than
    ``size`` (downsampling), the result equals torchvision's with ``antialias=False`` (torchvision v2 antialiases
    by default). This matters only for crops shrunk by well over 2x; SimCLR-style crops of 32 px CIFAR or 28 px
    MNIST images to the same size are never shrunk.

    Args:
        x: BxCxHxW float.
        boxes: Bx4 int64 ``(top, left, h, w)``.
        flip: B bool or ``None``.
        size: Output side.

    Returns:
        BxCxSxS float, S = ``size``.
    """
    b, c, height, width = x.shape
    theta = crop_flip_theta(boxes, flip, height, width, x.dtype)  # Bx2x3
    # The matrices are axis-aligned (no rotation or shear), so the grid is separable: x depends only on the output
    # column and y only on the row. Building it from theta's entries gives exactly F.affine_grid(theta, ...,
    # align_corners=False) while costing 2*B*S multiply-adds instead of a BxS^2x3 @ 3x2 batched matmul.
    base = torch.linspace(-1.0 + 1.0 / size, 1.0 - 1.0 / size, size, dtype=x.dtype, device=x.device)  # S
    gx = theta[:, 0, 0:1] * base + theta[:, 0, 2:3]  # BxS, column centres in normalised source coordinates
    gy = theta[:, 1, 1:2] * base + theta[:, 1, 2:3]  # BxS, row centres
    # Replicate the box's own edge pixels (crop-then-resize semantics) instead of blending in the pixels just
    # outside the box: clamp sampling points to the centres of the box's first and last pixels.
    top, left, h, w = boxes.to(x.dtype).unbind(dim=1)  # B each
    gx = torch.clamp(gx, min=((2 * left + 1) / width - 1)[:, None], max=((2 * (left + w) - 1) / width - 1)[:, None])
    gy = torch.clamp(gy, min=((2 * top + 1) / height - 1)[:, None], max=((2 * (top + h) - 1) / height - 1)[:, None])
    grid = torch.stack((gx[:, None, :].expand(b, size, size), gy[:, :, None].expand(b, size, size)), dim=3)  # BxSxSx2
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)  # BxCxSxS


# --------------------------------------------------------------------------------------------------------------------
# Colour


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """Bx3xHxW -> Bx1xHxW luma with torchvision's weights :data:`GRAY_WEIGHTS` (1-channel input is returned as is)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)  # BxHxW each
    gray = r.mul(GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])  # BxHxW
    return gray.unsqueeze(1)  # Bx1xHxW


# The colour ops take ``inplace``: False (default) leaves x untouched; True overwrites x (which must not be needed
# afterwards) and saves allocating a full-size result. Fresh multi-megabyte CPU allocations are costly (the pages
# are mapped and zeroed by the kernel on first touch), so the view pipeline works in place on its own buffer.


def adjust_brightness(x: Tensor, factor: Tensor, *, inplace: bool = False) -> Tensor:
    """Per-sample ``clamp(factor * x, 0, 1)``; x: BxCxHxW, factor: B. As torchvision's ``adjust_brightness``."""
    y = x if inplace else x.clone()
    return y.mul_(_per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor, *, inplace: bool = False) -> Tensor:
    """Per-sample blend with the image's mean luma: ``clamp(f * x + (1 - f) * mean, 0, 1)``; factor: B.

    The mean is over the whole grayscale image (over all pixels for 1 channel), as torchvision's
    ``adjust_contrast``.
    """
    f = _per_sample(factor)  # Bx1x1x1
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # Bx1x1x1
    y = x if inplace else x.clone()
    return y.mul_(f).add_(mean.mul_(1.0 - f)).clamp_(0.0, 1.0)


def adjust_saturation(x: Tensor, factor: Tensor, *, inplace: bool = False) -> Tensor:
    """Per-sample blend with each pixel's luma: ``clamp(f * x + (1 - f) * gray, 0, 1)``; factor: B.

    No-op for 1-channel images (as torchvision).
    """
    if x.shape[1] == 1:
        return x if inplace else x.clone()
    f = _per_sample(factor)  # Bx1x1x1
    gray = rgb_to_grayscale(x).mul_(1.0 - f)  # Bx1xHxW
    y = x if inplace else x.clone()
    return y.mul_(f).add_(gray).clamp_(0.0, 1.0)


def adjust_hue(x: Tensor, shift: Tensor, *, inplace: bool = False) -> Tensor:
    """Per-sample rotation of the hue in HSV space by ``shift`` turns (in [-0.5, 0.5]); x: Bx3xHxW, shift: B.

    Same result as torchvision's ``adjust_hue`` (RGB -> HSV, ``h = (h + shift) mod 1``, HSV -> RGB), computed
    without materialising S and V: a hue rotation keeps each pixel's max and min channel, so the output is
    ``min + (max - min) * pure(h)`` where ``pure`` is the fully saturated colour of hue h (in sixths of a turn):
    R = |h - 3| - 1, G = 2 - |h - 2|, B = 2 - |h - 4|, each clamped to [0, 1]. No-op for 1-channel images.

    Only float arithmetic is used per pixel (no boolean masks or ``torch.where``): on CPU, data-dependent selects
    are several times slower than arithmetic. Which channel is the max is found with ``1 - sign(max - c)``; where
    two channels tie for the max, the sector formulas agree, so the choice does not matter.
    """
    if x.shape[1] == 1:
        return x if inplace else x.clone()
    r, g, b = x.unbind(dim=1)  # BxHxW each
    maxc = torch.maximum(r, g)  # BxHxW
    maxc = torch.maximum(maxc, b, out=maxc)
    minc = torch.minimum(r, g)  # BxHxW
    minc = torch.minimum(minc, b, out=minc)
    delta = maxc - minc  # BxHxW
    # One-hot sector weights by the max channel (R first, then G, as torchvision); 0/1 floats.
    w_r = torch.sign(maxc - r).neg_().add_(1.0)  # BxHxW
    w_g = torch.sign(maxc - g).neg_().add_(1.0).mul_(1.0 - w_r)  # BxHxW
    w_b = 1.0 - w_r - w_g  # BxHxW
    # Hue in sixths of a turn: sector offset (0, 2, 4) plus position in the sector. For a gray pixel
    # (delta == 0) the numerator is 0 and the output is min whatever the hue; the floor avoids 0 / 0.
    hue6 = (g - b).mul_(w_r).add_((b - r).mul_(w_g)).add_((r - g).mul_(w_b))  # BxHxW numerator
    hue6 = hue6.div_(delta.clamp(min=torch.finfo(x.dtype).tiny)).add_(w_g, alpha=2.0).add_(w_b, alpha=4.0)  # in [-1, 5]
    hue6 = hue6.add_(shift.view(-1, 1, 1), alpha=6.0)  # in [-4, 8)
    hue6 = hue6.sub_(torch.floor(hue6 * (1.0 / 6.0)), alpha=6.0)  # mod 6; pure() is continuous at the 0/6 wrap
    y = x if inplace else torch.empty_like(x)  # x's values are no longer needed (r, g, b are consumed above)
    torch.sub(hue6, 3.0, out=y[:, 0]).abs_().sub_(1.0)
    torch.sub(hue6, 2.0, out=y[:, 1]).abs_().neg_().add_(2.0)
    torch.sub(hue6, 4.0, out=y[:, 2]).abs_().neg_().add_(2.0)
    return y.clamp_(0.0, 1.0).mul_(delta.unsqueeze(1)).add_(minc.unsqueeze(1))  # Bx3xHxW


# --------------------------------------------------------------------------------------------------------------------
# Blur and solarize


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """Normalised 1-D Gaussian kernels, one per sample: sigma B -> Bxk (torchvision's kernel for each sigma)."""
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, dtype=sigma.dtype, device=sigma.device)  # k
    weights = torch.exp(-0.5 * (t / sigma.unsqueeze(1)) ** 2)  # Bxk
    return weights / weights.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma and reflect padding (as torchvision's ``gaussian_blur``).

    The batch is folded into the channel dimension (1 x B*C x H x W) so that one depthwise ``conv2d`` per axis
    (``groups = B*C``) applies every sample's own kernel.

    Args:
        x: BxCxHxW float.
        sigma: B, standard deviation in pixels (same for both axes).
        kernel_size: Odd kernel side k, with k // 2 < min(H, W).

    Returns:
        BxCxHxW float.
    """
    b, c, height, width = x.shape
    kern = gaussian_kernels(sigma.to(x.dtype), kernel_size).repeat_interleave(c, dim=0)  # (B*C)xk
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, b * c, height, width), (pad, pad, pad, pad), mode="reflect")  # 1x(B*C)x(H+2p)x(W+2p)
    y = F.conv2d(y, kern.view(b * c, 1, 1, kernel_size), groups=b * c)  # 1x(B*C)x(H+2p)xW
    y = F.conv2d(y, kern.view(b * c, 1, kernel_size, 1), groups=b * c)  # 1x(B*C)xHxW
    return y.view(b, c, height, width)


def solarize(
    x: Tensor, threshold: float | Tensor, selected: Tensor | None = None, *, inplace: bool = False
) -> Tensor:
    """``x >= threshold -> 1 - x`` (as torchvision's ``solarize`` for float images).

    Args:
        x: BxCxHxW float.
        threshold: A float, or B per-sample thresholds.
        selected: Optional B bool; samples where it is False are returned exactly unchanged.
        inplace: Overwrite x (default False).

    The per-pixel test is float arithmetic, ``step = 1 - relu(sign(threshold - x))`` (1 where x >= threshold),
    and the result ``x + step * (1 - 2x)``: exact where step is 0, within one rounding of ``1 - x`` elsewhere.
    """
    if isinstance(threshold, Tensor):
        threshold = _per_sample(threshold)
    step = torch.sub(threshold, x).sign_().clamp_(min=0.0).neg_().add_(1.0)  # BxCxHxW, 0/1
    if selected is not None:
        step = step.mul_(_per_sample(selected.to(x.dtype)))
    step = step.mul_(x.mul(-2.0).add_(1.0))  # BxCxHxW: step * (1 - 2x)
    return x.add_(step) if inplace else x + step


def select(selected: Tensor, a: Tensor, b: Tensor, *, inplace: bool = False) -> Tensor:
    """Per-sample choice: ``a`` where ``selected`` (B bool), else ``b``; the same as ``torch.where`` broadcast.

    Computed as ``torch.lerp(b, a, weight)`` with 0/1 weights, which on CPU is several times faster than
    ``torch.where``. ``lerp`` evaluates ``b + w * (a - b)`` for ``w < 0.5`` and ``a - (a - b) * (1 - w)`` otherwise,
    so both choices are exact for finite inputs. ``inplace=True`` writes the result into ``b``.
    """
    weight = _per_sample(selected.to(b.dtype))  # Bx1x1x1
    return b.lerp_(a, weight) if inplace else torch.lerp(b, a, weight)


def channel_stats(
    mean: Sequence[float], std: Sequence[float], device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """1xCx1x1 mean and std tensors on ``device``, cached so that no host-to-device copy happens per batch."""
    return _channel_stats(tuple(float(m) for m in mean), tuple(float(s) for s in std), torch.device(device), dtype)


_STATS_CACHE: dict[tuple[object, ...], tuple[Tensor, Tensor]] = {}


def _channel_stats(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    key = (mean, std, device, dtype)
    stats = _STATS_CACHE.get(key)
    if stats is None:
        if len(_STATS_CACHE) > 64:
            _STATS_CACHE.clear()
        stats = (
            torch.tensor(mean, dtype=dtype, device=device).view(1, -1, 1, 1),
            torch.tensor(std, dtype=dtype, device=device).view(1, -1, 1, 1),
        )
        _STATS_CACHE[key] = stats
    return stats

"""Procedural, labelled, deterministic images for tests and smoke runs.

Each image shows one shape on a noisy background. The class is the shape's outline and fill pattern, which are
invariant to the usual contrastive augmentations (horizontal flip, crop-and-resize, colour jitter, grey-scale):

* outline (``label % 5``): circle, or a star-like blob with 3, 4, 5 or 6 rounded lobes;
* fill (``label // 5``): solid, bullseye (outer ring + centre dot), 3 pie sectors, 2 concentric rings.

Everything else is random per image (a nuisance the representation should ignore): centre position, radius,
rotation, foreground and background colour (the shape is lighter or darker than the background), a smooth
low-frequency background field and per-pixel noise. So raw pixels are a poor representation (a raw-pixel cosine
1-NN classifier gets far below 90% with the defaults) while the classes remain well separated for a network that
learns shape.

Images are rendered with torch in chunks from a seeded ``torch.Generator``: the same options always give the same
tensors (on any machine, as everything is drawn on the CPU), and ``train`` and ``test`` use different derived seeds.
"""

from __future__ import annotations

import math

import torch

from contrastkit.data.options import check_int
from contrastkit.data.tensors import ImageTensors
from contrastkit.errors import DataError

__all__ = ["FILLS", "MAX_CLASSES", "SHAPES", "SPLITS", "load_synthetic", "render"]

SPLITS = ("train", "test")
SHAPES = ("circle", "3-lobe", "4-lobe", "5-lobe", "6-lobe")
FILLS = ("solid", "bullseye", "sectors", "rings")
MAX_CLASSES = len(SHAPES) * len(FILLS)
_DEFAULT_N = {"train": 2048, "test": 512}
_LOBE_DEPTH = 0.35  # relative radius modulation of the lobed outlines
_EDGE = 0.6  # softness (pixels) of the shape's edge, for antialiasing
_SHARP = 8.0  # sharpness of the fill patterns' stripes
_NOISE = 0.05  # standard deviation of the per-pixel noise, in [0, 1] units


def _uniform(g: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def render(labels: torch.Tensor, size: int, channels: int, g: torch.Generator, nuisance: float = 1.0) -> torch.Tensor:
    """Render one image per label (labels in ``0..MAX_CLASSES-1``).

    Args:
        labels: ``B`` int64 class indices.
        size: image side S.
        channels: 1 or 3.
        g: random generator (consumed in a fixed order, so the output is deterministic for a generator state).
        nuisance: in [0, 1], scales the per-image nuisances (position and size ranges, contrast-polarity swaps,
            colour offsets, background field, noise) around their mid values. Default 1 (full difficulty).

    Returns:
        ``B x C x S x S`` uint8 images.
    """
    b = len(labels)
    # Per-image nuisance parameters, each B.
    k = float(nuisance)

    def around(mid: float, half: float) -> torch.Tensor:  # uniform in mid +- half * nuisance, B
        return _uniform(g, b, mid - half * k, mid + half * k)

    cx = around(0.5, 0.2) * size
    cy = around(0.5, 0.2) * size
    radius = around(0.29, 0.09) * size
    angle = _uniform(g, b, 0.0, 2 * math.pi)
    bg_lum = around(0.3, 0.2)
    fg_lum = bg_lum + around(0.4, 0.1)
    swap = torch.rand(b, generator=g) < 0.5 * k  # (with k = 1) half the shapes darker than their background
    bg_lum, fg_lum = torch.where(swap, fg_lum, bg_lum), torch.where(swap, bg_lum, fg_lum)
    bg = bg_lum[:, None] + k * _uniform(g, b * channels, -0.2, 0.2).view(b, channels) * (channels > 1)  # B x C
    fg = fg_lum[:, None] + k * _uniform(g, b * channels, -0.2, 0.2).view(b, channels) * (channels > 1)  # B x C
    field = torch.randn(b, channels, 4, 4, generator=g) * (0.08 * k)  # B x C x 4 x 4, smooth background variation
    noise = torch.rand(b, channels, size, size, generator=g)  # B x C x S x S, uniform, scaled below

    # Polar coordinates of every pixel centre around each shape's centre: B x S x S.
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dy = coords.view(1, size, 1) - cy.view(b, 1, 1)
    dx = coords.view(1, 1, size) - cx.view(b, 1, 1)
    r = torch.sqrt(dx.square() + dy.square())
    phi = torch.atan2(dy, dx)

    shape, fill = labels % len(SHAPES), labels // len(SHAPES)  # B, B
    lobes = torch.where(shape == 0, 0, shape + 2).float().view(b, 1, 1)  # 0 (circle), 3, 4, 5, 6
    depth = torch.where(shape == 0, 0.0, _LOBE_DEPTH).view(b, 1, 1)
    rot = angle.view(b, 1, 1)
    outline = radius.view(b, 1, 1) * (1 + depth * torch.cos(lobes * (phi - rot))) / (1 + depth)  # B x S x S
    inside = torch.sigmoid((outline - r) / _EDGE)
    depth_in = 1 - (r / outline).clamp(max=1.0)  # 0 at the outline, 1 at the centre

    pattern = torch.ones_like(r)  # B x S x S; fill 0 (solid) stays 1
    for kind in range(1, len(FILLS)):
        sel = (fill == kind).nonzero().flatten()
        if sel.numel() == 0:
            continue
        if kind == 1:  # bullseye: outer ring and centre dot
            wave = torch.cos(2 * math.pi * depth_in[sel])
        elif kind == 2:  # three pie sectors
            wave = torch.cos(3 * (phi[sel] - rot[sel]))
        else:  # two concentric rings and a centre dot
            wave = torch.cos(4 * math.pi * depth_in[sel])
        pattern[sel] = torch.sigmoid(_SHARP * wave)
    alpha = (inside * pattern).unsqueeze(1)  # B x 1 x S x S

    # Smooth background: a 4 x 4 random field upsampled (separable linear interpolation) to S x S.
    ramp = torch.nn.functional.interpolate(torch.eye(4).unsqueeze(0), size=size, mode="linear")[0].T  # S x 4
    background = ramp @ (field + bg.view(b, channels, 1, 1)) @ ramp.T  # B x C x S x S (rows of ramp sum to 1)
    # Blend in 0..255 units: background + alpha * (fg - background) + uniform noise of std ~0.05 * 255.
    image = torch.lerp(background, fg.view(b, channels, 1, 1).expand_as(background), alpha)
    image = image.mul_(255).add_(noise.sub_(0.5).mul_(k * _NOISE * 255 * math.sqrt(12)))
    return image.round_().clamp_(0, 255).to(torch.uint8)


def load_synthetic(
    split: str = "train",
    image_size: int | None = None,
    *,
    n: int | None = None,
    channels: int = 3,
    num_classes: int = 10,
    seed: int = 0,
    nuisance: float = 1.0,
) -> ImageTensors:
    """Generate a synthetic split (see the module docstring).

    Args:
        split: ``"train"`` or ``"test"``. Default ``"train"``.
        image_size: side S of the square images. Default 32 (at least 16 is advisable to keep the shapes legible).
        n: number of images. Default 2048 for ``train``, 512 for ``test``.
        channels: 3 (RGB, default) or 1 (grey).
        num_classes: number of classes, 1..20: class ``k`` has outline ``SHAPES[k % 5]`` and fill
            ``FILLS[k // 5]``. Default 10 (5 outlines x {solid, bullseye}).
        seed: base seed (an int >= 0). Default 0. The split's generator is seeded with ``2 * seed`` (train) or
            ``2 * seed + 1`` (test).
        nuisance: difficulty in [0, 1]: scales the random position/size/polarity/colour/background/noise
            nuisances (see :func:`render`); rotation stays random. Default 1. Lower values (e.g. 0.25) give a
            task that a short self-supervised run learns, used by the training tests.

    Returns:
        images ``n x C x S x S`` uint8, labels ``n`` int64 balanced over the classes (counts differ by at most one,
        in random order), class names such as ``"4-lobe/bullseye"``.
    """
    size = 32 if image_size is None else image_size
    n = _DEFAULT_N[split] if n is None else check_int("n", n, 1)
    channels = check_int("channels", channels, 1, 3)
    if channels == 2:
        raise DataError("option channels must be 1 (greyscale) or 3 (RGB), got 2")
    num_classes = check_int("num_classes", num_classes, 1, MAX_CLASSES)
    seed = check_int("seed", seed, 0, 2**62)
    if isinstance(nuisance, bool) or not isinstance(nuisance, (int, float)) or not 0 <= nuisance <= 1:
        raise DataError(f"option nuisance must be a number in [0, 1], got {nuisance!r}")

    g = torch.Generator().manual_seed(2 * seed + SPLITS.index(split))
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]  # n, balanced
    images = torch.empty((n, channels, size, size), dtype=torch.uint8)  # n x C x S x S
    chunk = max(64, (1 << 20) // (size * size))
    for start in range(0, n, chunk):
        images[start : start + chunk] = render(labels[start : start + chunk], size, channels, g, float(nuisance))
    classes = [f"{SHAPES[k % len(SHAPES)]}/{FILLS[k // len(SHAPES)]}" for k in range(num_classes)]
    return ImageTensors(images, labels, classes, f"synthetic/{split}")

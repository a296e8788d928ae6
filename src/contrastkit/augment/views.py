"""Batched contrastive view generation on the training device.

:class:`ViewGenerator` turns a uint8 batch into several augmented, normalised views, with every random parameter
drawn per sample and every operation vectorised over the batch (SimCLR, https://arxiv.org/abs/2002.05709; BYOL's
asymmetric views, https://arxiv.org/abs/2006.07733). Sampling (:func:`sample_view_params`) is separate from
application (:func:`apply_view`) so the drawn parameters can be inspected and tested.

Colour jitter order. torchvision's ``ColorJitter`` applies brightness, contrast, saturation and hue in a random
order. Brightness (a scale), contrast (a blend with the image's mean luma) and saturation (a blend with each
pixel's luma) are linear and commute with each other exactly (the luma weights sum to ~1), so up to the clamp to
[0, 1] that torchvision applies after each op their relative order does not matter. Hue does not commute with
contrast and saturation (rotating the hue changes the luma they blend towards). We therefore draw a random
permutation per sample, as torchvision, and apply it as: the linear ops that precede hue (in the fixed order
brightness, contrast, saturation), then hue, then the linear ops that follow it (same fixed order). Which ops
precede hue is distributed exactly as with torchvision's shuffle; only the relative order of two linear ops on the
same side of hue is fixed, which differs from torchvision only where an intermediate clamp bites. This costs three
extra cheap linear passes and no extra hue conversion. :attr:`ViewParams.jitter_order` records the order used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from contrastkit.augment import functional as AF
from contrastkit.augment.policy import ViewPolicy
from contrastkit.errors import ConfigError

__all__ = [
    "JITTER_BRIGHTNESS",
    "JITTER_CONTRAST",
    "JITTER_HUE",
    "JITTER_SATURATION",
    "ViewGenerator",
    "ViewParams",
    "apply_view",
    "normalize_uint8",
    "sample_view_params",
]

#: Indices of the colour-jitter components in :attr:`ViewParams.jitter_factors` and ``jitter_order``.
JITTER_BRIGHTNESS, JITTER_CONTRAST, JITTER_SATURATION, JITTER_HUE = 0, 1, 2, 3


@dataclass(frozen=True)
class ViewParams:
    """The random parameters of one view for a batch; every tensor has a leading batch dimension B.

    A field is ``None`` when its op is disabled by the policy (probability 0, or a colour op on 1-channel images).

    Attributes:
        boxes: Bx4 int64 ``(top, left, height, width)`` crop boxes in source pixels.
        flip: B bool, horizontal flip.
        jitter: B bool, colour jitter applied.
        jitter_factors: Bx4 float brightness, contrast, saturation factors and hue shift (drawn for every sample;
            used only where ``jitter``; 1, 1, 1, 0 for components disabled by the policy).
        jitter_order: Bx4 int64, the jitter components (``JITTER_*`` indices) in the order they are applied.
        grayscale: B bool, converted to grayscale.
        blur: B bool, blurred.
        blur_sigma: B float, blur standard deviation in output pixels (used only where ``blur``).
        solarize: B bool, solarized.
    """

    boxes: Tensor
    flip: Tensor | None = None
    jitter: Tensor | None = None
    jitter_factors: Tensor | None = None
    jitter_order: Tensor | None = None
    grayscale: Tensor | None = None
    blur: Tensor | None = None
    blur_sigma: Tensor | None = None
    solarize: Tensor | None = None


def _bernoulli(p: float, batch_size: int, generator: torch.Generator | None, device: torch.device) -> Tensor | None:
    """B bool mask with P(True) = p, or None when p == 0 (op skipped, nothing drawn)."""
    if p <= 0.0:
        return None
    return torch.rand(batch_size, generator=generator, device=device) < p


def _active_jitter(policy: ViewPolicy, channels: int) -> tuple[bool, bool, bool, bool]:
    """Which of brightness, contrast, saturation, hue are on for this policy and channel count."""
    color = channels != 1
    return policy.brightness > 0, policy.contrast > 0, color and policy.saturation > 0, color and policy.hue > 0


def sample_view_params(
    policy: ViewPolicy,
    batch_size: int,
    height: int,
    width: int,
    channels: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> ViewParams:
    """Draw the random parameters of one view for a batch (all on ``device``, no host synchronisation).

    Args:
        policy: The view's policy (assumed valid; see :meth:`ViewPolicy.validate`).
        batch_size: B.
        height: Source image height.
        width: Source image width.
        channels: Source channel count (1 disables saturation, hue and grayscale).
        generator: Random generator on ``device`` (default: torch's global generator for the device).
        device: Device of the parameters (default: the generator's device, else CPU).

    Returns:
        The :class:`ViewParams`; the same generator state gives the same parameters.
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    boxes = AF.sample_crop_boxes(
        batch_size, height, width, policy.crop_scale, policy.crop_ratio, generator=generator, device=device
    )  # Bx4
    flip = _bernoulli(policy.hflip_prob, batch_size, generator, device)  # B

    jitter = jitter_factors = jitter_order = None
    active = _active_jitter(policy, channels)
    if any(active):
        jitter = _bernoulli(policy.jitter_prob, batch_size, generator, device)
    if jitter is not None:
        u = torch.rand(batch_size, 4, generator=generator, device=device)  # Bx4
        lows, spans = [], []
        for strength, on in zip((policy.brightness, policy.contrast, policy.saturation), active[:3]):
            low = max(0.0, 1.0 - strength) if on else 1.0
            lows.append(low)
            spans.append((1.0 + strength - low) if on else 0.0)
        lows.append(-policy.hue if active[3] else 0.0)
        spans.append(2.0 * policy.hue if active[3] else 0.0)
        # Column by column with Python scalars: no host-to-device copy of the ranges.
        jitter_factors = torch.stack([low + span * u[:, i] for i, (low, span) in enumerate(zip(lows, spans))], 1)
        identity = torch.arange(4, device=device).expand(batch_size, 4)  # Bx4
        if active[3]:
            # Random permutation per sample (sort keys); linear ops before hue keep their canonical order, then
            # hue, then the linear ops after hue (module docstring explains why this is faithful).
            keys = torch.rand(batch_size, 4, generator=generator, device=device)  # Bx4
            before_hue = keys < keys[:, JITTER_HUE : JITTER_HUE + 1]  # Bx4 (False for hue itself)
            group = torch.where(before_hue, 0, 2)
            group[:, JITTER_HUE] = 1
            jitter_order = torch.argsort(group * 4 + identity, dim=1)  # Bx4
        else:
            jitter_order = identity.clone()

    grayscale = _bernoulli(policy.grayscale_prob, batch_size, generator, device) if channels != 1 else None
    blur = _bernoulli(policy.blur_prob, batch_size, generator, device)
    blur_sigma = None
    if blur is not None:
        lo, hi = policy.blur_sigma
        blur_sigma = lo + (hi - lo) * torch.rand(batch_size, generator=generator, device=device)  # B
    solarize = _bernoulli(policy.solarize_prob, batch_size, generator, device)
    return ViewParams(boxes, flip, jitter, jitter_factors, jitter_order, grayscale, blur, blur_sigma, solarize)


def _linear_jitter(x: Tensor, factors: Tensor, use: Tensor | None, active: tuple[bool, bool, bool, bool]) -> Tensor:
    """Brightness, contrast, saturation in this order, in place on x; factors Bx4; ``use`` Bx3 bool selects the
    samples for which each op runs here (identity factor elsewhere: ``clamp(1 * x)``, ``1 * x + 0 * m`` return x
    exactly for x in [0, 1])."""
    ops = (AF.adjust_brightness, AF.adjust_contrast, AF.adjust_saturation)
    for index, op in enumerate(ops):
        if not active[index]:
            continue
        factor = factors[:, index]  # B
        if use is not None:
            factor = torch.where(use[:, index], factor, torch.ones_like(factor))
        x = op(x, factor, inplace=True)
    return x


def _color_jitter(x: Tensor, params: ViewParams, active: tuple[bool, bool, bool, bool]) -> Tensor:
    """Jittered copy of x (BxCxHxW in [0, 1]) for every sample; the caller selects the jittered samples."""
    assert params.jitter_factors is not None and params.jitter_order is not None
    factors = params.jitter_factors  # Bx4
    y = x.clone()
    if active[JITTER_HUE]:
        position = torch.argsort(params.jitter_order, dim=1)  # Bx4: step at which each op runs
        before = position[:, :3] < position[:, JITTER_HUE : JITTER_HUE + 1]  # Bx3
        y = _linear_jitter(y, factors, before, active)
        y = AF.adjust_hue(y, factors[:, JITTER_HUE], inplace=True)
        y = _linear_jitter(y, factors, ~before, active)
    else:
        y = _linear_jitter(y, factors, None, active)
    return y


def apply_view(x: Tensor, policy: ViewPolicy, params: ViewParams) -> Tensor:
    """Apply one view's sampled parameters to a float batch.

    Order: resized crop + flip, colour jitter, grayscale, Gaussian blur, solarize. A sample not selected for an op
    is passed through that op exactly unchanged (per-sample select), and an op disabled in ``params`` is skipped.

    Args:
        x: BxCxHxW float in [0, 1] (the source images; not modified).
        policy: The policy that produced ``params`` (for crop size, jitter ranges, kernel size, threshold).
        params: From :func:`sample_view_params` for this batch.

    Returns:
        BxCxSxS float in [0, 1], S = ``policy.crop_size`` (not normalised), a new tensor.
    """
    # Augmentation runs in x's dtype even inside a mixed-precision region (autocast would turn conv2d outputs into
    # half precision mid-pipeline).
    with torch.autocast(x.device.type, enabled=False):
        return _apply_view(x, policy, params)


def _apply_view(x: Tensor, policy: ViewPolicy, params: ViewParams) -> Tensor:
    channels = x.shape[1]
    y = AF.resized_crop_flip(x, params.boxes, params.flip, policy.crop_size)  # BxCxSxS, new: modified in place
    if params.jitter is not None:
        y = AF.select(params.jitter, _color_jitter(y, params, _active_jitter(policy, channels)), y, inplace=True)
    if params.grayscale is not None and channels != 1:
        y = AF.select(params.grayscale, AF.rgb_to_grayscale(y).expand_as(y), y, inplace=True)
    if params.blur is not None and params.blur_sigma is not None:
        blurred = AF.gaussian_blur(y, params.blur_sigma, policy.effective_blur_kernel_size())  # BxCxSxS
        y = AF.select(params.blur, blurred, y, inplace=True)
    if params.solarize is not None:
        y = AF.solarize(y, policy.solarize_threshold, params.solarize, inplace=True)
    return y


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    try:
        mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    except (TypeError, ValueError):
        raise ConfigError(f"mean and std must be sequences of numbers, got mean={mean!r}, std={std!r}") from None
    if not mean_t or len(mean_t) != len(std_t):
        raise ConfigError(
            f"mean and std must have one value per channel (same non-zero length), got {len(mean_t)} and {len(std_t)}"
        )
    if not all(s > 0 and s < float("inf") for s in std_t) or not all(abs(m) < float("inf") for m in mean_t):
        raise ConfigError(f"std must be finite and > 0 and mean finite, got mean={mean_t}, std={std_t}")
    return mean_t, std_t


def _check_images(images: Tensor, num_stats: int) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must be a BxCxHxW batch, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"images must be uint8 (0..255) or float (0..1), got dtype {images.dtype}")
    if images.shape[1] != num_stats:
        raise ConfigError(
            f"mean/std have {num_stats} values but the images have {images.shape[1]} channels; give one per channel"
        )


def _to_unit_float(images: Tensor, num_stats: int) -> Tensor:
    """uint8 BxCxHxW -> float32 in [0, 1]; a float batch is taken as already in [0, 1] (kept in its dtype)."""
    _check_images(images, num_stats)
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images


def normalize_uint8(images: Tensor, mean: Sequence[float], std: Sequence[float], size: int | None = None) -> Tensor:
    """Evaluation-time preprocessing: ``(images / 255 - mean) / std`` per channel, optionally resized first.

    The one uint8 -> normalised float path of evaluation (feature extraction, the online linear probe); the
    training views normalise the same way after augmenting (:class:`ViewGenerator`).

    Args:
        images: uint8 BxCxHxW on any device (a float batch in [0, 1] is accepted and kept in its dtype).
        mean: C per-channel means in [0, 1] pixel units.
        std: C per-channel standard deviations in [0, 1] pixel units, > 0.
        size: resize the [0, 1] images to ``size x size`` (bilinear, antialiased) before normalising, when they
            have another size. Default None (keep H x W).

    Returns:
        float32 BxCxHxW (BxCxsizexsize) on the images' device.
    """
    mean_t, std_t = _check_stats(mean, std)
    x = _to_unit_float(images, len(mean_t))
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=True)
    m, s = AF.channel_stats(mean_t, std_t, x.device, x.dtype)  # 1xCx1x1 each
    if x is images:
        return (x - m) / s
    return x.sub_(m).div_(s)


class ViewGenerator(torch.nn.Module):
    """Make several augmented, normalised views of a uint8 batch on its own device.

    Every random parameter is drawn per sample from ``generator`` (or torch's global generator for the images'
    device), so the same generator state gives the same views. The module has no parameters or buffers: it runs
    on whatever device the images are on.

    Args:
        policies: One :class:`ViewPolicy` per view; the number of policies is the number of views. Views may
            differ (BYOL's asymmetric views, multi-crop sizes). Each is validated.
        mean: C per-channel means in [0, 1] pixel units, e.g. ``(0.4914, 0.4822, 0.4465)`` for CIFAR-10.
        std: C per-channel standard deviations in [0, 1] pixel units, > 0.

    Example:
        >>> gen = ViewGenerator(policy_preset("simclr", 32), mean=(0.5,) * 3, std=(0.25,) * 3)
        >>> v1, v2 = gen(images_uint8, generator=torch.Generator(images_uint8.device).manual_seed(0))
    """

    def __init__(self, policies: Sequence[ViewPolicy], mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.policies: list[ViewPolicy] = list(policies)
        if not self.policies:
            raise ConfigError("policies must contain at least one ViewPolicy (one per view), got none")
        for policy in self.policies:
            if not isinstance(policy, ViewPolicy):
                raise ConfigError(f"policies must be ViewPolicy objects, got {type(policy).__name__}")
            policy.validate()
        self.mean, self.std = _check_stats(mean, std)

    @property
    def num_views(self) -> int:
        return len(self.policies)

    def sample_params(self, images: Tensor, generator: torch.Generator | None = None) -> list[ViewParams]:
        """Draw the parameters of every view for ``images`` (BxCxHxW), one :class:`ViewParams` per view."""
        _check_images(images, len(self.mean))
        b, c, h, w = images.shape
        if generator is not None and generator.device.type != images.device.type:
            raise ValueError(f"generator is on {generator.device} but the images are on {images.device}")
        return [
            sample_view_params(policy, b, h, w, c, generator=generator, device=images.device)
            for policy in self.policies
        ]

    def apply(self, images: Tensor, params: Sequence[ViewParams]) -> list[Tensor]:
        """Apply previously drawn ``params`` (from :meth:`sample_params`) and normalise."""
        x = _to_unit_float(images, len(self.mean))  # BxCxHxW in [0, 1]
        m, s = AF.channel_stats(self.mean, self.std, x.device, x.dtype)  # 1xCx1x1 each
        return [apply_view(x, policy, p).sub_(m).div_(s) for policy, p in zip(self.policies, params)]

    @torch.no_grad()
    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """Views of a batch.

        Args:
            images: uint8 BxCxHxW on any device (a float batch in [0, 1] is also accepted and kept in its dtype).
            generator: Random generator on the images' device; ``None`` uses torch's global generator.

        Returns:
            One float tensor per view, B x C x crop_size x crop_size, normalised with ``mean`` and ``std``.
        """
        _check_images(images, len(self.mean))
        return self.apply(images, self.sample_params(images, generator))

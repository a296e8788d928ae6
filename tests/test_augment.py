"""Tests for contrastkit.augment: batched per-sample view generation, checked against torchvision's references."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as TF2
from torchvision.transforms import RandomResizedCrop

from contrastkit.augment import (
    ViewGenerator,
    ViewPolicy,
    apply_view,
    default_blur_kernel_size,
    normalize_uint8,
    policy_preset,
    sample_crop_boxes,
    sample_view_params,
)
from contrastkit.augment import functional as AF
from contrastkit.errors import ConfigError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# A policy that does nothing but a full-image crop: the baseline the single-op policies below start from.
IDENTITY = ViewPolicy(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    hflip_prob=0.0,
    jitter_prob=0.0,
    grayscale_prob=0.0,
    blur_prob=0.0,
    solarize_prob=0.0,
)


def _images(b: int, c: int, h: int, w: int | None = None, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w or h), generator=g, dtype=torch.uint8).to(device)


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0


def _identity_gen(policy: ViewPolicy, channels: int) -> ViewGenerator:
    """Generator whose normalisation is the identity, so outputs are in [0, 1] pixel units."""
    return ViewGenerator([policy], mean=(0.0,) * channels, std=(1.0,) * channels)


def _changed(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """B bool: sample differs from the reference anywhere."""
    return (out != ref).flatten(1).any(dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# Shapes, dtypes, devices, determinism


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("channels", "size", "crops"), [(1, 28, (28, 16)), (3, 32, (32, 24, 40))])
def test_output_shapes_dtypes_devices(device: str, channels: int, size: int, crops: tuple[int, ...]) -> None:
    policies = [replace(policy_preset("byol", c)[i % 2], blur_prob=0.5, solarize_prob=0.5) for i, c in enumerate(crops)]
    gen = ViewGenerator(policies, mean=(0.5,) * channels, std=(0.25,) * channels)
    views = gen(_images(6, channels, size, device=device), generator=_gen(0, device))
    assert len(views) == len(crops)
    for view, crop in zip(views, crops):
        assert view.shape == (6, channels, crop, crop)
        assert view.dtype == torch.float32
        assert view.device.type == device
        assert torch.isfinite(view).all()
        # Normalised values of [0, 1] pixels with mean 0.5, std 0.25 lie in [-2, 2].
        assert view.min() >= -2.0 - 1e-5 and view.max() <= 2.0 + 1e-5


def test_float_input_keeps_dtype_and_matches_uint8() -> None:
    images = _images(4, 3, 16)
    gen = ViewGenerator(policy_preset("simclr", 16), mean=(0.5,) * 3, std=(0.25,) * 3)
    from_uint8 = gen(images, generator=_gen(3))
    from_float = gen(_unit(images), generator=_gen(3))
    for a, b in zip(from_uint8, from_float):
        torch.testing.assert_close(a, b)
    assert gen(_unit(images).double(), generator=_gen(3))[0].dtype == torch.float64


def test_global_rng_and_inputs_untouched() -> None:
    images = _unit(_images(4, 3, 16))
    before = images.clone()
    gen = ViewGenerator(policy_preset("byol", 16), mean=(0.5,) * 3, std=(0.25,) * 3)
    torch.manual_seed(5)
    a = gen(images)
    torch.manual_seed(5)
    b = gen(images)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(images, before)  # the pipeline works in place only on its own buffers


def test_autocast_region_does_not_change_the_views() -> None:
    images = _images(4, 3, 16)
    gen = ViewGenerator(policy_preset("byol", 16), mean=(0.5,) * 3, std=(0.25,) * 3)
    plain = gen(images, generator=_gen(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = gen(images, generator=_gen(0))
    for a, b in zip(plain, mixed):
        assert b.dtype == torch.float32
        assert torch.equal(a, b)


def test_same_seed_same_views_other_seed_differs() -> None:
    images = _images(8, 3, 32)
    gen = ViewGenerator(policy_preset("byol", 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    a = gen(images, generator=_gen(1))
    b = gen(images, generator=_gen(1))
    c = gen(images, generator=_gen(2))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    assert not torch.equal(a[0], a[1])  # two views of the same batch are different


# ---------------------------------------------------------------------------------------------------------------------
# Crop and flip


@pytest.mark.parametrize("channels", [1, 3])
def test_full_crop_reproduces_normalised_input(channels: int) -> None:
    images = _images(5, channels, 20)
    mean, std = (0.3,) * channels, (0.2,) * channels
    out = ViewGenerator([replace(IDENTITY, crop_size=20)], mean, std)(images, generator=_gen(0))[0]
    expected = normalize_uint8(images, mean, std)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(expected, (_unit(images) - 0.3) / 0.2)
    # Other output sizes: the whole image bilinearly resized (half-pixel centres, edge replication).
    for size in (13, 32):
        out = ViewGenerator([replace(IDENTITY, crop_size=size)], mean, std)(images, generator=_gen(0))[0]
        resized = F.interpolate(_unit(images), size=(size, size), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out, (resized - 0.3) / 0.2, atol=1e-5, rtol=0)


def test_flip_is_exact_mirror_and_only_for_flipped_samples() -> None:
    images = _images(64, 3, 12)
    x = _unit(images)
    always = _identity_gen(replace(IDENTITY, crop_size=12, hflip_prob=1.0), 3)(images, generator=_gen(0))[0]
    torch.testing.assert_close(always, torch.flip(x, dims=[3]), atol=1e-6, rtol=0)

    policy = replace(IDENTITY, crop_size=12, hflip_prob=0.5)
    params = sample_view_params(policy, 64, 12, 12, 3, generator=_gen(5))
    out = apply_view(x, policy, params)
    mirrored = (out - torch.flip(x, dims=[3])).abs().flatten(1).amax(dim=1) < 1e-6  # B
    same = (out - x).abs().flatten(1).amax(dim=1) < 1e-6  # B
    assert torch.equal(mirrored, params.flip) and torch.equal(same, ~params.flip)
    assert 10 < int(params.flip.sum()) < 54


def test_flip_of_a_partial_crop_mirrors_the_crop() -> None:
    x = _unit(_images(16, 3, 24))
    policy = replace(IDENTITY, crop_size=24, crop_scale=(0.3, 0.6), crop_ratio=(0.75, 1.33))
    params = sample_view_params(policy, 16, 24, 24, 3, generator=_gen(2))
    plain = apply_view(x, policy, params)
    flipped = apply_view(x, policy, replace(params, flip=torch.ones(16, dtype=torch.bool)))
    torch.testing.assert_close(flipped, torch.flip(plain, dims=[3]), atol=1e-5, rtol=0)


def test_crop_matches_torchvision_resized_crop_per_sample() -> None:
    x = _unit(_images(12, 3, 32, 28))
    policy = replace(IDENTITY, crop_size=32, crop_scale=(0.08, 0.8), crop_ratio=(0.75, 1.33))
    params = sample_view_params(policy, 12, 32, 28, 3, generator=_gen(4))
    out = apply_view(x, policy, params)
    for i, (top, left, h, w) in enumerate(params.boxes.tolist()):
        # These boxes are all smaller than the output (upsampling), where antialiasing changes nothing.
        assert h <= 32 and w <= 32
        ref = TF2.resized_crop(x[i], top, left, h, w, [32, 32], antialias=True)
        torch.testing.assert_close(out[i], ref, atol=2e-5, rtol=0)


def test_crop_boxes_fall_in_configured_ranges() -> None:
    scale, ratio = (0.1, 0.6), (0.5, 2.0)
    boxes = sample_crop_boxes(4000, 400, 300, scale, ratio, generator=_gen(0))  # Bx4
    assert boxes.shape == (4000, 4) and boxes.dtype == torch.int64
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 400).all() and (left + w <= 300).all()
    frac = (h * w).double() / (400 * 300)
    aspect = w.double() / h.double()
    # Whole-pixel rounding moves the area and ratio by at most ~1% for boxes this large.
    assert frac.min() >= scale[0] * 0.99 and frac.max() <= scale[1] * 1.01
    assert aspect.min() >= ratio[0] * 0.99 and aspect.max() <= ratio[1] * 1.01
    # The ranges are covered, not just respected: both ends are reached and the middle is populated.
    assert frac.min() < 0.11 and frac.max() > 0.59
    assert aspect.min() < 0.55 and aspect.max() > 1.8
    assert abs(float(aspect.log().mean())) < 0.05  # log-uniform ratio is symmetric around 1 here


def test_crop_box_distribution_matches_torchvision_with_rejections() -> None:
    # On a 32x20 image with wide ratios many candidates do not fit, so the first-fitting-try logic matters.
    scale, ratio = (0.08, 1.0), (0.3, 3.0)
    boxes = sample_crop_boxes(3000, 32, 20, scale, ratio, generator=_gen(1)).double()
    torch.manual_seed(0)
    ref = torch.tensor(
        [RandomResizedCrop.get_params(torch.empty(1, 32, 20), list(scale), list(ratio)) for _ in range(3000)]
    ).double()
    for column in range(4):  # top, left, height, width
        assert abs(boxes[:, column].mean() - ref[:, column].mean()) < 0.6, column
        assert abs(boxes[:, column].std() - ref[:, column].std()) < 0.6, column


def test_crop_box_fallback_is_torchvisions_centre_crop() -> None:
    # No candidate of area 100% and ratio 1 fits a 24x32 image: torchvision falls back to a centred crop with the
    # ratio clamped into the range (here 24x24 at column 4).
    boxes = sample_crop_boxes(7, 24, 32, (1.0, 1.0), (1.0, 1.0), generator=_gen(0))
    assert boxes.tolist() == [[0, 4, 24, 24]] * 7
    boxes = sample_crop_boxes(3, 10, 40, (1.0, 1.0), (0.5, 2.0), generator=_gen(0))
    assert boxes.tolist() == [[0, 10, 10, 20]] * 3


# ---------------------------------------------------------------------------------------------------------------------
# Colour operations against torchvision


def test_grayscale_matches_torchvision() -> None:
    x = _unit(_images(6, 3, 10))
    torch.testing.assert_close(AF.rgb_to_grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    out = _identity_gen(replace(IDENTITY, crop_size=10, grayscale_prob=1.0), 3)(x, generator=_gen(0))[0]
    torch.testing.assert_close(out, TF.rgb_to_grayscale(x, num_output_channels=3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    ("name", "ours", "reference", "factors"),
    [
        ("brightness", AF.adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4, 0.0]),
        ("contrast", AF.adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4, 0.0]),
        ("saturation", AF.adjust_saturation, TF.adjust_saturation, [0.2, 1.0, 1.8, 0.0]),
        ("hue", AF.adjust_hue, TF.adjust_hue, [-0.5, -0.1, 0.0, 0.37]),
    ],
)
def test_jitter_ops_match_torchvision_per_sample(name, ours, reference, factors, channels: int) -> None:
    x = _unit(_images(len(factors), channels, 9, seed=7))
    x[0, :, 0, :] = 0.5  # a gray row (undefined hue), and a saturated red pixel
    if channels == 3:
        x[1, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    out = ours(x, torch.tensor(factors))
    assert out.shape == x.shape
    for i, f in enumerate(factors):
        torch.testing.assert_close(out[i], reference(x[i], f), atol=1e-5, rtol=0, msg=f"{name} factor {f}")


def test_jitter_applies_sampled_factors_in_sampled_order_like_torchvision() -> None:
    # Values in [0.3, 0.6] and mild factors keep every intermediate result inside [0, 1] (no clamping), so any
    # difference would come from the factors or the order; hue does not commute with contrast and saturation.
    g = torch.Generator().manual_seed(11)
    x = 0.3 + 0.3 * torch.rand(32, 3, 8, 8, generator=g)
    policy = replace(IDENTITY, crop_size=8, jitter_prob=1.0, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.15)
    params = sample_view_params(policy, 32, 8, 8, 3, generator=_gen(3))
    out = apply_view(x, policy, params)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    wrong_order_differs = 0
    for i in range(32):
        order, factors = params.jitter_order[i].tolist(), params.jitter_factors[i].tolist()
        assert sorted(order) == [0, 1, 2, 3]
        ref = x[i]
        for op in order:
            ref = ops[op](ref, factors[op])
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
        canonical = x[i]
        for op in range(4):
            canonical = ops[op](canonical, factors[op])
        wrong_order_differs += int((canonical - ref).abs().max() > 1e-4)
    assert wrong_order_differs > 8  # the test can tell orders apart
    # Factor ranges.
    f = params.jitter_factors
    assert (f[:, :3] >= 0.8).all() and (f[:, :3] <= 1.2).all() and (f[:, 3].abs() <= 0.15).all()


def test_jitter_factor_ranges() -> None:
    policy = replace(IDENTITY, jitter_prob=1.0, brightness=1.5, contrast=0.3, saturation=0.0, hue=0.05)
    f = sample_view_params(policy, 4000, 8, 8, 3, generator=_gen(0)).jitter_factors  # Bx4
    lo = torch.tensor([0.0, 0.7, 1.0, -0.05])
    hi = torch.tensor([2.5, 1.3, 1.0, 0.05])
    assert (f >= lo).all() and (f <= hi).all()
    # Uniform over the range: min and max close to the ends (brightness clipped at 0, not 1 - 1.5 = -0.5).
    torch.testing.assert_close(f.amin(0), lo, atol=0.01, rtol=0)
    torch.testing.assert_close(f.amax(0), hi, atol=0.01, rtol=0)
    torch.testing.assert_close(f.mean(0), (lo + hi) / 2, atol=0.03, rtol=0)


def test_jitter_order_is_random_per_sample() -> None:
    policy = replace(IDENTITY, jitter_prob=1.0)
    order = sample_view_params(policy, 4000, 8, 8, 3, generator=_gen(0)).jitter_order  # Bx4
    hue_position = (order == 3).long().argmax(dim=1)
    counts = torch.bincount(hue_position, minlength=4).double() / 4000
    assert ((counts - 0.25).abs() < 0.03).all(), counts  # hue uniformly at any of the 4 steps
    position = torch.argsort(order, dim=1)
    contrast_first = (position[:, 1] < position[:, 3]).double().mean()
    both_first = ((position[:, 1] < position[:, 3]) & (position[:, 2] < position[:, 3])).double().mean()
    assert abs(contrast_first - 0.5) < 0.03 and abs(both_first - 1 / 3) < 0.03
    # Without hue (or on 1 channel) the order is the canonical one.
    for pol, channels in ((replace(policy, hue=0.0), 3), (policy, 1)):
        fixed = sample_view_params(pol, 5, 8, 8, channels, generator=_gen(0)).jitter_order
        assert fixed.tolist() == [[0, 1, 2, 3]] * 5


def test_color_ops_are_noops_on_one_channel() -> None:
    images = _images(32, 1, 12)
    policy = replace(IDENTITY, crop_size=12, jitter_prob=1.0, brightness=0.0, contrast=0.0, grayscale_prob=1.0)
    out = _identity_gen(policy, 1)(images, generator=_gen(0))[0]
    torch.testing.assert_close(out, _unit(images), atol=1e-6, rtol=0)
    # ...while brightness still works on one channel.
    out = _identity_gen(replace(policy, brightness=0.5), 1)(images, generator=_gen(0))[0]
    assert _changed(out, _unit(images)).all()


@pytest.mark.parametrize(("kernel_size", "sigmas"), [(3, [0.1, 0.7, 2.0]), (5, [0.5, 1.3]), (9, [3.0, 0.9])])
def test_blur_matches_torchvision(kernel_size: int, sigmas: list[float]) -> None:
    x = _unit(_images(len(sigmas), 3, 16, 13))
    out = AF.gaussian_blur(x, torch.tensor(sigmas), kernel_size)
    for i, s in enumerate(sigmas):
        ref = TF.gaussian_blur(x[i], [kernel_size, kernel_size], [s, s])
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_blur_through_generator_uses_policy_kernel_and_sampled_sigma() -> None:
    x = _unit(_images(8, 3, 16))
    policy = replace(IDENTITY, crop_size=16, blur_prob=1.0, blur_sigma=(0.5, 1.5), blur_kernel_size=5)
    params = sample_view_params(policy, 8, 16, 16, 3, generator=_gen(0))
    out = apply_view(x, policy, params)
    assert ((params.blur_sigma >= 0.5) & (params.blur_sigma <= 1.5)).all()
    for i, s in enumerate(params.blur_sigma.tolist()):
        torch.testing.assert_close(out[i], TF.gaussian_blur(x[i], [5, 5], [s, s]), atol=1e-5, rtol=0)


def test_solarize_matches_torchvision() -> None:
    x = _unit(_images(4, 3, 10))
    for threshold in (0.0, 0.3, 0.5, 1.0):
        torch.testing.assert_close(AF.solarize(x, threshold), TF.solarize(x, threshold))
    policy = replace(IDENTITY, crop_size=10, solarize_prob=1.0, solarize_threshold=0.3)
    out = _identity_gen(policy, 3)(x, generator=_gen(0))[0]
    torch.testing.assert_close(out, TF.solarize(x, 0.3), atol=1e-6, rtol=0)


def test_default_blur_kernel_size_follows_simclr() -> None:
    assert [default_blur_kernel_size(s) for s in (28, 32, 64, 96, 224)] == [3, 3, 7, 9, 23]
    assert ViewPolicy(crop_size=224).effective_blur_kernel_size() == 23
    assert ViewPolicy(crop_size=224, blur_kernel_size=5).effective_blur_kernel_size() == 5


# ---------------------------------------------------------------------------------------------------------------------
# Probabilities: unselected samples are untouched, p=0 never, p=1 always, p in between at the right rate


def _single_op(op: str, p: float) -> ViewPolicy:
    base = replace(IDENTITY, crop_size=6)
    return {
        "flip": replace(base, hflip_prob=p),
        "jitter": replace(base, jitter_prob=p, brightness=0.5, contrast=0.0, saturation=0.0, hue=0.0),
        "grayscale": replace(base, grayscale_prob=p),
        "blur": replace(base, blur_prob=p, blur_sigma=(1.0, 2.0)),
        "solarize": replace(base, solarize_prob=p, solarize_threshold=0.0),
    }[op]


@pytest.mark.parametrize("op", ["flip", "jitter", "grayscale", "blur", "solarize"])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_op_probability(op: str, p: float) -> None:
    n = 2000
    images = _images(n, 3, 6, seed=3)
    images[:, 0] = 0  # no sample is already gray, mirror-symmetric or unchanged by any op
    images[:, 1, :, 0] = 255
    x = _unit(images)
    policy = _single_op(op, p)
    params = sample_view_params(policy, n, 6, 6, 3, generator=_gen(9))
    field = {"flip": "flip", "jitter": "jitter", "grayscale": "grayscale", "blur": "blur"}.get(op, "solarize")
    mask = getattr(params, field)
    out = apply_view(x, policy, params)
    without_op = apply_view(x, policy, replace(params, **{field: None}))
    applied = _changed(out, without_op)
    assert torch.equal(out[~applied], without_op[~applied])  # untouched samples are bit-exact
    if p == 0.0:
        assert mask is None  # skipped entirely, nothing drawn
        assert not applied.any()
    else:
        assert torch.equal(applied, mask)
        assert abs(applied.double().mean() - p) < 0.05
    if op == "grayscale" and p > 0:
        assert (out[applied, 0] == out[applied, 2]).all()


def test_probability_zero_fast_path_draws_nothing() -> None:
    policy = replace(IDENTITY, jitter_prob=0.5, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    params = sample_view_params(policy, 4, 8, 8, 3, generator=_gen(0))
    assert params.flip is None and params.jitter is None and params.grayscale is None
    assert params.blur is None and params.blur_sigma is None and params.solarize is None
    # Only the crop boxes consumed random numbers.
    after_params, after_boxes = _gen(0), _gen(0)
    sample_view_params(policy, 4, 8, 8, 3, generator=after_params)
    sample_crop_boxes(4, 8, 8, policy.crop_scale, policy.crop_ratio, generator=after_boxes)
    assert torch.equal(after_params.get_state(), after_boxes.get_state())


def test_byol_views_are_asymmetric() -> None:
    v1, v2 = policy_preset("byol", 32)
    assert (v1.blur_prob, v1.solarize_prob, v2.blur_prob, v2.solarize_prob) == (1.0, 0.0, 0.1, 0.2)
    x = _unit(_images(500, 3, 32))
    p1 = sample_view_params(v1, 500, 32, 32, 3, generator=_gen(0))
    p2 = sample_view_params(v2, 500, 32, 32, 3, generator=_gen(0))
    assert p1.blur.all() and p1.solarize is None
    assert 0.05 < p2.blur.double().mean() < 0.15 and 0.14 < p2.solarize.double().mean() < 0.26
    assert apply_view(x, v1, p1).shape == (500, 3, 32, 32)


def test_presets() -> None:
    assert len(policy_preset("simclr", 32, num_views=4)) == 4
    simclr = policy_preset("simclr", 32)[0]
    assert (simclr.brightness, simclr.saturation, simclr.hue, simclr.blur_prob) == (0.8, 0.8, 0.2, 0.5)
    weak = policy_preset("weak", 32)[0]
    assert weak.jitter_prob == 0.0 and weak.grayscale_prob == 0.0 and weak.blur_prob == 0.0
    for name in ("mnist", "gray"):
        p = policy_preset(name, 28)[0]
        assert p.crop_scale == (0.2, 1.0) and p.saturation == 0.0 and p.hue == 0.0 and p.grayscale_prob == 0.0
    views = ViewGenerator(policy_preset("mnist", 28), mean=(0.286,), std=(0.353,))(_images(4, 1, 28), _gen(0))
    assert [v.shape for v in views] == [(4, 1, 28, 28)] * 2
    byol4 = policy_preset("byol", 32, num_views=4)
    assert [p.blur_prob for p in byol4] == [1.0, 0.1, 1.0, 0.1]
    byol4[0].blur_prob = 0.3  # fresh objects
    assert policy_preset("byol", 32)[0].blur_prob == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("crop_size", 0),
        ("crop_size", 32.0),
        ("crop_scale", (0.0, 1.0)),
        ("crop_scale", (0.5, 1.2)),
        ("crop_scale", (0.6, 0.5)),
        ("crop_scale", (float("nan"), 1.0)),
        ("crop_ratio", (0.0, 1.0)),
        ("crop_ratio", (2.0, 1.0)),
        ("hflip_prob", -0.1),
        ("jitter_prob", 1.5),
        ("grayscale_prob", float("nan")),
        ("blur_prob", 2),
        ("solarize_prob", -1.0),
        ("brightness", -0.1),
        ("contrast", float("inf")),
        ("saturation", -1),
        ("hue", 0.6),
        ("blur_sigma", (0.0, 1.0)),
        ("blur_sigma", (2.0, 1.0)),
        ("blur_kernel_size", 4),
        ("blur_kernel_size", 0),
        ("blur_kernel_size", 65),
        ("solarize_threshold", 1.5),
    ],
)
def test_invalid_policy_raises_config_error(field: str, value: object) -> None:
    policy = replace(ViewPolicy(), **{field: value})
    with pytest.raises(ConfigError, match=field):
        policy.validate()
    with pytest.raises(ConfigError, match=field):
        ViewGenerator([policy], mean=(0.5,) * 3, std=(0.25,) * 3)


def test_default_blur_kernel_too_large_for_tiny_crop() -> None:
    with pytest.raises(ConfigError, match="blur_kernel_size"):
        ViewPolicy(crop_size=1, blur_prob=0.5).validate()
    ViewPolicy(crop_size=1, blur_prob=0.0).validate()
    ViewPolicy(crop_size=1, blur_prob=0.5, blur_kernel_size=1).validate()


def test_valid_edge_values_are_accepted() -> None:
    ViewPolicy(crop_size=1, crop_scale=(1.0, 1.0), hflip_prob=1.0, hue=0.5, blur_kernel_size=1).validate()
    ViewPolicy(crop_size=32, blur_kernel_size=63, brightness=0.0, solarize_threshold=0.0).validate()


def test_other_config_errors() -> None:
    with pytest.raises(ConfigError, match="preset"):
        policy_preset("moco", 32)
    with pytest.raises(ConfigError, match="num_views"):
        policy_preset("simclr", 32, num_views=0)
    with pytest.raises(ConfigError, match="policies"):
        ViewGenerator([], mean=(0.5,), std=(0.5,))
    with pytest.raises(ConfigError, match="std"):
        ViewGenerator([ViewPolicy()], mean=(0.5, 0.5), std=(0.5,))
    with pytest.raises(ConfigError, match="std"):
        normalize_uint8(_images(1, 1, 4), mean=(0.5,), std=(0.0,))
    with pytest.raises(ConfigError, match="channels"):
        ViewGenerator([ViewPolicy()], mean=(0.5,) * 3, std=(0.5,) * 3)(_images(2, 1, 8))
    with pytest.raises(ValueError, match="BxCxHxW"):
        normalize_uint8(torch.zeros(3, 4, 4, dtype=torch.uint8), mean=(0.5,) * 3, std=(0.5,) * 3)


def test_normalize_uint8() -> None:
    images = _images(3, 3, 5)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    out = normalize_uint8(images, mean, std)
    ref = TF2.normalize(TF2.to_dtype(images, torch.float32, scale=True), list(mean), list(std))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    assert math.isclose(float(normalize_uint8(torch.full((1, 1, 1, 1), 255, dtype=torch.uint8), (0.5,), (0.25,))), 2.0)


def test_separable_grid_equals_affine_grid() -> None:
    # resized_crop_flip builds the sampling grid separably from the same theta; it must equal affine_grid's
    # (up to rounding) wherever the box clamp is inactive, i.e. for boxes upsampled from their interior.
    x = _unit(_images(16, 3, 20, 24))
    boxes = sample_crop_boxes(16, 20, 24, (0.2, 0.9), (0.75, 1.33), generator=_gen(0))
    flip = torch.rand(16, generator=_gen(1)) < 0.5
    theta = AF.crop_flip_theta(boxes, flip, 20, 24, torch.float32)
    grid = F.affine_grid(theta, [16, 3, 12, 12], align_corners=False)
    ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = AF.resized_crop_flip(x, boxes, flip, 12)
    # Away from the border rows/columns (where the box clamp may act) the two agree.
    torch.testing.assert_close(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5, rtol=0)

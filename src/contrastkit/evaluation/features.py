"""Feature extraction from uint8 image tensors with a frozen model."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from contrastkit.augment.views import normalize_uint8
from contrastkit.errors import ConfigError, DataError
from contrastkit.validation import positive_int, resolve_device


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return None


def _stats_arg(values: Sequence[float], name: str, channels: int) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a sequence of {channels} numbers, got {values!r}") from exc
    if len(out) != channels:
        raise ConfigError(f"{name} has {len(out)} values but the images have {channels} channels; give one per channel")
    if any(not math.isfinite(v) or v < 0.0 or v > 1.0 or (name == "std" and v == 0.0) for v in out):
        raise ConfigError(
            f"{name}={values!r} must be on the 0-1 pixel scale (e.g. ImageNet mean (0.485, 0.456, 0.406), "
            "std (0.229, 0.224, 0.225)); std must be > 0"
        )
    return out


def extract_features(
    model: nn.Module,
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 512,
    device: torch.device | str | None = None,
    size: int | None = None,
    progress: bool = False,
) -> Tensor:
    """Features of ``images`` under ``model`` in eval mode, as float32 N x D on ``device``.

    Each batch is moved to ``device``, converted to float in [0, 1] (``/ 255``), resized to ``size`` x ``size``
    (bilinear, antialiased) if ``size`` is given and differs from H x W, normalised per channel with ``mean`` and
    ``std``, and passed through ``model`` under :func:`torch.inference_mode`. The ``training`` flag of every
    submodule is restored afterwards (also if the model raises), so a model that was in train mode, or had some
    submodules frozen in eval mode, comes back exactly as it was. Autocast is the caller's business: wrap the call in
    :func:`torch.autocast` to extract in reduced precision; the outputs are stored as float32 either way.

    Args:
        model: maps a B x C x size x size float batch to B x D features (e.g. a backbone without its head).
            Its parameters must already be on ``device``; it is not moved.
        images: N x C x H x W ``torch.uint8`` tensor on the CPU (or on ``device``). It is only read: a tensor
            backed by a read-only memory map is fine.
        mean: per-channel mean on the 0-1 scale, e.g. ``(0.485, 0.456, 0.406)``.
        std: per-channel standard deviation on the 0-1 scale, all > 0.
        batch_size: images per forward pass (default 512).
        device: where to run (default ``None``: the device of the model's parameters, CPU for a parameterless model).
        size: side of the square input the model sees (default ``None``: keep H x W). E.g. 32 to evaluate STL-10's
            96 px images at a 32 px training crop size.
        progress: show a tqdm progress bar (default ``False``).

    Returns:
        N x D float32 tensor on ``device`` (a normal tensor, usable with autograd afterwards).

    Raises:
        DataError: ``images`` is not a non-empty 4-D uint8 tensor.
        ConfigError: bad ``mean``/``std``/``batch_size``/``size``/``device``, or a model on another device.
        ValueError: a model that does not return a B x D tensor (a programming error, raised with its traceback).
    """
    if not isinstance(images, Tensor):
        raise DataError(f"images must be a torch.Tensor (N x C x H x W, uint8), got {type(images).__name__}")
    if images.dim() != 4:
        raise DataError(f"images must be 4-D (N x C x H x W), got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise DataError(f"images must have dtype torch.uint8 (0-255 pixels), got {images.dtype}")
    n, channels, height, width = images.shape
    if n == 0 or height == 0 or width == 0:
        raise DataError(f"images is empty (shape {tuple(images.shape)}); pass at least one image")
    batch_size = positive_int(batch_size, "batch_size")
    if size is not None:
        size = positive_int(size, "size")
    mean_list = _stats_arg(mean, "mean", channels)
    std_list = _stats_arg(std, "std", channels)

    model_device = _model_device(model)
    dev = resolve_device(device, model_device if model_device is not None else torch.device("cpu"))
    if model_device is not None and model_device != dev:
        raise ConfigError(
            f"the model is on {model_device} but device={dev}; move it with model.to({str(dev)!r}) or pass device=None"
        )

    def preprocess(batch: Tensor) -> Tensor:  # uint8 B x C x H x W -> normalised float B x C x size x size
        return normalize_uint8(batch, mean_list, std_list, size)

    return _forward_in_batches(model, images, dev, batch_size, preprocess, "extracting features", progress)


def extract_augmented_features(
    model: nn.Module,
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    policy: object,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Tensor:
    """Features of one random augmentation of every image, as float32 N x D on ``device``.

    Like :func:`extract_features`, but each batch is first turned into one view with ``policy`` (a
    :class:`~contrastkit.augment.ViewPolicy`, e.g. random resized crop + flip at the training crop size) by the
    batched :class:`~contrastkit.augment.ViewGenerator` on ``device``, with a ``torch.Generator`` on that device
    seeded with ``seed``: the same seed gives the same views on the same device type. The model runs in eval mode
    under :func:`torch.inference_mode`; the ``training`` flags are restored afterwards.

    Args:
        model: maps B x C x s x s views (s = ``policy.crop_size``) to B x D features; already on ``device``.
        images: N x C x H x W ``uint8`` tensor (CPU or ``device``).
        mean, std: per-channel normalisation on the 0-1 scale.
        policy: the :class:`~contrastkit.augment.ViewPolicy` of the view.
        batch_size: images per forward pass (default 512).
        device: where to run (default ``None``: the model's device).
        seed: seed of the augmentation generator (default 0).
        progress: tqdm progress bar (default ``False``).
    """
    from contrastkit.augment import ViewGenerator, ViewPolicy

    if not isinstance(images, Tensor) or images.dim() != 4 or images.dtype != torch.uint8 or images.shape[0] == 0:
        raise DataError("images must be a non-empty N x C x H x W uint8 tensor")
    if not isinstance(policy, ViewPolicy):
        raise ConfigError(f"policy must be a contrastkit.augment.ViewPolicy, got {type(policy).__name__}")
    batch_size = positive_int(batch_size, "batch_size")
    channels = int(images.shape[1])
    mean_list, std_list = _stats_arg(mean, "mean", channels), _stats_arg(std, "std", channels)
    model_device = _model_device(model)
    dev = resolve_device(device, model_device if model_device is not None else torch.device("cpu"))
    if model_device is not None and model_device != dev:
        raise ConfigError(
            f"the model is on {model_device} but device={dev}; move it with model.to({str(dev)!r}) or pass device=None"
        )
    views = ViewGenerator([policy], mean_list, std_list)
    generator = torch.Generator(device=dev).manual_seed(int(seed))
    def preprocess(batch: Tensor) -> Tensor:  # uint8 B x C x H x W -> one augmented, normalised view
        (x,) = views(batch, generator=generator)
        return x

    return _forward_in_batches(model, images, dev, batch_size, preprocess, "extracting augmented features", progress)


def _forward_in_batches(model: nn.Module, images: Tensor, dev: torch.device, batch_size: int,
                        preprocess: Callable[[Tensor], Tensor], desc: str, progress: bool) -> Tensor:
    """Run ``model`` in eval mode under inference mode on ``preprocess(batch)`` for every batch of the uint8
    ``images`` (moved to ``dev``); return the float32 ``N x D`` features and restore each sub-module's mode."""
    n = int(images.shape[0])
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    out: Tensor | None = None
    try:
        with torch.inference_mode(), tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for start in range(0, n, batch_size):
                x = preprocess(images[start : start + batch_size].to(dev, non_blocking=True))  # B x C x s x s
                y = model(x)
                if not isinstance(y, Tensor) or y.dim() != 2 or y.shape[0] != x.shape[0]:
                    got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
                    raise ValueError(  # the model's code, not the user's input, is wrong: keep the traceback
                        f"the model must return a (batch, dim) feature tensor, got {got} for a batch of {x.shape[0]}; "
                        "pass the backbone (ending in global pooling + flatten), not a model returning maps or dicts"
                    )
                if out is None:
                    with torch.inference_mode(False):  # a normal tensor, so callers can use it with autograd
                        out = torch.empty(n, y.shape[1], dtype=torch.float32, device=dev)  # N x D
                out[start : start + y.shape[0]].copy_(y)  # cast to float32
                bar.update(y.shape[0])
    finally:
        for module, training in modes:
            module.training = training
    assert out is not None
    return out

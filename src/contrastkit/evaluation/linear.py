"""Linear probe: a linear classifier trained on frozen, precomputed features.

Protocol: multinomial logistic regression on frozen features with the regularisation chosen on a validation split
carved from the training set and a final retrain on all training data, as in Kornblith et al. 2019 ("Do Better
ImageNet Models Transfer Better?", https://arxiv.org/abs/1805.08974) and the transfer evaluations of SimCLR (Chen et
al. 2020, https://arxiv.org/abs/2002.05709) and BYOL (Grill et al. 2020, https://arxiv.org/abs/2006.07733); optimised
with mini-batch SGD, momentum and a cosine schedule like the ImageNet linear evaluations of SimCLR / MoCo. Details and
differences from solo-learn / lightly: ``docs/evaluation.md``.

1. Standardise features with the mean / std of the training rows in use (``standardize=True``).
2. Hold out a stratified, seeded ``val_fraction`` of the training set. Train one softmax-regression head per
   (lr, weight decay) grid point on the rest: SGD, momentum 0.9, batch 256, cosine schedule per step to 0 without
   warm-up, weight decay on the weights only (not the bias), zero initialisation. All grid points are trained
   together as one wide matrix (one GEMM per step for the whole grid) on the same mini-batch sequence.
3. Pick the grid point with the best final-epoch validation top-1 (the first in grid order, lr-major, on ties).
4. Retrain one head with that lr / weight decay on the full training set (standardised with full-set statistics)
   and evaluate it once on the test set: the final-epoch test top-1 / top-5 are reported, never the best epoch.

The test set plays no part in the choice of hyper-parameters.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from contrastkit.data.splits import stratified_split
from contrastkit.errors import ConfigError, DataError
from contrastkit.validation import (
    features_arg,
    float_grid,
    is_real,
    labels_arg,
    num_classes_arg,
    positive_int,
    resolve_device,
)
from contrastkit.evaluation.metrics import topk_hits

#: Default learning-rate grid, for standardised features, batch 256 and momentum 0.9.
DEFAULT_LRS: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
#: Default weight-decay grid (with N=54k training rows, 1e-5 / 1e-4 / 1e-3 ~ scikit-learn C of 1.9 / 0.19 / 0.019).
DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3)

#: ``feature_fn(epoch) -> (features N x D, labels N)``: training features of one epoch, e.g. of a fresh random
#: augmentation of the training images, in the same row order as ``train_features``.
FeatureFn = Callable[[int], tuple[Tensor, Tensor]]

_EVAL_CHUNK = 8192  # rows per chunk when computing statistics and accuracies


@dataclass
class LinearProbeResult:
    """Outcome of :func:`linear_probe`.

    Attributes:
        top1: test top-1 accuracy (percent) of the final epoch of the retrained head.
        top5: test top-5 accuracy (percent); top-``num_classes`` when there are fewer than 5 classes.
        val_top1: validation top-1 (percent) of the chosen grid point; ``None`` when the grid has a single point
            and no validation run was made.
        lr: the chosen learning rate.
        weight_decay: the chosen weight decay.
        epochs: epochs of each training run.
        grid: one ``{"lr", "weight_decay", "val_top1"}`` dict per grid point, in grid order (lr-major).
        head: the retrained classifier, ``nn.Linear(D, num_classes)`` on the training device, with the feature
            standardisation folded in, so ``head(raw_features)`` gives the test logits. Not part of ``to_dict()``.
    """

    top1: float
    top5: float
    val_top1: float | None
    lr: float
    weight_decay: float
    epochs: int
    grid: list[dict[str, float | None]]
    head: nn.Linear | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of every field except ``head``."""
        return {
            "top1": self.top1,
            "top5": self.top5,
            "val_top1": self.val_top1,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "epochs": self.epochs,
            "grid": [dict(row) for row in self.grid],
        }


def _standardizer(features: Tensor, rows: Tensor, enabled: bool) -> tuple[Tensor, Tensor] | None:
    """Per-dimension mean and 1/std (population) of ``features[rows]``; ``None`` if disabled.

    Two passes over chunks of rows (float32 sums per chunk, float64 across chunks), so the features are never copied
    whole. Dimensions that are constant on these rows (std <= 1e-6 |mean|, e.g. dead ReLU units) get 1/std = 0: they
    are dropped, so their weights stay 0 and their test values cannot matter.
    """
    if not enabled:
        return None
    n = rows.numel()
    total = torch.zeros(features.shape[1], dtype=torch.float64, device=features.device)
    for i in range(0, n, _EVAL_CHUNK):
        total += features[rows[i : i + _EVAL_CHUNK]].float().sum(0).double()
    mean = (total / n).float()  # D
    sq = torch.zeros_like(total)
    for i in range(0, n, _EVAL_CHUNK):
        sq += (features[rows[i : i + _EVAL_CHUNK]].float() - mean).square().sum(0).double()
    std = (sq / n).sqrt().float()  # D
    constant = std <= 1e-6 * mean.abs()
    inv_std = torch.where(constant, torch.zeros_like(std), 1.0 / std.clamp_min(1e-30))
    return mean, inv_std


def _prepare(x: Tensor, stats: tuple[Tensor, Tensor] | None) -> Tensor:
    x = x.float()
    return x if stats is None else (x - stats[0]) * stats[1]


def _train_heads(
    features_of_epoch: Callable[[int], Tensor],
    labels: Tensor,
    rows: Tensor,
    stats: tuple[Tensor, Tensor] | None,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    *,
    num_classes: int,
    dim: int,
    epochs: int,
    batch_size: int,
    momentum: float,
    seed: int,
    progress: bool,
    desc: str,
) -> tuple[Tensor, Tensor]:
    """Train G = len(lrs) softmax-regression heads at once on ``features[rows]``; returns W (D x G x C), b (G x C).

    The heads are the column blocks of one D x (G*C) matrix; gradients are computed in closed form
    (d CE / d logits = softmax - one_hot), so no autograd graph is built. The update is PyTorch's SGD
    (``buf = momentum * buf + g + wd * w; w -= lr_t * buf``) with lr_t = lr * (1 + cos(pi * t / T)) / 2 per step.
    """
    device = labels.device
    g, c = len(lrs), num_classes
    weight = torch.zeros(dim, g * c, device=device)  # D x (G*C)
    bias = torch.zeros(g * c, device=device)  # G*C
    buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)
    lr_cols = torch.tensor(lrs, dtype=torch.float32, device=device).repeat_interleave(c)  # G*C
    wd_cols = torch.tensor(weight_decays, dtype=torch.float32, device=device).repeat_interleave(c)  # G*C
    use_wd = any(wd > 0 for wd in weight_decays)
    generator = torch.Generator().manual_seed(seed)
    n = rows.numel()
    total_steps = epochs * math.ceil(n / batch_size)
    step = 0
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False):
        features = features_of_epoch(epoch)  # N x D on device
        order = rows[torch.randperm(n, generator=generator)].to(device)  # n
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb = _prepare(features[idx], stats)  # B x D
            b = xb.shape[0]
            logits = torch.addmm(bias, xb, weight).view(b, g, c)  # B x G x C
            grad = logits.softmax(dim=-1)
            grad -= F.one_hot(labels[idx], c).to(grad.dtype).unsqueeze(1)  # softmax - one_hot
            grad = grad.view(b, g * c).div_(b)  # B x (G*C), gradient of the mean loss w.r.t. the logits
            grad_w = xb.T @ grad  # D x (G*C)
            if use_wd:
                grad_w.addcmul_(weight, wd_cols)
            buf_w.mul_(momentum).add_(grad_w)
            buf_b.mul_(momentum).add_(grad.sum(0))
            scale = 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            weight.addcmul_(buf_w, lr_cols, value=-scale)
            bias.addcmul_(buf_b, lr_cols, value=-scale)
            step += 1
    return weight.view(dim, g, c), bias.view(g, c)


def _val_top1(
    features: Tensor, labels: Tensor, rows: Tensor, stats: tuple[Tensor, Tensor] | None, weight: Tensor, bias: Tensor
) -> list[float]:
    """Top-1 accuracy (percent) of each of the G heads on ``features[rows]``."""
    dim, g, c = weight.shape
    hits = torch.zeros(g, dtype=torch.long, device=labels.device)
    for i in range(0, rows.numel(), _EVAL_CHUNK):
        idx = rows[i : i + _EVAL_CHUNK].to(labels.device)
        logits = torch.addmm(bias.reshape(-1), _prepare(features[idx], stats), weight.reshape(dim, g * c))
        pred = logits.view(-1, g, c).argmax(dim=-1)  # n x G
        hits += (pred == labels[idx].unsqueeze(1)).sum(0)
    return (100.0 * hits.double() / rows.numel()).tolist()


def _fold_head(weight: Tensor, bias: Tensor, stats: tuple[Tensor, Tensor] | None) -> nn.Linear:
    """``nn.Linear`` equal to standardisation followed by the head (D x C weight, C bias)."""
    dim, c = weight.shape
    head = nn.Linear(dim, c, device=weight.device)
    with torch.no_grad():
        if stats is None:
            head.weight.copy_(weight.T)
            head.bias.copy_(bias)
        else:
            mean, inv_std = stats
            head.weight.copy_((weight * inv_std.unsqueeze(1)).T)  # C x D
            head.bias.copy_(bias - (mean * inv_std) @ weight)  # C
    return head


def _epoch_source(
    train_features: Tensor, train_labels: Tensor, feature_fn: FeatureFn | None, device: torch.device
) -> Callable[[int], Tensor]:
    if feature_fn is None:
        return lambda epoch: train_features
    if not callable(feature_fn):
        raise ConfigError(f"feature_fn must be a callable epoch -> (features, labels), got {type(feature_fn).__name__}")
    n, dim = train_features.shape

    def features_of_epoch(epoch: int) -> Tensor:
        out = feature_fn(epoch)
        if not isinstance(out, tuple) or len(out) != 2:
            raise DataError(f"feature_fn({epoch}) must return a (features, labels) tuple, got {type(out).__name__}")
        features = features_arg(out[0], f"feature_fn({epoch}) features", dim=dim)
        if features.shape[0] != n:
            raise DataError(
                f"feature_fn({epoch}) returned {features.shape[0]} rows but train_features has {n}; "
                "return features for every training image, in the order of train_features"
            )
        labels = out[1]
        if not isinstance(labels, Tensor) or labels.shape != train_labels.shape or not torch.equal(
            labels.to(device, torch.long), train_labels
        ):
            raise DataError(
                f"feature_fn({epoch}) labels differ from train_labels; return the rows in the order of train_features"
            )
        return features.detach().to(device)

    return features_of_epoch


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    *,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float | Sequence[float] = DEFAULT_LRS,
    weight_decay: float | Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    momentum: float = 0.9,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: torch.device | str | None = None,
    standardize: bool = True,
    feature_fn: FeatureFn | None = None,
    progress: bool = False,
    val_rows: Tensor | None = None,
) -> LinearProbeResult:
    """Linear-probe accuracy of frozen features (protocol in the module docstring and ``docs/evaluation.md``).

    Args:
        train_features: N x D training features (any float dtype; kept as given, cast per batch).
        train_labels: N integer labels in [0, num_classes).
        test_features: M x D test features.
        test_labels: M integer labels in [0, num_classes).
        num_classes: number of classes C (>= 2).
        epochs: epochs of every training run (default 100).
        batch_size: mini-batch size (default 256).
        lr: learning rate or grid of learning rates (default ``DEFAULT_LRS`` = 0.001 ... 0.3, 6 values).
        weight_decay: weight decay or grid (default ``DEFAULT_WEIGHT_DECAYS`` = 0, 1e-5, 1e-4, 1e-3). The grid is
            the product lr x weight_decay (default 24 points).
        momentum: SGD momentum (default 0.9).
        val_fraction: fraction of each class held out for the grid search (default 0.1). Must be in (0, 1) for a
            grid of more than one point; with a single point there is no validation run and it is ignored.
        seed: seeds the split and the mini-batch order (default 0).
        device: where to train (default ``None``: the device of ``train_features``).
        standardize: standardise features with training statistics (default ``True``).
        feature_fn: optional ``feature_fn(epoch) -> (features, labels)`` giving the training features of each epoch
            (e.g. of freshly augmented training images), N x D rows in the order of ``train_features`` with the same
            labels. Training rows then come from it; ``train_features`` (un-augmented) still supply the validation
            rows and the standardisation statistics. It is called for epochs 0 .. epochs-1 in the grid run and
            again in the final run. Default ``None``: train on ``train_features`` every epoch.
        progress: show tqdm progress bars over epochs (default ``False``).
        val_rows: row indices of ``train_features`` that form the validation set of the grid search, e.g. a
            dataset's fixed ``val`` split appended to the training rows (``val_fraction`` is then ignored). Default
            ``None``: a seeded stratified ``val_fraction`` of the rows. The final run trains on all rows either way.

    Returns:
        :class:`LinearProbeResult`.

    Cost: every step is two (B x D) x (D x G*C) GEMMs for G grid points, so a run costs about
    ``4 * epochs * N * D * G * C`` FLOPs plus per-step overhead; see ``docs/evaluation.md`` for measured times.
    """
    num_classes = num_classes_arg(num_classes)
    train_features = features_arg(train_features, "train_features")
    dim = train_features.shape[1]
    test_features = features_arg(test_features, "test_features", dim=dim)
    train_labels = labels_arg(train_labels, "train_labels", train_features.shape[0], num_classes, "train_features")
    test_labels = labels_arg(test_labels, "test_labels", test_features.shape[0], num_classes, "test_features")
    epochs = positive_int(epochs, "epochs")
    batch_size = positive_int(batch_size, "batch_size")
    lrs = float_grid(lr, "lr", allow_zero=False)
    wds = float_grid(weight_decay, "weight_decay", allow_zero=True)
    if not is_real(momentum) or not 0.0 <= momentum < 1.0:
        raise ConfigError(f"momentum must be a number in [0, 1), got {momentum!r}")
    if not is_real(val_fraction) or not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    momentum, val_fraction, seed = float(momentum), float(val_fraction), int(seed)
    dev = resolve_device(device, train_features.device)

    x = train_features.detach().to(dev)  # N x D
    y = train_labels.detach().to(dev, torch.long)  # N
    features_of_epoch = _epoch_source(x, y, feature_fn, dev)
    points = list(itertools.product(lrs, wds))
    common = dict(num_classes=num_classes, dim=dim, epochs=epochs, batch_size=batch_size, momentum=momentum)

    with torch.no_grad():
        if len(points) > 1 and val_rows is not None:
            val_rows = torch.as_tensor(val_rows, dtype=torch.long).cpu()
            n = x.shape[0]
            if val_rows.dim() != 1 or val_rows.numel() == 0 or val_rows.numel() >= n or int(val_rows.min()) < 0 \
                    or int(val_rows.max()) >= n or len(torch.unique(val_rows)) != val_rows.numel():
                raise DataError(f"val_rows must be distinct row indices of the {n} training rows, leaving some "
                                f"for training; got {val_rows.numel()} indices")
            keep = torch.ones(n, dtype=torch.bool)
            keep[val_rows] = False
            train_rows, val_rows = keep.nonzero().flatten(), torch.sort(val_rows).values
        elif len(points) > 1:
            if val_fraction == 0:
                raise ConfigError(
                    f"val_fraction=0 leaves no validation set to choose among {len(points)} (lr, weight_decay) "
                    "grid points; use val_fraction > 0 (default 0.1) or pass a single lr and weight_decay"
                )
            labels_cpu = train_labels.detach().cpu().long()
            train_rows, val_rows = stratified_split(labels_cpu, num_classes, seed, fraction=val_fraction)
            if val_rows.numel() == 0:
                raise DataError(
                    f"val_fraction={val_fraction} holds out no sample of the {x.shape[0]} training rows; "
                    "raise val_fraction or pass a single lr and weight_decay"
                )
        if len(points) > 1:
            stats = _standardizer(x, train_rows.to(dev), standardize)
            weight, bias = _train_heads(
                features_of_epoch, y, train_rows, stats, [p[0] for p in points], [p[1] for p in points],
                seed=seed + 1, progress=progress, desc=f"linear probe grid ({len(points)} heads)", **common,
            )  # fmt: skip
            val_acc = _val_top1(x, y, val_rows, stats, weight, bias)
            best = max(range(len(points)), key=lambda i: (val_acc[i], -i))  # first best in grid order
            grid: list[dict[str, float | None]] = [
                {"lr": p[0], "weight_decay": p[1], "val_top1": a} for p, a in zip(points, val_acc)
            ]
            val_top1: float | None = val_acc[best]
        else:
            best, val_top1 = 0, None
            grid = [{"lr": points[0][0], "weight_decay": points[0][1], "val_top1": None}]
        best_lr, best_wd = points[best]

        all_rows = torch.arange(x.shape[0])
        stats = _standardizer(x, all_rows.to(dev), standardize)
        weight, bias = _train_heads(
            features_of_epoch, y, all_rows, stats, [best_lr], [best_wd],
            seed=seed + 2, progress=progress, desc="linear probe (final)", **common,
        )  # fmt: skip
        head = _fold_head(weight[:, 0], bias[0], stats)

        # The single evaluation on the test set.
        hits = torch.zeros(2, dtype=torch.long, device=dev)
        for i in range(0, test_features.shape[0], _EVAL_CHUNK):
            logits = head(test_features[i : i + _EVAL_CHUNK].detach().to(dev).float())  # chunk x C
            labels = test_labels[i : i + _EVAL_CHUNK].to(dev, torch.long)
            hits[0] += topk_hits(logits, labels, 1).sum()
            hits[1] += topk_hits(logits, labels, 5).sum()
        top1, top5 = (100.0 * hits.double() / test_features.shape[0]).tolist()

    return LinearProbeResult(
        top1=top1, top5=top5, val_top1=val_top1, lr=best_lr, weight_decay=best_wd, epochs=epochs, grid=grid, head=head
    )

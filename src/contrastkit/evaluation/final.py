"""The final evaluation of a training run (``contrastkit train`` after the last epoch, global rank 0).

:func:`final_evaluation` runs what ``eval.baselines`` and ``eval.linear`` ask for on the labelled monitor splits:
the kNN baselines (random-init backbone, raw pixels) on the kNN monitor's bank (:func:`monitor_bank`) and the linear
probe on the whole labelled bank split; :func:`eval_size` is the input size of every evaluation of a run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from contrastkit.config import Config
from contrastkit.data import ImageTensors

if TYPE_CHECKING:
    from contrastkit.training.module import SSLModule


def monitor_bank(cfg: Config, bank: ImageTensors) -> ImageTensors:
    """The kNN bank: a fixed random subset of ``data.monitor_bank_size`` images of ``bank`` (seeded with
    ``train.seed``) when that is set and smaller, else the whole ``bank``. Only the kNN monitor and the kNN
    baselines use the subset; the linear probe trains on the whole split."""
    if cfg.data.monitor_bank_size and cfg.data.monitor_bank_size < len(bank):
        g = torch.Generator().manual_seed(cfg.train.seed)
        return bank.subset(torch.randperm(len(bank), generator=g)[: cfg.data.monitor_bank_size])
    return bank


def eval_size(cfg: Config, image_side: int) -> int | None:
    """Evaluation input size: the training crop size when it differs from the stored images, else native."""
    crop = cfg.views.crop_size
    return crop if crop and crop != image_side else None


def final_evaluation(cfg: Config, module: SSLModule, mean: list[float], std: list[float], bank: ImageTensors,
                     query: ImageTensors, features: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> dict[str, Any]:
    """Baselines and the linear probe, on the monitor's labelled splits.

    ``bank`` is the whole labelled bank split: the linear probe trains on all of it (``linear.train_split`` and
    ``linear.train_size`` in the result say so); the kNN baselines use the kNN monitor's bank, :func:`monitor_bank`.

    Baselines (``eval.baselines``): the same kNN on the random-init backbone, on raw pixels normalised per channel
    like the network's input (``raw_pixels_knn``), and on raw pixels in [0, 1] (``raw_pixels_unnormalised_knn``;
    cosine similarity of non-negative vectors, the weaker of the two, and the usual "raw pixels" row elsewhere).

    ``features``: the trained backbone's ``(bank, query)`` features if already extracted (by the kNN monitor at
    the final step); otherwise they are extracted here (the bank's also when ``features`` holds those of a smaller
    kNN bank)."""
    from contrastkit.evaluation import extract_features, knn_evaluate, linear_probe
    from contrastkit.models import backbone_args, build_backbone

    device = module.device
    size = eval_size(cfg, int(module.hparams["image_size"]))
    assert bank.labels is not None and query.labels is not None
    yb, yq = bank.labels.to(device), query.labels.to(device)
    num_classes = int(max(yb.max(), yq.max())) + 1
    knn_bank = monitor_bank(cfg, bank)
    yk = knn_bank.labels.to(device)  # type: ignore[union-attr]
    k, t = min(cfg.train.knn_k, len(knn_bank)), cfg.train.knn_temperature
    out: dict[str, Any] = {}
    if cfg.eval.baselines:
        torch.manual_seed(cfg.train.seed)
        name = cfg.model.backbone
        rand, _ = build_backbone(name, **backbone_args(name, cfg.model, knn_bank.channels))
        rand = rand.to(device)
        fb = extract_features(rand, knn_bank.images, mean, std, cfg.eval.batch_size, device, size)
        fq = extract_features(rand, query.images, mean, std, cfg.eval.batch_size, device, size)
        out["random_init_knn"] = knn_evaluate(fb, yk, fq, yq, num_classes, k=k, temperature=t)
        pix = torch.nn.Flatten()
        fb = extract_features(pix, knn_bank.images, mean, std, cfg.eval.batch_size, device)
        fq = extract_features(pix, query.images, mean, std, cfg.eval.batch_size, device)
        out["raw_pixels_knn"] = knn_evaluate(fb, yk, fq, yq, num_classes, k=k, temperature=t)
        zero, one = [0.0] * knn_bank.channels, [1.0] * knn_bank.channels  # pixels in [0, 1], not centred
        fb = extract_features(pix, knn_bank.images, zero, one, cfg.eval.batch_size, device)
        fq = extract_features(pix, query.images, zero, one, cfg.eval.batch_size, device)
        out["raw_pixels_unnormalised_knn"] = knn_evaluate(fb, yk, fq, yq, num_classes, k=k, temperature=t)
    if cfg.eval.linear:
        if features is not None and features[0].shape[0] == len(bank):
            fb = features[0].to(device)
        else:
            fb = extract_features(module.backbone, bank.images, mean, std, cfg.eval.batch_size, device, size)
        if features is not None:
            fq = features[1].to(device)
        else:
            fq = extract_features(module.backbone, query.images, mean, std, cfg.eval.batch_size, device, size)
        res = linear_probe(fb, yb, fq, yq, num_classes, epochs=cfg.eval.linear_epochs, device=device,
                           seed=cfg.train.seed)
        out["linear"] = {**res.to_dict(), "train_split": cfg.data.monitor_bank_split, "train_size": len(bank),
                         "test_split": cfg.data.monitor_query_split, "test_size": len(query)}
        out["linear_top1"] = res.top1
    return out

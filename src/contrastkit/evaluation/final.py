"""The final evaluation of a training run (``contrastkit train`` after the last epoch, global rank 0).

:func:`final_evaluation` runs what ``eval.knn``, ``eval.baselines`` and ``eval.linear`` ask for, once, on the test
split (or the monitor's query split): kNN and the kNN baselines (random-init backbone, raw pixels) against the kNN
monitor's bank (:func:`monitor_bank`), the linear probe on the whole labelled bank split (of the trained backbone,
and of the baselines when both are asked for); :func:`eval_size` is the input size of every evaluation of a run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from contrastkit.config import Config
from contrastkit.data import ImageTensors

if TYPE_CHECKING:
    from contrastkit.evaluation.linear import LinearProbeResult
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


def split_role(cfg: Config, split: str | None) -> str:
    """``"test"`` for the configured test split, else ``"val"``: the suffix of the ``results.json`` keys of numbers
    measured on ``split`` (``knn_top1_val``, ``linear_top1_test``, ...)."""
    return "test" if split is not None and split == cfg.data.test_split else "val"


def final_evaluation(cfg: Config, module: SSLModule, mean: list[float], std: list[float], bank: ImageTensors,
                     query: ImageTensors, features: tuple[torch.Tensor, torch.Tensor] | None = None,
                     test: ImageTensors | None = None) -> dict[str, Any]:
    """The final numbers of a run: kNN on the test split, the baselines and the linear probe.

    ``bank`` is the whole labelled bank split (the training split minus the validation images) and ``query`` the
    validation split, as the kNN monitor uses them; ``test`` is the test split, evaluated here once (``None``: the
    query split is the one reported, as when ``data.test_split`` is null or equals ``data.monitor_query_split``).
    kNN numbers use the kNN monitor's bank, :func:`monitor_bank` (a seeded subset when ``data.monitor_bank_size`` is
    set); the linear probe trains on the whole bank split (``linear.train_split`` / ``linear.train_size`` say so).
    Keys carry the split:

    * ``knn_test`` / ``knn_top1_test`` / ``knn_top5_test`` (``eval.knn``, with ``test``): the monitor's kNN on test.
    * Baselines (``eval.baselines``), on the reported split: the same kNN on the random-init backbone, on raw pixels
      normalised per channel like the network's input (``raw_pixels_knn``), and on raw pixels in [0, 1]
      (``raw_pixels_unnormalised_knn``; cosine similarity of non-negative vectors, the weaker of the two, and the
      usual "raw pixels" row elsewhere). With ``eval.linear`` too, the same linear probe on the random-init
      backbone's features (``random_init_linear``) and on raw pixels (``raw_pixels_linear``; the probe standardises
      its features, so one probe covers both pixel scalings): ``{"top1": test, "val_top1": val, ...}``.
    * ``linear`` (``eval.linear``): with ``test``, :func:`linear_probe` on bank + validation rows with the
      hyper-parameters chosen on the validation rows (``val_rows``), the final head trained on both and tested on
      ``test``: ``linear_top1_val``, ``linear_top1_test`` (and ``linear_top1``, the test number). Without
      ``test``: the probe's own held-out split of the bank, tested on ``query``.

    ``features``: the trained backbone's ``(kNN bank, query)`` features if already extracted (by the kNN monitor at
    the final step); otherwise they are extracted here (the whole bank's also when the kNN bank is a subset)."""
    from contrastkit.evaluation import extract_features, knn_evaluate, linear_probe
    from contrastkit.models import backbone_args, build_backbone

    device = module.device
    size = eval_size(cfg, int(module.hparams["image_size"]))
    val = query
    report = test if test is not None else query  # the split whose numbers are reported (the baselines')
    knn_bank = monitor_bank(cfg, bank)
    assert bank.labels is not None and val.labels is not None and report.labels is not None
    assert knn_bank.labels is not None
    yb, yv, yq, yk = (x.labels.to(device) for x in (bank, val, report, knn_bank))  # type: ignore[union-attr]
    num_classes = int(max(yb.max(), yv.max(), yq.max())) + 1
    k, t = min(cfg.train.knn_k, len(knn_bank)), cfg.train.knn_temperature
    out: dict[str, Any] = {"final_split": cfg.data.test_split if test is not None else cfg.data.monitor_query_split}
    trained: dict[str, torch.Tensor] = {}
    sets = {"bank": bank, "knn_bank": knn_bank, "val": val, "test": test}

    def trained_features(name: str) -> torch.Tensor:  # N x D, each set extracted once
        if name == "bank" and knn_bank is bank:
            name = "knn_bank"
        if name not in trained:
            images = sets[name].images  # type: ignore[union-attr]
            trained[name] = extract_features(module.backbone, images, mean, std, cfg.eval.batch_size, device, size)
        return trained[name]

    if features is not None:
        trained["knn_bank"], trained["val"] = features[0].to(device), features[1].to(device)
    if test is not None and cfg.eval.knn:
        res = knn_evaluate(trained_features("knn_bank"), yk, trained_features("test"), yq, num_classes, k=k,
                           temperature=t)
        out["knn_test"] = res
        out["knn_top1_test"], out["knn_top5_test"] = res["top1"], res["top5"]
    baseline_models: dict[str, tuple[torch.nn.Module, list[float], list[float], int | None]] = {}
    if cfg.eval.baselines:
        torch.manual_seed(cfg.train.seed)
        name = cfg.model.backbone
        rand, _ = build_backbone(name, **backbone_args(name, cfg.model, knn_bank.channels))
        pix = torch.nn.Flatten()
        zero, one = [0.0] * knn_bank.channels, [1.0] * knn_bank.channels  # pixels in [0, 1], not centred
        baseline_models = {"random_init": (rand.to(device), mean, std, size), "raw_pixels": (pix, mean, std, None),
                           "raw_pixels_unnormalised": (pix, zero, one, None)}
        for key, (model, m, s, side) in baseline_models.items():
            fb = extract_features(model, knn_bank.images, m, s, cfg.eval.batch_size, device, side)
            fq = extract_features(model, report.images, m, s, cfg.eval.batch_size, device, side)
            out[f"{key}_knn"] = knn_evaluate(fb, yk, fq, yq, num_classes, k=k, temperature=t)

    def probe(features: Callable[[str], torch.Tensor]) -> LinearProbeResult:
        """The linear probe on ``features(split)``: chosen on val, trained on bank + val, tested once on test."""
        fb, fv = features("bank"), features("val")
        if test is not None:
            rows = torch.arange(len(bank), len(bank) + len(val))
            return linear_probe(torch.cat([fb, fv]), torch.cat([yb, yv]), features("test"), yq, num_classes,
                                epochs=cfg.eval.linear_epochs, device=device, seed=cfg.train.seed, val_rows=rows)
        return linear_probe(fb, yb, fv, yv, num_classes, epochs=cfg.eval.linear_epochs, device=device,
                            seed=cfg.train.seed)

    if cfg.eval.linear:
        res = probe(trained_features)
        if test is not None:
            out["linear_top1_val"], out["linear_top1_test"] = res.val_top1, res.top1
            tested, size_tested = cfg.data.test_split, len(test)
        else:
            out[f"linear_top1_{split_role(cfg, cfg.data.monitor_query_split)}"] = res.top1
            tested, size_tested = cfg.data.monitor_query_split, len(val)
        out["linear"] = {**res.to_dict(), "train_split": cfg.data.monitor_bank_split, "train_size": len(bank),
                         "test_split": tested, "test_size": size_tested}
        out["linear_top1"] = res.top1
        # the same probe on the baselines' features (raw pixels once: the probe standardises its features, so
        # normalised and [0, 1] pixels give the same probe)
        for key in ("random_init", "raw_pixels"):
            if key in baseline_models:
                model, m, s, side = baseline_models[key]
                sets_of = {name: extract_features(model, sets[name].images, m, s,  # type: ignore[union-attr]
                                                  cfg.eval.batch_size, device, side)
                           for name in ("bank", "val") + (("test",) if test is not None else ())}
                out[f"{key}_linear"] = probe(sets_of.__getitem__).to_dict()
    return out

"""Tests for contrastkit.evaluation: feature extraction, weighted kNN and the linear probe."""

from __future__ import annotations

import itertools
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrastkit.errors import ConfigError, DataError
from contrastkit.evaluation import (
    LinearProbeResult,
    extract_features,
    knn_evaluate,
    knn_grid,
    knn_predict,
    linear_probe,
    topk_accuracy,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _raises(exc_type, fn, *args, match: str | None = None, **kwargs):
    """Assert ``fn`` raises ``exc_type`` with a one-line message (optionally matching ``match``)."""
    with pytest.raises(exc_type, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def _random_split(seed: int, n_train: int = 120, n_test: int = 40, dim: int = 8, num_classes: int = 7):
    """Continuous random features (no ties) with labels that correlate with the features."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g)
    y_train = torch.randint(0, num_classes, (n_train,), generator=g)
    y_test = torch.randint(0, num_classes, (n_test,), generator=g)
    x_train = centers[y_train] + 1.5 * torch.randn(n_train, dim, generator=g)
    x_test = centers[y_test] + 1.5 * torch.randn(n_test, dim, generator=g)
    return x_train, y_train, x_test, y_test


def _reference_knn(x_train, y_train, x_test, num_classes, k, temperature, metric):
    """Brute-force weighted kNN with per-query loops in float64 NumPy.

    Returns (scores normalised to sum 1, voted mask), both M x C.
    """
    xtr = x_train.double().numpy()
    xte = x_test.double().numpy()
    ytr = y_train.numpy()
    scores = np.zeros((len(xte), num_classes))
    voted = np.zeros((len(xte), num_classes), dtype=bool)
    for i, q in enumerate(xte):
        if metric == "cosine":
            sims = np.array([np.dot(q, x) / (np.linalg.norm(q) * np.linalg.norm(x)) for x in xtr])
            order = np.argsort(-sims)[:k]
            weights = [np.exp(sims[j] / temperature) for j in order]
        else:
            dists = np.array([np.sqrt(np.sum((q - x) ** 2)) for x in xtr])
            order = np.argsort(dists)[:k]
            weights = [1.0 / (dists[j] + 1e-5) for j in order]
        for j, w in zip(order, weights):
            scores[i, ytr[j]] += w
            voted[i, ytr[j]] = True
        scores[i] /= scores[i].sum()
    return scores, voted


def _reference_accuracy(scores, voted, labels):
    """Top-1/top-5 (percent): a hit needs the class among the 5 best *voted* classes."""
    top1 = top5 = 0
    for s, v, y in zip(scores, voted, labels.numpy()):
        ranked = [c for c in np.argsort(-s, kind="stable") if v[c]]
        top1 += ranked[0] == y
        top5 += y in ranked[:5]
    return 100.0 * top1 / len(labels), 100.0 * top5 / len(labels)


def _blobs(seed: int, n: int, num_classes: int = 4, dim: int = 16, separation: float = 6.0):
    """Gaussian blobs centred at separation * e_c: linearly separable up to ~1e-5 Bayes error."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = torch.randn(n, dim, generator=g) + separation * torch.eye(num_classes, dim)[y]
    return x, y


# ----------------------------------------------------------------------------------------------------------------------
# kNN


_KNN_CASES = [("cosine", k, t) for k in (1, 5, 17, 120) for t in (0.05, 0.1, 0.5)] + [
    ("euclidean", k, 0.1) for k in (1, 5, 17, 120)  # the euclidean weight does not use the temperature
]


@pytest.mark.parametrize("metric,k,temperature", _KNN_CASES)
def test_knn_predict_matches_brute_force_reference(metric, k, temperature):
    x_train, y_train, x_test, _ = _random_split(seed=k)
    scores = knn_predict(x_train, y_train, x_test, 7, k=k, temperature=temperature, metric=metric)
    ref, _ = _reference_knn(x_train, y_train, x_test, 7, k, temperature, metric)
    assert scores.shape == (40, 7) and scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), ref, rtol=1e-4, atol=1e-6)
    assert torch.equal(scores.argmax(1), torch.from_numpy(ref.argmax(1)))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("k,temperature", [(1, 0.1), (3, 0.07), (10, 0.2), (50, 0.05), (120, 0.5)])
def test_knn_evaluate_matches_brute_force_reference(metric, k, temperature):
    x_train, y_train, x_test, y_test = _random_split(seed=100 + k)
    acc = knn_evaluate(x_train, y_train, x_test, y_test, 7, k=k, temperature=temperature, metric=metric)
    ref = _reference_knn(x_train, y_train, x_test, 7, k, temperature, metric)
    ref_top1, ref_top5 = _reference_accuracy(*ref, y_test)
    assert set(acc) == {"top1", "top5"} and all(isinstance(v, float) for v in acc.values())
    assert acc["top1"] == pytest.approx(ref_top1) and acc["top5"] == pytest.approx(ref_top5)
    assert 0.0 <= acc["top1"] <= acc["top5"] <= 100.0


def test_knn_reference_accuracies_are_informative():
    # Guard against a vacuous comparison: the data give neither 0 nor 100 percent, and top5 > top1.
    x_train, y_train, x_test, y_test = _random_split(seed=110)
    acc = knn_evaluate(x_train, y_train, x_test, y_test, 7, k=10)
    assert 20.0 < acc["top1"] < acc["top5"] < 100.0


def test_knn_top5_counts_only_classes_with_a_neighbour():
    x_train, y_train, x_test, y_test = _random_split(seed=3)
    acc = knn_evaluate(x_train, y_train, x_test, y_test, 7, k=1)
    assert acc["top5"] == acc["top1"]  # a single neighbour votes for a single class


def test_knn_top5_with_fewer_than_five_classes_is_top_num_classes():
    x_train, y_train, x_test, y_test = _random_split(seed=4, num_classes=3)
    assert knn_evaluate(x_train, y_train, x_test, y_test, 3, k=120)["top5"] == 100.0


def test_knn_chunking_gives_identical_results():
    x_train, y_train, x_test, y_test = _random_split(seed=5, n_test=53)
    for metric in ("cosine", "euclidean"):
        full = knn_predict(x_train, y_train, x_test, 7, k=20, metric=metric, chunk_size=10_000)
        acc = knn_evaluate(x_train, y_train, x_test, y_test, 7, k=20, metric=metric, chunk_size=10_000)
        for chunk in (1, 7, None):
            assert torch.allclose(
                knn_predict(x_train, y_train, x_test, 7, k=20, metric=metric, chunk_size=chunk), full, atol=1e-6
            )
            assert knn_evaluate(x_train, y_train, x_test, y_test, 7, k=20, metric=metric, chunk_size=chunk) == acc


def test_knn_grid_equals_individual_calls():
    x_train, y_train, x_test, y_test = _random_split(seed=6)
    ks, temps = (1, 4, 30), (0.05, 0.3)
    rows = knn_grid(x_train, y_train, x_test, y_test, 7, ks=ks, temperatures=temps, chunk_size=16)
    assert len(rows) == len(ks) * len(temps) + len(ks)  # euclidean: one row per k
    expected = [("cosine", k, t) for k, t in itertools.product(ks, temps)] + [("euclidean", k, None) for k in ks]
    assert [(r["metric"], r["k"], r["temperature"]) for r in rows] == expected
    for row in rows:
        single = knn_evaluate(
            x_train, y_train, x_test, y_test, 7, k=row["k"], temperature=row["temperature"] or 0.1, metric=row["metric"]
        )
        assert (row["top1"], row["top5"]) == (single["top1"], single["top5"])


def test_knn_small_temperature_does_not_overflow():
    x_train, y_train, x_test, _ = _random_split(seed=7)
    scores = knn_predict(x_train, y_train, x_test, 7, k=120, temperature=1e-3)
    assert torch.isfinite(scores).all()
    nearest = (F.normalize(x_test, dim=1) @ F.normalize(x_train, dim=1).T).argmax(1)
    assert torch.equal(scores.argmax(1), y_train[nearest])  # T -> 0 is the 1-NN classifier


def test_knn_accepts_half_precision_and_integer_label_dtypes():
    x_train, y_train, x_test, y_test = _random_split(seed=8)
    ref = knn_evaluate(x_train, y_train, x_test, y_test, 7, k=5)
    got = knn_evaluate(x_train.double(), y_train.int(), x_test.double(), y_test.to(torch.int16), 7, k=5)
    assert got == ref


def test_knn_bad_inputs_raise():
    x_train, y_train, x_test, y_test = _random_split(seed=9)
    msg = _raises(ConfigError, knn_evaluate, x_train, y_train, x_test, y_test, 7, k=121)
    assert "121" in msg and "120" in msg
    _raises(ConfigError, knn_predict, x_train, y_train, x_test, 7, k=0)
    _raises(ConfigError, knn_predict, x_train, y_train, x_test, 7, metric="manhattan")
    _raises(ConfigError, knn_predict, x_train, y_train, x_test, 7, temperature=0.0)
    _raises(ConfigError, knn_predict, x_train, y_train, x_test, 1)
    _raises(ConfigError, knn_predict, x_train, y_train, x_test, 7, chunk_size=0)
    _raises(ConfigError, knn_grid, x_train, y_train, x_test, y_test, 7, ks=(5, 200))
    _raises(ConfigError, knn_grid, x_train, y_train, x_test, y_test, 7, ks=())
    _raises(ConfigError, knn_grid, x_train, y_train, x_test, y_test, 7, metrics=("cosine", "cosine"))
    _raises(DataError, knn_predict, x_train[:0], y_train[:0], x_test, 7, k=1, match="empty")
    _raises(DataError, knn_predict, x_train, y_train, x_test[:0], 7, match="empty")
    _raises(DataError, knn_evaluate, x_train, y_train[:-1], x_test, y_test, 7, match="labels")
    _raises(DataError, knn_evaluate, x_train, y_train, x_test, y_test[:-1], 7)
    _raises(DataError, knn_evaluate, x_train, y_train, x_test, None, 7, match="missing")
    _raises(DataError, knn_evaluate, x_train, y_train, x_test[:, :3], y_test, 7, match="dimension")
    _raises(DataError, knn_evaluate, x_train, y_train.float(), x_test, y_test, 7, match="integer")
    _raises(DataError, knn_evaluate, x_train, y_train - 1, x_test, y_test, 7, match="-1")
    _raises(DataError, knn_evaluate, x_train, y_train, x_test, y_test + 1, 7)
    nan = x_test.clone()
    nan[3, 2] = float("nan")
    _raises(DataError, knn_evaluate, x_train, y_train, nan, y_test, 7, match="NaN")
    _raises(DataError, knn_predict, x_train[0], y_train, x_test, 7)


# ----------------------------------------------------------------------------------------------------------------------
# top-k accuracy


def test_topk_accuracy_by_hand():
    scores = torch.tensor(
        [
            [0.9, 0.05, 0.03, 0.01, 0.005, 0.005],  # label 0: top1 hit
            [0.1, 0.5, 0.2, 0.1, 0.06, 0.04],  # label 2: second -> top5 hit only
            [0.5, 0.2, 0.1, 0.09, 0.07, 0.04],  # label 5: sixth -> miss
            [0.0, 0.0, 0.3, 0.7, 0.0, 0.0],  # label 3: top1 hit
        ]
    )
    labels = torch.tensor([0, 2, 5, 3])
    assert topk_accuracy(scores, labels) == {"top1": 50.0, "top5": 75.0}
    assert topk_accuracy(scores, labels, ks=(1, 2, 6)) == {"top1": 50.0, "top2": 75.0, "top6": 100.0}
    assert topk_accuracy(scores[:, :3], torch.tensor([0, 2, 1, 2]))["top5"] == 100.0  # 3 classes: top-3
    _raises(DataError, topk_accuracy, scores, labels[:3])
    _raises(DataError, topk_accuracy, scores, labels + 1)
    _raises(ConfigError, topk_accuracy, scores, labels, ks=(0,))


# ----------------------------------------------------------------------------------------------------------------------
# linear probe

_FAST = dict(epochs=15, batch_size=64, lr=(0.003, 0.03, 0.3), weight_decay=(0.0, 1e-3))


def test_linear_probe_separable_blobs_near_perfect():
    x_train, y_train = _blobs(0, 800)
    x_test, y_test = _blobs(1, 400)
    result = linear_probe(x_train, y_train, x_test, y_test, 4, **_FAST)
    assert isinstance(result, LinearProbeResult)
    assert result.top1 >= 98.0
    assert result.top5 == 100.0  # 4 classes: top-5 is top-4
    assert result.epochs == 15 and len(result.grid) == 6
    assert result.val_top1 is not None and result.val_top1 >= 98.0


def test_linear_probe_shuffled_labels_is_chance():
    g = torch.Generator().manual_seed(2)
    x_train, x_test = torch.randn(600, 16, generator=g), torch.randn(2000, 16, generator=g)
    y_train, y_test = torch.randint(0, 4, (600,), generator=g), torch.randint(0, 4, (2000,), generator=g)
    result = linear_probe(x_train, y_train, x_test, y_test, 4, **_FAST)
    assert abs(result.top1 - 25.0) < 5.0  # std of the test accuracy is ~1 point


def _hard_problem(seed: int, n: int):
    """Overlapping blobs (about 70% Bayes accuracy), so that the grid points differ on validation."""
    return _blobs(seed, n, num_classes=5, dim=10, separation=1.5)


def test_linear_probe_chooses_hyper_parameters_by_validation_only():
    x_train, y_train = _hard_problem(3, 600)
    x_test, y_test = _hard_problem(4, 300)
    kwargs = dict(epochs=4, batch_size=32, lr=(1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0), weight_decay=(0.0, 0.1))
    result = linear_probe(x_train, y_train, x_test, y_test, 5, **kwargs)
    val = [row["val_top1"] for row in result.grid]
    assert len(set(val)) > 2  # the grid points really differ
    best = val.index(max(val))  # first best in grid order
    assert (result.lr, result.weight_decay, result.val_top1) == (
        result.grid[best]["lr"],
        result.grid[best]["weight_decay"],
        max(val),
    )
    assert [(r["lr"], r["weight_decay"]) for r in result.grid] == list(
        itertools.product(kwargs["lr"], kwargs["weight_decay"])
    )  # lr-major grid order
    # A different test set (labels permuted) changes nothing but the test accuracy.
    y_perm = y_test[torch.randperm(len(y_test), generator=torch.Generator().manual_seed(0))]
    other = linear_probe(x_train, y_train, x_test, y_perm, 5, **kwargs)
    assert other.grid == result.grid and (other.lr, other.weight_decay) == (result.lr, result.weight_decay)
    assert other.top1 != result.top1
    # The final head is retrained on the full training set: the same as a run with only the chosen point.
    chosen = {**kwargs, "lr": result.lr, "weight_decay": result.weight_decay}
    alone = linear_probe(x_train, y_train, x_test, y_test, 5, **chosen)
    assert torch.equal(alone.head.weight, result.head.weight) and alone.top1 == result.top1
    # The reported numbers are those of the returned head, evaluated once on the test set.
    logits = result.head(x_test)
    assert result.top1 == pytest.approx(100.0 * (logits.argmax(1) == y_test).float().mean().item())
    assert result.top5 == pytest.approx(topk_accuracy(logits, y_test)["top5"])


def test_linear_probe_optimiser_matches_torch_sgd_reference():
    """The closed-form multi-head trainer equals nn.Linear + autograd + torch.optim.SGD with a per-step cosine."""
    from contrastkit.evaluation.linear import _standardizer, _train_heads

    x, y = _hard_problem(15, 230)
    rows = torch.arange(20, 230)  # a subset, as in the grid run
    mean, std = x[rows].mean(0), x[rows].std(0, unbiased=False)
    stats = _standardizer(x, rows, True)
    torch.testing.assert_close(stats[0], mean)
    torch.testing.assert_close(stats[1], 1.0 / std)
    lrs, wds, epochs, batch, seed = (0.05, 0.3), (1e-2, 0.0), 3, 32, 123
    weight, bias = _train_heads(
        lambda epoch: x, y, rows, stats, lrs, wds, num_classes=5, dim=10, epochs=epochs, batch_size=batch,
        momentum=0.9, seed=seed, progress=False, desc="",
    )  # fmt: skip
    total = epochs * -(-len(rows) // batch)
    for g, (lr, wd) in enumerate(zip(lrs, wds)):
        ref = nn.Linear(10, 5)
        nn.init.zeros_(ref.weight)
        nn.init.zeros_(ref.bias)
        opt = torch.optim.SGD(
            [{"params": [ref.weight], "weight_decay": wd}, {"params": [ref.bias], "weight_decay": 0.0}],
            lr=lr, momentum=0.9,
        )  # fmt: skip
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + np.cos(np.pi * t / total)))
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = rows[torch.randperm(len(rows), generator=gen)]
            for i in range(0, len(order), batch):
                idx = order[i : i + batch]
                loss = F.cross_entropy(ref((x[idx] - mean) / std), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        torch.testing.assert_close(weight[:, g], ref.weight.detach().T, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bias[g], ref.bias.detach(), rtol=1e-4, atol=1e-5)


def test_linear_probe_is_deterministic_and_serialisable():
    x_train, y_train = _hard_problem(5, 300)
    x_test, y_test = _hard_problem(6, 100)
    a = linear_probe(x_train, y_train, x_test, y_test, 5, **_FAST)
    b = linear_probe(x_train, y_train, x_test, y_test, 5, **_FAST)
    assert a.to_dict() == b.to_dict()
    c = linear_probe(x_train, y_train, x_test, y_test, 5, seed=1, **_FAST)
    assert c.to_dict() != a.to_dict()
    d = json.loads(json.dumps(a.to_dict()))
    assert set(d) == {"top1", "top5", "val_top1", "lr", "weight_decay", "epochs", "grid"}
    assert set(d["grid"][0]) == {"lr", "weight_decay", "val_top1"}


def test_linear_probe_single_point_skips_validation_and_no_standardisation():
    x_train, y_train = _blobs(7, 400)
    x_test, y_test = _blobs(8, 200)
    result = linear_probe(
        x_train * 10 + 3, y_train, x_test * 10 + 3, y_test, 4, epochs=10, batch_size=64, lr=0.01, weight_decay=0.0,
        val_fraction=0.0, standardize=False,
    )  # fmt: skip
    assert result.val_top1 is None and result.grid == [{"lr": 0.01, "weight_decay": 0.0, "val_top1": None}]
    assert (result.lr, result.weight_decay) == (0.01, 0.0)
    assert result.top1 >= 98.0
    head_top1 = 100.0 * (result.head(x_test * 10 + 3).argmax(1) == y_test).float().mean().item()
    assert result.top1 == pytest.approx(head_top1)


def test_linear_probe_standardisation_handles_scale_and_constant_dimensions():
    x_train, y_train = _blobs(9, 600)
    x_test, y_test = _blobs(10, 300)
    scale = torch.logspace(-3, 3, 16)
    x_train, x_test = x_train * scale + 100.0, x_test * scale + 100.0
    x_train[:, 15] = 0.1  # constant in training (not exactly representable), different in test: weight stays 0
    x_test[:, 15] = -1e3
    result = linear_probe(x_train, y_train, x_test, y_test, 4, **_FAST)
    assert result.top1 >= 98.0
    assert result.head.weight[:, 15].abs().max().item() == 0.0


def test_linear_probe_feature_fn_trains_on_per_epoch_features():
    x_train, y_train = _blobs(11, 600)
    x_test, y_test = _blobs(12, 300)
    calls = []

    def feature_fn(epoch: int):
        calls.append(epoch)
        g = torch.Generator().manual_seed(epoch)
        return x_train + 0.3 * torch.randn(x_train.shape, generator=g), y_train.clone()

    result = linear_probe(x_train, y_train, x_test, y_test, 4, feature_fn=feature_fn, **_FAST)
    assert calls == list(range(15)) * 2  # grid run, then the final run
    assert result.top1 >= 98.0

    _raises(
        DataError, linear_probe, x_train, y_train, x_test, y_test, 4,
        feature_fn=lambda e: (x_train.flip(0), y_train.flip(0)), **_FAST, match="order",
    )  # fmt: skip
    _raises(
        DataError, linear_probe, x_train, y_train, x_test, y_test, 4,
        feature_fn=lambda e: (x_train[:10], y_train[:10]), **_FAST,
    )  # fmt: skip
    _raises(DataError, linear_probe, x_train, y_train, x_test, y_test, 4, feature_fn=lambda e: x_train, **_FAST)


def test_linear_probe_bad_inputs_raise():
    x_train, y_train = _blobs(13, 100)
    x_test, y_test = _blobs(14, 50)
    args = (x_train, y_train, x_test, y_test, 4)
    _raises(ConfigError, linear_probe, *args, lr=-0.1)
    _raises(ConfigError, linear_probe, *args, lr=())
    _raises(ConfigError, linear_probe, *args, lr=(0.1, 0.1))
    _raises(ConfigError, linear_probe, *args, weight_decay=(-1e-4,))
    _raises(ConfigError, linear_probe, *args, val_fraction=1.0)
    _raises(ConfigError, linear_probe, *args, val_fraction=0.0, match="val_fraction")
    _raises(ConfigError, linear_probe, *args, momentum=1.0)
    _raises(ConfigError, linear_probe, *args, epochs=0)
    _raises(ConfigError, linear_probe, *args, batch_size=0)
    _raises(ConfigError, linear_probe, *args, feature_fn="not callable")
    _raises(ConfigError, linear_probe, x_train, y_train, x_test, y_test, 1)
    _raises(DataError, linear_probe, x_train, y_train, x_test[:, :5], y_test, 4)
    _raises(DataError, linear_probe, x_train, y_train, x_test, y_test[:-1], 4)
    _raises(DataError, linear_probe, x_train, y_train, x_test, y_test + 1, 4)
    _raises(DataError, linear_probe, x_train[:0], y_train[:0], x_test, y_test, 4)
    _raises(DataError, linear_probe, x_train[:3], y_train[:3], x_test, y_test, 4, match="val_fraction")


# ----------------------------------------------------------------------------------------------------------------------
# feature extraction

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip


def _images(n: int = 12, side: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)


def _manual(model: nn.Module, images: torch.Tensor, size: int | None = None) -> torch.Tensor:
    x = images.float() / 255.0
    if size is not None:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    model.eval()
    with torch.no_grad():
        return model(x)


def test_extract_features_matches_manual_forward_and_restores_modes():
    model, images = _model(), _images()
    model.train()
    model[1].eval()  # a submodule frozen in eval mode must stay so
    running_mean = model[1].running_mean.clone()
    feats = extract_features(model, images, MEAN, STD, batch_size=5)
    assert model.training and model[0].training and model[3].training and not model[1].training
    assert torch.equal(model[1].running_mean, running_mean)  # eval mode: BN statistics untouched
    assert feats.shape == (12, 6) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert not feats.is_inference() and not feats.requires_grad
    torch.testing.assert_close(feats, _manual(model, images), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(extract_features(model, images, MEAN, STD, batch_size=512, progress=True), feats)


def test_extract_features_train_mode_would_differ():
    # Guard: the model behaves differently in train mode, so the comparison above really checks eval mode.
    model, images = _model(), _images()
    x = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        train_out = model.train()(x)
    assert not torch.allclose(train_out, extract_features(model, images, MEAN, STD), atol=1e-3)


def test_extract_features_resizes():
    model, images = _model(), _images(side=24)
    feats = extract_features(model, images, MEAN, STD, batch_size=4, size=8)
    torch.testing.assert_close(feats, _manual(model, images, size=8), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(feats, extract_features(model, images, MEAN, STD), atol=1e-3)


def test_extract_features_casts_outputs_to_float32():
    model = nn.Sequential(_model(), nn.Linear(6, 4).double())
    model[0].append(_ToDouble())
    feats = extract_features(model, _images(), MEAN, STD)
    assert feats.dtype == torch.float32 and feats.shape == (12, 4)


class _ToDouble(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def test_extract_features_reads_a_read_only_memmap(tmp_path):
    images = _images()
    np.save(tmp_path / "images.npy", images.numpy())
    array = np.load(tmp_path / "images.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns about non-writable arrays
        mapped = torch.from_numpy(array)
    model = _model()
    torch.testing.assert_close(
        extract_features(model, mapped, MEAN, STD, batch_size=5, size=8),
        extract_features(model, images, MEAN, STD, batch_size=5, size=8),
    )


class _FailsOnSecondBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("boom")
        return self.pool(x)


def test_extract_features_restores_mode_when_the_model_fails():
    model = _FailsOnSecondBatch().train()
    with pytest.raises(RuntimeError, match="boom"):
        extract_features(model, _images(), MEAN, STD, batch_size=5)
    assert model.training and model.pool.training


def test_extract_features_bad_inputs_raise():
    model, images = _model(), _images()
    _raises(DataError, extract_features, model, images.float(), MEAN, STD, match="uint8")
    _raises(DataError, extract_features, model, images[0], MEAN, STD, match="4-D")
    _raises(DataError, extract_features, model, images[:0], MEAN, STD, match="empty")
    _raises(DataError, extract_features, model, images.numpy(), MEAN, STD)
    _raises(ConfigError, extract_features, model, images, MEAN[:2], STD, match="channels")
    _raises(ConfigError, extract_features, model, images, MEAN, (0.2, 0.0, 0.2))
    _raises(ConfigError, extract_features, model, images, (125.3, 123.0, 113.9), STD, match="0-1")
    _raises(ConfigError, extract_features, model, images, MEAN, STD, batch_size=0)
    _raises(ConfigError, extract_features, model, images, MEAN, STD, size=0)
    _raises(ConfigError, extract_features, model, images, MEAN, STD, device="meta", match="model.to")
    _raises(ValueError, extract_features, nn.Conv2d(3, 4, 3), images, MEAN, STD, match="batch, dim")  # the model's bug


# ----------------------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model, images = _model(), _images()
    cpu = extract_features(model, images, MEAN, STD, size=8)
    gpu = extract_features(model.cuda(), images, MEAN, STD, size=8)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)

    x_train, y_train, x_test, y_test = _random_split(seed=20)
    for metric in ("cosine", "euclidean"):
        scores = knn_predict(x_train.cuda(), y_train.cuda(), x_test.cuda(), 7, k=10, metric=metric)
        assert scores.device.type == "cuda"
        ref = knn_predict(x_train, y_train, x_test, 7, k=10, metric=metric)
        torch.testing.assert_close(scores.cpu(), ref, rtol=1e-4, atol=1e-5)
    acc = knn_evaluate(x_train, y_train, x_test, y_test, 7, k=10, device="cuda")
    assert acc == knn_evaluate(x_train, y_train, x_test, y_test, 7, k=10)

    x_train, y_train = _blobs(0, 800)
    x_test, y_test = _blobs(1, 400)
    result = linear_probe(x_train.cuda(), y_train.cuda(), x_test, y_test, 4, **_FAST)
    assert result.top1 >= 98.0 and next(result.head.parameters()).device.type == "cuda"


# ----------------------------------------------------------------------------------------------------------------------
# augmented feature extraction (linear probe with augmentation) and the feature cache


def _policy(**fields):
    from contrastkit.evaluation.offline import crop_flip_policy

    policy = crop_flip_policy(16)
    for k, v in fields.items():
        setattr(policy, k, v)
    return policy


def test_extract_augmented_features_applies_the_policy():
    from contrastkit.evaluation import extract_augmented_features

    model, images = _model(), _images()
    model.train()
    # the identity augmentation (whole image, never flipped) gives the plain features
    ident = extract_augmented_features(model, images, MEAN, STD, _policy(crop_scale=(1.0, 1.0), hflip_prob=0.0))
    torch.testing.assert_close(ident, extract_features(model, images, MEAN, STD), rtol=1e-4, atol=1e-5)
    assert model.training  # modes restored
    # always flipped = the features of the mirrored images
    flipped = extract_augmented_features(model, images, MEAN, STD, _policy(crop_scale=(1.0, 1.0), hflip_prob=1.0))
    torch.testing.assert_close(flipped, extract_features(model, images.flip(-1), MEAN, STD), rtol=1e-4, atol=1e-5)
    # random crops: seeded, batch-size independent draws per seed, different seeds differ
    a = extract_augmented_features(model, images, MEAN, STD, _policy(), batch_size=512, seed=3)
    b = extract_augmented_features(model, images, MEAN, STD, _policy(), batch_size=512, seed=3)
    c = extract_augmented_features(model, images, MEAN, STD, _policy(), batch_size=512, seed=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.shape == (12, 6) and not torch.allclose(a, c)
    _raises(ConfigError, extract_augmented_features, model, images, MEAN, STD, "crop", match="ViewPolicy")


def test_feature_cache_roundtrip_key_and_corruption(tmp_path):
    from contrastkit.evaluation.cache import CachedFeatures, cache_file, cached_features, make_key

    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"weights")
    path = cache_file(ckpt, "cifar10", "test", "backbone")
    assert path == tmp_path / "m.ckpt.features" / "cifar10-test-backbone.pt"
    calls = []

    def compute():
        calls.append(1)
        return CachedFeatures(torch.arange(6.0).view(3, 2), torch.tensor([0, 1, 1]), ["a", "b"])

    key = make_key(ckpt, split="test", kind="backbone")
    first = cached_features(path, key, compute)
    again = cached_features(path, key, compute)
    assert calls == [1] and again.from_cache and not first.from_cache
    assert torch.equal(again.features, first.features) and again.classes == ["a", "b"]
    cached_features(path, make_key(ckpt, split="test", kind="projector"), compute)  # other key: recomputed
    assert len(calls) == 2
    path.write_bytes(b"garbage")  # a corrupt cache file is recomputed, not an error
    assert not cached_features(path, key, compute).from_cache and len(calls) == 3
    assert cached_features(path, key, compute).from_cache
    ckpt.write_bytes(b"other weights")  # the checkpoint changed: its stamp is in every key
    assert make_key(ckpt, split="test", kind="backbone") != key
    assert not list(path.parent.glob("*.tmp"))


def test_a_model_returning_maps_is_a_programming_error_not_a_user_error():
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"\(batch, dim\)") as e:
        extract_features(torch.nn.Identity(), images, [0.5], [0.25], batch_size=2, device="cpu")
    assert not isinstance(e.value, ConfigError)

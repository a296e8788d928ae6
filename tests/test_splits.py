"""Validation splits: determinism, disjointness, stratification and sizes; the monitor validates on them and the test
split is evaluated once; the linear probe chooses on given validation rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from contrastkit.config import load_config
from contrastkit.data import dataset_splits, load_dataset
from contrastkit.data.splits import stratified_split, validation_split
from contrastkit.errors import ConfigError, DataError
from contrastkit.evaluation import linear_probe

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def _rows(labels: torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return validation_split(labels, int(labels.max()) + 1, size, seed, "test labels")


def test_split_is_deterministic_disjoint_and_complete():
    labels = torch.randint(0, 7, (1000,), generator=torch.Generator().manual_seed(3))
    rest, val = _rows(labels, 100, seed=0)
    rest2, val2 = _rows(labels, 100, seed=0)
    assert torch.equal(val, val2) and torch.equal(rest, rest2)  # same seed, same split
    assert not torch.equal(_rows(labels, 100, seed=1)[1], val)  # another seed, another split
    assert len(val) == 100 and len(rest) == 900
    assert len(set(val.tolist()) & set(rest.tolist())) == 0
    assert sorted(val.tolist() + rest.tolist()) == list(range(1000))


def test_split_is_stratified_with_exact_size():
    # Unequal classes (500, 300, 150, 50): each class gets its share of the 101 validation images, largest remainder.
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate((500, 300, 150, 50))])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    _, val = _rows(labels, 101, seed=0)
    counts = torch.bincount(labels[val], minlength=4).tolist()
    # quotas 50.5, 30.3, 15.15, 5.05 -> floors 50, 30, 15, 5 (100) + 1 for the largest remainder (class 0)
    assert counts == [51, 30, 15, 5]
    # fraction mode (the linear probe's) rounds per class
    _, held = stratified_split(labels, 4, 0, fraction=0.1)
    assert torch.bincount(labels[held], minlength=4).tolist() == [50, 30, 15, 5]


def test_split_sizes_are_checked():
    labels = torch.arange(10) % 2
    with pytest.raises(DataError, match="data.val_size to an integer in 1..8"):
        _rows(labels, 9, 0)
    with pytest.raises(DataError, match="has no labels"):
        validation_split(None, None, 5, 0, "stl10 unlabeled")
    with pytest.raises(ConfigError, match="data.val_size"):
        load_config(None, ["data.val_size=0"])


def test_synthetic_val_and_train_minus_val_partition_train():
    train = load_dataset("synthetic", split="train", n=300, image_size=8)
    val = load_dataset("synthetic", split="val", n=300, image_size=8)
    rest = load_dataset("synthetic", split="train-minus-val", n=300, image_size=8)
    assert (len(val), len(rest)) == (30, 270)  # default: 10 % of train
    assert val.name == "synthetic/val" and rest.name == "synthetic/train-minus-val"
    assert val.classes == train.classes
    # every training image is in exactly one of the two (images are distinct: random shapes on noise)
    flat = train.images.flatten(1)
    index = {bytes(row.numpy()): i for i, row in enumerate(flat)}
    got_val = [index[bytes(r.numpy())] for r in val.images.flatten(1)]
    got_rest = [index[bytes(r.numpy())] for r in rest.images.flatten(1)]
    assert sorted(got_val + got_rest) == list(range(300))
    assert torch.equal(train.labels[got_val], val.labels)
    other = load_dataset("synthetic", split="val", n=300, image_size=8, val_size=50, val_seed=4)
    assert len(other) == 50
    assert "val" in dataset_splits("cifar10") and "train-minus-val" in dataset_splits("stl10")
    from contrastkit.data.splits import default_val_size

    assert [default_val_size(name, n) for name, n in (("fashion-mnist", 60000), ("cifar10", 50000),
                                                      ("cifar100", 50000), ("stl10", 5000))] == [5000] * 3 + [500]


@pytest.mark.skipif(not FMNIST.is_file(), reason="Fashion-MNIST is not installed")
def test_fashion_mnist_validation_split():
    val = load_dataset("fashion-mnist", split="val")
    rest = load_dataset("fashion-mnist", split="train-minus-val")
    assert (len(val), len(rest)) == (5000, 55000)
    assert torch.bincount(val.labels).tolist() == [500] * 10  # the classes are balanced: 6000 each in train
    assert torch.equal(load_dataset("fashion-mnist", split="val").images, val.images)  # deterministic


def test_imagefolder_uses_its_own_val_folder(tmp_path):
    from PIL import Image

    for split, n in (("train", 6), ("val", 2)):
        for cls in ("a", "b"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 20, 0, 0 if cls == "a" else 200)).save(folder / f"{i}.png")
    opts = dict(root=tmp_path, image_size=8, cache_dir=tmp_path / "cache")
    assert len(load_dataset("imagefolder", split="val", **opts)) == 4
    assert len(load_dataset("imagefolder", split="train-minus-val", **opts)) == 12


def test_linear_probe_chooses_on_the_given_validation_rows():
    # The grid's validation accuracy of each point equals a single-point probe trained on the training rows only
    # (seed - 1, so that its final run uses the grid run's batch order seed + 1) and tested on the validation rows.
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (240,), generator=g)
    x = torch.randn(240, 6, generator=g) + 1.5 * torch.nn.functional.one_hot(y, 6).float()
    rows = torch.arange(180, 240)
    lrs, wds = (0.01, 0.1), (0.0, 1e-3)
    res = linear_probe(x, y, x[:10], y[:10], 3, epochs=3, batch_size=32, lr=lrs, weight_decay=wds, seed=5,
                       val_rows=rows)
    for row in res.grid:
        single = linear_probe(x[:180], y[:180], x[180:], y[180:], 3, epochs=3, batch_size=32, lr=row["lr"],
                              weight_decay=row["weight_decay"], seed=4)
        assert row["val_top1"] == pytest.approx(single.top1, abs=100 / 60 + 1e-9)  # at most one prediction flips
    with pytest.raises(DataError, match="val_rows"):
        linear_probe(x, y, x, y, 3, epochs=1, lr=lrs, val_rows=torch.arange(240))


@pytest.mark.slow
def test_monitor_validates_and_test_is_evaluated_once(tiny_overrides, monkeypatch):
    from contrastkit.training import callbacks, run

    seen = {}
    real_init = callbacks.KNNMonitor.__init__

    def spy(self, bank, query, *args, **kwargs):
        seen["bank"], seen["query"] = bank.name, query.name
        real_init(self, bank, query, *args, **kwargs)

    monkeypatch.setattr(callbacks.KNNMonitor, "__init__", spy)
    loaded = []
    real_load = run.load_split
    monkeypatch.setattr(run, "load_split", lambda cfg, split: loaded.append(split) or real_load(cfg, split))
    cfg = load_config(None, tiny_overrides + ["train.epochs=1", "eval.linear=true", "eval.linear_epochs=2",
                                              "eval.baselines=true"])
    m = run.train(cfg).metrics
    assert seen == {"bank": "synthetic/train-minus-val", "query": "synthetic/val"}
    assert loaded == ["train", "train-minus-val", "val", "test"]  # the test split: once, after training
    saved = json.loads((Path(cfg.train.run_dir) / "results.json").read_text())
    assert saved["splits"] == {"train": "train", "bank": "train-minus-val", "val": "val", "test": "test"}
    assert saved["final_split"] == "test"
    assert saved["knn_top1_val"] == saved["knn_top1"] == saved["knn_history"][-1]["knn_top1"]
    for key in ("knn_top1_test", "knn_top5_test", "linear_top1_val", "linear_top1_test"):
        assert 0.0 <= saved[key] <= 100.0, key
    assert saved["linear_top1_val"] == saved["linear"]["val_top1"] and saved["linear_top1_test"] == m["linear_top1"]
    # the test kNN is the monitor's classifier on the test split
    assert saved["knn_test"]["top1"] == saved["knn_top1_test"]


def test_report_reads_split_labels_and_older_results(tmp_path):
    from contrastkit.report import RunSummary, split_metrics

    new = RunSummary(tmp_path, "new", {"data": {"monitor_query_split": "val"}},
                     {"knn_top1": 80.0, "knn_top1_val": 80.0, "knn_top1_test": 79.0, "linear_top1": 85.0,
                      "linear_top1_val": 86.0, "linear_top1_test": 85.0}, linear_top1=85.0,
                     linear_source="results.json", linear_split="test")
    assert {k: v for k, v in split_metrics(new).items() if v is not None} == {
        "knn_top1_val": 80.0, "knn_top1_test": 79.0, "linear_top1_val": 86.0, "linear_top1_test": 85.0}
    # before the validation split: the monitor queried the test split, and the probe was tested on it
    old = RunSummary(tmp_path, "old", {"data": {"monitor_query_split": "test"}},
                     {"knn_top1": 81.0, "linear_top1": 84.0}, linear_top1=84.0, linear_source="results.json")
    got = split_metrics(old)
    assert (got["knn_top1_test"], got["knn_top1_val"], got["linear_top1_test"]) == (81.0, None, 84.0)
